"""Frozen-backbone probes for every effssl checkpoint: features of the frozen backbone (eval mode), then
  - a linear layer, top-1 of the LAST epoch: EMP-SSL's protocol (SGD lr 0.03, 100 epochs, cosine), the multi-view
    paper's (Ghosh et al. 2024, arXiv:2312.10725: --linear-opt adam) or NPID + SqrtKL's (--linear-aug: Cao & Wu
    2024, arXiv:2404.19289, after SSQL: a fresh augmented view of every train image each epoch, SGD lr 30);
  - weighted k-NN (NPID, Wu et al. 2018, arXiv:1805.01978: cosine, vote weight exp(s/T), T 0.07, k 20, 200).
Image representations (--mode):
  bag      mean backbone embedding of P patches (EMP-SSL, Tong et al. 2023, arXiv:2304.03977, Sec. 2
           "Bag-of-Feature Model"). --positions fixed: the same P positions in every image and run; random: drawn
           per image from --seed, as BagSSL samples its evaluation patches (Chen et al. 2022, arXiv:2206.08954, Sec. 4)
  central  the whole image (standard protocol)
  local    BagSSL Sec. 4.4 / App. C.4: embeddings of a sliding window of patches (stride 4, 25 patches of 16 px
           on CIFAR) form a 5x5 map, average-pooled (window 3, stride 2), flattened
  views    mean over V views, 1 clean + V-1 training-augmented (the multi-view paper's App. D)
Each probe setting (mode, patches, positions, feature, ...) has its own result file beside the checkpoint,
eval-<setting>.json, so probes never overwrite each other.

    python eval_linear.py --ckpt runs/emp1 --mode bag --patches 128
    python eval_linear.py --ckpt runs/emp1 --probe knn --compare-random   # trained vs random init
    python eval_linear.py --ckpt random --arch resnet18 --dataset cifar10 --mode bag --patches 128
"""
import json
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# linear probe defaults (epochs, lr, wd, batch, label smoothing): EMP-SSL Sec. 3 (SGD lr 0.03, 100 epochs; its code:
# momentum 0.9, wd 5e-5, batch 100, cosine), the multi-view paper App. D Table 4 (Adam, constant lr; smoothing 0.1:
# its authors' probe), NPID + SqrtKL Sec. 4.2 after SSQL (--linear-aug: SGD, lr x0.1 at 60 % and 80 % of the epochs)
LINEAR = {"sgd": (100, 0.03, 5e-5, 100, 0.0), "adam": (200, 1e-3, 1e-6, 512, 0.1), "aug": (100, 30.0, 0.0, 128, 0.0)}


def parse_args(argv=None):
    p = common.ArgParser(description=__doc__)
    a = p.add_argument
    a("--ckpt", required=True, help="a run folder or its checkpoint.pt, or 'random' (random-init floor)")
    a("--arch", choices=common.ARCHS, help="backbone of --ckpt random (default resnet18); a checkpoint's must match")
    a("--compare-random", action="store_true", help="also probe a random init of the same architecture, side by side")
    a("--dataset", default=None, choices=common.DATASETS, help="probe data set (default: the checkpoint's)")
    a("--data-dir", default=None)
    a("--download", action="store_true", help="let torchvision download CIFAR / STL-10 into --data-dir")
    a("--image-size", type=common.COUNT, default=None, help="image side for --dataset folder")
    a("--train-dataset", default=None, help="transfer: the data set the checkpoint was trained on (checked)")
    a("--mode", choices=["bag", "central", "local", "views"], help="default bag for patch-trained runs, else central")
    a("--patches", type=common.COUNT, default=128, help="patches per bag (EMP-SSL: 128; BagSSL: 1/16/256)")
    a("--positions", default="fixed", choices=["fixed", "random"], help="same in every image, or per image from --seed")
    a("--patch-size", type=common.COUNT, default=None, help="patch side (default: the training patch side)")
    a("--out-size", type=common.COUNT, default=None, help="side patches are resized to (default: training input side)")
    a("--stride", type=common.COUNT, default=4, help="--mode local: sliding-window stride (BagSSL App. C.4: 4)")
    a("--views", type=common.COUNT, default=16, help="--mode views: views per image (1 clean + V-1 augmented)")
    a("--bag-augment", action="store_true", help="augment bag patches as in training (official EMP-SSL eval)")
    a("--feature", default="backbone", choices=["backbone", "head1"],
      help="backbone embedding h (papers) or the first projector block (official EMP-SSL eval)")
    a("--probe", default="linear,knn", help="comma list of linear, knn")
    a("--linear-aug", action="store_true", help="NPID + SqrtKL's linear probe (after SSQL): augmented train images "
      "each epoch, SGD lr 30, wd 0, 100 epochs, steps at 60 and 80, batch 128 (--mode central)")
    a("--linear-epochs", type=common.COUNT, default=None, help="default 100 (sgd) / 200 (adam)")
    a("--linear-lr", type=common.POSITIVE, default=None, help="default 0.03 (sgd) / 1e-3 (adam) / 30 (--linear-aug)")
    a("--linear-opt", default="sgd", choices=["sgd", "adam"])
    a("--linear-wd", type=common.NONNEG, default=None, help="default 5e-5 (sgd) / 1e-6 (adam) / 0 (--linear-aug)")
    a("--linear-batch", type=common.COUNT, default=None, help="default 100 (sgd) / 512 (adam) / 128 (--linear-aug)")
    a("--label-smoothing", type=common.Number(float, 0, 1, open_hi=True, says="in [0, 1)"), help="default 0 (sgd) / "
      "0.1 (adam: not in App. D; the authors' probe, fastssl scripts/train_model_multiPatch.py, uses it)")
    a("--knn-k", default="20,200")
    a("--knn-t", type=common.POSITIVE, default=0.07)
    a("--subset", type=common.COUNT, default=None, help="probe on a fixed seeded subset of N training images")
    a("--test-subset", type=common.COUNT, default=None, help="evaluate on a fixed seeded subset of N test images")
    a("--batch-size", type=common.COUNT, default=256, help="images per feature-extraction batch")
    a("--amp", default="bf16", choices=["bf16", "off"], help="feature extraction in bf16 autocast on CUDA (default) "
      "or float32 (off: the official EMP-SSL evaluation's; its own result file, '-fp32'); float32 on the CPU")
    a("--workers", type=common.COUNT0, default=4)
    a("--seed", type=common.SEED, default=0, help="seed of the random init, patch positions and view augmentations")
    a("--out", default=None, help="folder for the result file (default: the checkpoint's folder)")
    return p.parse_args(argv)


def load_backbone(args):
    """(backbone, projector head or None, info: the run's probe_info with its method, dataset and data_dir)."""
    if args.ckpt == "random":
        ds = args.dataset or "cifar10"
        size = args.image_size or common.IMAGE_SIZE.get(ds, 224)
        info = {**common.probe_info(args.arch or "resnet18", common.default_stem(size), size, *common.data_stats(ds),
                                    "bag", patch_size=size // 2), "dataset": ds, "method": "random", "data_dir": None}
        return random_backbone(info, args.seed), None, info
    ckpt = common.load_checkpoint(args.ckpt)
    targs = ckpt["args"]
    info = {**ckpt["probe"], "dataset": targs["dataset"], "method": ckpt["method"], "data_dir": targs.get("data_dir")}
    if args.arch and args.arch != info["arch"]:
        common.fail(f"--arch {args.arch}: the checkpoint '{args.ckpt}' holds a {info['arch']}")
    backbone = common.backbone(info["arch"], info["stem"])
    backbone.load_state_dict(ckpt["backbone"])
    if args.feature != "head1":
        return backbone, None, info
    if not info.get("proj"):
        common.fail(f"checkpoint '{args.ckpt}' has no projector for --feature head1")
    proj = common.projector(backbone.dim, info["proj"], bias=info["proj_bias"])
    state = {k[len("projector."):]: v for k, v in ckpt["model"].items() if k.startswith("projector.")}
    try:  # strict: a projector saved under other names must not leave head1 at its random init
        proj.load_state_dict(state)
    except RuntimeError as e:
        common.fail(f"checkpoint '{args.ckpt}': its projector does not match {info['proj']}: {str(e).splitlines()[0]}")
    return backbone, proj[:3], info  # Linear-BN-ReLU: the 4096-d feature of the official EMP-SSL evaluation


def random_backbone(info, seed):
    """A randomly initialised backbone of the training run's architecture, from a fixed seed."""
    torch.manual_seed(seed)
    return common.backbone(info["arch"], info["stem"])


def setting_name(args):
    """The probe setting as a file-name part: runs differing in it never share a result file."""
    mode = {"bag": [f"p{args.patches}", f"s{args.patch_size}", args.positions, args.bag_augment and "aug"],
            "local": [f"s{args.patch_size}", f"stride{args.stride}"], "views": [f"v{args.views}"]}
    n = (args.subset or args.test_subset) and f"n{args.subset or 'all'}-{args.test_subset or 'all'}"
    parts = [args.mode, *mode.get(args.mode, []), args.out_size and f"o{args.out_size}", args.feature,
             args.amp == "off" and "fp32", args.linear_aug and "linaug",
             args.dataset != args.trained_on and args.dataset, n, args.seed and f"seed{args.seed}"]
    return "-".join(str(p) for p in parts if p)


def progress(name, total, unit="images"):
    """tick(done, extra): a line every ~10 s and at the end: done / total, rate, ETA and extra (loss, top-1)."""
    t0 = shown = time.time()

    def tick(done, extra=""):
        nonlocal shown
        if time.time() - shown >= 10 or done >= total:
            shown, rate = time.time(), done / max(time.time() - t0, 1e-9)
            print(f"  {name}: {done}/{total} {unit}{extra}, {rate:.{0 if unit == 'images' else 2}f} {unit}/s, "
                  f"eta {(total - done) / max(rate, 1e-9) / 60:.1f} min", flush=True)
    return tick


@torch.no_grad()
def extract(args, embed, ds, device, info, name="", seed_offset=0):
    """Features [N, D] of every image of ds under --mode."""
    mean, std, size, out_size = info["mean"], info["std"], args.patch_size, args.out_size or info["out_size"]
    gen = torch.Generator(device=device).manual_seed(args.seed)
    aug = common.AugConfig(**info["aug"]) if info.get("aug") else common.AugConfig(mean=mean, std=std)  # --bag-augment
    if args.mode == "bag" and args.positions == "fixed":
        boxes = common.fixed_patch_boxes(args.patches, size, ds.size, args.seed)
    elif args.mode == "bag":  # drawn per image, each split from its own seed
        g = torch.Generator().manual_seed(args.seed + seed_offset)
        boxes = common.patch_boxes(args.patches * len(ds), size, ds.size, ds.size, g).view(args.patches, len(ds), 4)
    elif args.mode == "local":  # a sliding window, row-major (BagSSL App. C.4)
        pos = range(0, ds.size - size + 1, args.stride)
        boxes, grid = torch.tensor([[t, l, size, size] for t in pos for l in pos]), len(pos)
    elif args.mode == "views":  # the run's own views (multiaug_ssl), else the multi-view paper's CIFAR views (App. D)
        views = info.get("views") or {"scale": [0.08, 1.0], "ratio": [3 / 4, 4 / 3], "aug": dict(
            jitter=(0.4, 0.4, 0.4, 0.0), p_gray=0.2, p_blur=0.0, p_solarize=0.0, mean=mean, std=std)}
        vaug = common.AugConfig(**views["aug"])
    feats = []
    tick = progress(f"features {name}", len(ds))
    for s in range(0, len(ds), args.batch_size):
        imgs = ds.get(torch.arange(s, min(s + args.batch_size, len(ds))), args.workers).to(device)
        b = len(imgs)
        if args.mode == "bag":
            bx = boxes if boxes.dim() == 2 else boxes[:, s:s + b]
            f = common.bag_of_features(embed, imgs, bx, out_size, mean, std,
                                       aug=aug if args.bag_augment else None, generator=gen)
        elif args.mode == "central":
            side = out_size if args.out_size is not None or not info["patch_size"] else imgs.shape[-1]
            f = embed(common.central_view(imgs, side, mean, std))
        elif args.mode == "local":
            x = common.resized_crops(imgs.float().div(255).repeat(len(boxes), 1, 1, 1),
                                     boxes.to(device).repeat_interleave(b, 0), out_size)
            h = embed(common.normalize(x, mean, std)).float()  # [P*b, D], patch-major
            h = h.reshape(grid, grid, b, -1).permute(2, 3, 0, 1)  # [b, D, grid, grid]
            f = F.avg_pool2d(h, kernel_size=3, stride=2).flatten(1)
        else:  # views
            f = embed(common.central_view(imgs, out_size, mean, std)).float()
            if args.views > 1:
                v, _ = common.sample_views(imgs, args.views - 1, out_size, tuple(views["scale"]),
                                            tuple(views["ratio"]), generator=gen)
                h = embed(common.augment(v, vaug, gen)).float().reshape(args.views - 1, b, -1)
                f = (f + h.sum(0)) / args.views
        feats.append(f.float().cpu())
        tick(s + b)
    return torch.cat(feats)


def linear_probe(args, feats, labels, te_f, te_y, num_classes, device):
    """A linear layer on frozen features, top-1 on the test split after each epoch; defaults: LINEAR. feats(idx):
    the features of train images idx, fixed or (--linear-aug) of a fresh augmented view each epoch."""
    adam, aug = args.linear_opt == "adam", args.linear_aug
    given = (args.linear_epochs, args.linear_lr, args.linear_wd, args.linear_batch, args.label_smoothing)
    default = LINEAR["adam" if adam else "aug" if aug else "sgd"]
    epochs, lr, wd, bs, ls = (d if v is None else v for v, d in zip(given, default))
    torch.manual_seed(args.seed)
    clf = nn.Linear(te_f.shape[1], num_classes).to(device)
    opt = torch.optim.Adam(clf.parameters(), lr=lr, weight_decay=wd) if adam else \
        torch.optim.SGD(clf.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    per_epoch = (len(labels) + bs - 1) // bs
    sched = None if adam else torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * per_epoch) if not aug else \
        torch.optim.lr_scheduler.MultiStepLR(opt, [round(m * epochs) * per_epoch for m in (0.6, 0.8)], gamma=0.1)
    te_f, te_y, labels = te_f.to(device), te_y.to(device), labels.to(device)
    g = torch.Generator().manual_seed(args.seed)
    accs, tick = [], progress("linear probe", epochs, unit="epochs")
    for epoch in range(epochs):
        perm = torch.randperm(len(labels), generator=g)
        for s in range(0, len(labels), bs):
            idx = perm[s:s + bs]
            loss = F.cross_entropy(clf(feats(idx)), labels[idx.to(device)], label_smoothing=ls)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched:
                sched.step()
        with torch.no_grad():
            accs.append((clf(te_f).argmax(1) == te_y).float().mean().item() * 100)
        tick(epoch + 1, f" (loss {loss.item():.4f}, lr {opt.param_groups[0]['lr']:.2e}, top-1 {accs[-1]:.2f})")
    return accs


def probe_all(args, embed, train, test, device, info, ks, probes, name):
    """Features of both splits, then every asked probe: the result dict of one backbone."""
    t0 = time.time()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and args.amp == "bf16"):
        tr_f = extract(args, embed, train, device, info, f"{name} train") if not args.linear_aug or "knn" in probes \
            else None
        te_f = extract(args, embed, test, device, info, f"{name} test", seed_offset=1)
    result = {"dim": te_f.shape[1], "feature_seconds": round(time.time() - t0, 1)}
    if "knn" in probes:
        result["knn"] = {}
        for k in ks:
            pred = common.knn_predict(tr_f.to(device), train.labels.to(device), te_f.to(device),
                                      train.num_classes, k=k, t=args.knn_t)
            result["knn"][f"k{k}"] = (pred.cpu() == test.labels).float().mean().item() * 100
            # printed now, so that a probe stopped during the linear one keeps its k-NN figures
            print(f"  k-NN k={k} ({name}): {result['knn'][f'k{k}']:.2f}", flush=True)
    if "linear" in probes:
        gen = torch.Generator(device=device).manual_seed(args.seed)
        flip = common.AugConfig(flip=0.5, p_jitter=0.0, p_gray=0.0, p_blur=0.0, p_solarize=0.0, mean=info["mean"],
                                std=info["std"])

        @torch.no_grad()
        def fresh_view(idx):  # --linear-aug: a fresh RandomResizedCrop(0.08, 1) + flip of train images idx (SSQL)
            x, _ = common.sample_views(train.get(idx, args.workers).to(device), 1, args.out_size or info["out_size"],
                                       scale=(0.08, 1.0), generator=gen)
            return embed(common.augment(x, flip, gen)).float()
        feats = fresh_view if args.linear_aug else lambda idx: tr_f[idx].to(device)
        accs = linear_probe(args, feats, train.labels, te_f, test.labels, train.num_classes, device)
        result["linear"] = {"last": accs[-1], "best": max(accs), "epochs": len(accs),
                            "opt": f"{args.linear_opt}-aug" if args.linear_aug else args.linear_opt}
    return result


def resolve(args):
    """Check the flags against the checkpoint, fill what they leave open: (backbone, proj, info, probes, k of k-NN)."""
    probes = [p for p in args.probe.split(",") if p]
    if not probes or set(probes) - {"linear", "knn"}:
        common.fail(f"--probe takes linear and/or knn, not '{args.probe}'")
    try:
        ks = [common.COUNT(k) for k in args.knn_k.split(",")]
    except Exception:  # argparse.ArgumentTypeError, or a value that is no number
        common.fail(f"--knn-k takes a comma list of whole numbers from 1 up, not '{args.knn_k}'")
    if args.ckpt != "random" and os.path.isdir(args.ckpt):  # a run folder
        args.ckpt = os.path.join(args.ckpt, "checkpoint.pt")
    backbone, proj, info = load_backbone(args)
    if args.train_dataset and args.train_dataset != info["dataset"]:
        common.fail(f"--train-dataset {args.train_dataset}: the checkpoint was trained on {info['dataset']}")
    args.trained_on, args.dataset = info["dataset"], args.dataset or info["dataset"]
    if args.data_dir is None:
        args.data_dir = info.get("data_dir") if args.dataset == info["dataset"] and info.get("data_dir") \
            else os.path.join("data", args.dataset)
    args.mode = args.mode or ("bag" if info["represent"] == "bag" else "central")
    if args.compare_random and args.feature != "backbone":
        common.fail("--compare-random compares backbone features: drop --feature head1")
    if args.linear_aug and args.mode != "central":
        common.fail("--linear-aug probes the whole image: use it with --mode central")
    args.patch_size = args.patch_size or info["patch_size"] or 16
    size = args.image_size or common.IMAGE_SIZE.get(args.dataset)
    if size and args.mode in ("bag", "local"):
        common.check_patch(args.patch_size, size)
    return backbone, proj, info, probes, ks


def report(args, result, out_dir):
    """The table (trained, random init, gain) and the setting's result file (atomic; keeps old probes not rerun)."""
    rnd = result.get("random", {})
    rows = [(f"k-NN k={k[1:]}", v, rnd.get("knn", {}).get(k)) for k, v in result.get("knn", {}).items()]
    if "linear" in result:
        rows.append(("linear (last epoch)", result["linear"]["last"], rnd.get("linear", {}).get("last")))
    print(f"{'top-1 %':<22}{'trained':>9}" + (f"{'random':>9}{'gain':>8}" if rnd else ""))
    for label, v, r in rows:
        print(f"{label:<22}{v:9.2f}" + (f"{r:9.2f}{v - r:+8.2f}" if r is not None else ""))
    if "linear" in result:
        print(f"(linear, best epoch on the test split, which flatters: {result['linear']['best']:.2f})")
    path = os.path.join(out_dir, f"eval-{setting_name(args)}.json")
    try:
        os.makedirs(out_dir, exist_ok=True)
        if os.path.exists(path):
            with open(path) as f:
                old = json.load(f)
            result = {**old, **result, **{k: {**old.get(k, {}), **result[k]} for k in ("knn", "random")
                                          if isinstance(old.get(k), dict) and k in result}}
        with open(f"{path}.tmp{os.getpid()}", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(f"{path}.tmp{os.getpid()}", path)
    except (OSError, ValueError) as e:
        common.fail(f"cannot write {path} ({e.__class__.__name__}: {e})")
    print(f"wrote {path}", flush=True)
    return {**result, "path": path}


def main(argv=None):
    args = parse_args(argv)
    backbone, proj, info, probes, ks = resolve(args)
    out_dir = args.out or (os.path.dirname(os.path.abspath(args.ckpt)) if args.ckpt != "random"
                           else os.path.join("runs", f"random-{info['arch']}-{args.dataset}"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train = common.load_dataset(args.dataset, args.data_dir, "train", args.image_size, args.workers,
                                download=args.download, seed=args.seed)
    test = common.load_dataset(args.dataset, args.data_dir, "test", args.image_size, args.workers, seed=args.seed)
    if args.subset:
        train = train.subset(common.subset_indices(len(train), args.subset, seed=1))
    if args.test_subset:
        test = test.subset(common.subset_indices(len(test), args.test_subset, seed=2))
    if "knn" in probes and max(ks) > len(train):
        common.fail(f"--knn-k {max(ks)} is larger than the {len(train)} training images of the probe")
    bag = args.mode == "bag"
    what = f" of {args.patches} x {args.patch_size}px patches ({args.positions} positions)" if bag else ""
    print(f"probe {args.ckpt} on {args.dataset} ({len(train)} train / {len(test)} test), {args.mode}{what}, "
          f"feature {args.feature}", flush=True)
    result = {"ckpt": args.ckpt, "method": info.get("method"), "trained_on": info["dataset"], "dataset": args.dataset,
              "mode": args.mode, "feature": args.feature, "n_train": len(train), "n_test": len(test), "seed": args.seed}
    if args.mode in ("bag", "local"):
        result.update(patches=args.patches if bag else None, patch_size=args.patch_size,
                      positions=args.positions if bag else "grid", out_size=args.out_size or info["out_size"],
                      bag_augment=args.bag_augment)
    result.update({"views": args.views} if args.mode == "views" else {})
    nets = [("trained", backbone)] + ([("random init", random_backbone(info, args.seed))]
                                      if args.compare_random and args.ckpt != "random" else [])
    for name, net in nets:
        embed = (nn.Sequential(net, proj) if proj is not None else net).to(device).eval()
        out = probe_all(args, embed, train, test, device, info, ks, probes, name)
        result.update(out if name == "trained" else {"random": out})
    return report(args, result, out_dir)


if __name__ == "__main__":
    common.run_cli(main, training=False)
