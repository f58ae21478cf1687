"""Frozen-backbone probes for every effssl checkpoint (SPEC section 2).

Features are computed once with the backbone frozen in eval mode, then probed by
  - a linear layer (EMP-SSL protocol: 100 epochs, SGD lr 0.03, momentum 0.9, wd 5e-5, batch
    100, cosine; `--linear-opt adam` for the multi-view paper's probe), top-1 of the LAST epoch;
  - weighted k-NN (NPID protocol: cosine similarity, vote weight exp(s/T), T = 0.07, k = 20, 200).
Image representations (--mode):
  bag      mean backbone embedding of P patches (EMP-SSL Sec. 2 "Bag-of-Feature Model"); patch
           positions fixed by a seed, the same for every image and run
  central  the whole image (standard protocol)
  local    BagSSL Sec. 4.4 / App. C.4: embeddings of a sliding window of patches (stride 4, 25
           patches of 16 px on CIFAR) form a 5x5 map, average-pooled (window 3, stride 2), flattened
  views    mean over V views: 1 clean + V-1 training-augmented (multi-view paper, App. D)

    python eval_linear.py --ckpt runs/emp1/checkpoint.pt --mode bag --patches 128
    python eval_linear.py --ckpt random --arch resnet18 --dataset cifar10 --mode bag --patches 128
"""
import argparse
import json
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--ckpt", required=True, help="checkpoint.pt of a method script, or 'random' (random-init floor)")
    a("--arch", default="resnet18", choices=["resnet18", "resnet34", "resnet50"], help="backbone for --ckpt random")
    a("--dataset", default=None, choices=common.DATASETS, help="probe data set (default: the checkpoint's)")
    a("--data-dir", default=None)
    a("--image-size", type=int, default=None, help="image side for --dataset folder")
    a("--train-dataset", default=None, help="transfer: the data set the checkpoint was trained on (checked)")
    a("--mode", default=None, choices=["bag", "central", "local", "views"],
      help="image representation (default: bag for patch-trained checkpoints, else central)")
    a("--patches", type=int, default=128, help="patches per bag (EMP-SSL: 128; BagSSL: 1/16/256)")
    a("--patch-size", type=int, default=None, help="patch side (default: the training patch side)")
    a("--out-size", type=int, default=None, help="side patches are resized to (default: training input side)")
    a("--stride", type=int, default=4, help="--mode local: sliding-window stride (BagSSL App. C.4: 4)")
    a("--views", type=int, default=16, help="--mode views: views per image (1 clean + V-1 augmented)")
    a("--bag-augment", action="store_true", help="apply the training augmentations to bag patches (official EMP-SSL eval)")
    a("--feature", default="backbone", choices=["backbone", "head1"],
      help="backbone embedding h (papers) or the first projector block (official EMP-SSL eval)")
    a("--probe", default="linear,knn", help="comma list of linear, knn")
    a("--linear-epochs", type=int, default=None, help="default 100 (sgd) / 200 (adam)")
    a("--linear-lr", type=float, default=None, help="default 0.03 (sgd) / 1e-3 (adam)")
    a("--linear-opt", default="sgd", choices=["sgd", "adam"])
    a("--linear-wd", type=float, default=None, help="default 5e-5 (sgd) / 1e-6 (adam)")
    a("--linear-batch", type=int, default=None, help="default 100 (sgd) / 512 (adam)")
    a("--label-smoothing", type=float, default=None, help="default 0 (sgd) / 0.1 (adam)")
    a("--knn-k", default="20,200")
    a("--knn-t", type=float, default=0.07)
    a("--subset", type=int, default=None, help="probe on a fixed seeded subset of N training images")
    a("--test-subset", type=int, default=None, help="evaluate on a fixed seeded subset of N test images")
    a("--batch-size", type=int, default=256, help="images per feature-extraction batch")
    a("--workers", type=int, default=4)
    a("--seed", type=int, default=0, help="seed of the random init, patch positions and view augmentations")
    a("--out", default=None, help="folder for eval.json (default: the checkpoint's folder)")
    return p.parse_args(argv)


def load_backbone(args):
    """(backbone, projector or None, training args) from a checkpoint or a random init."""
    if args.ckpt == "random":
        torch.manual_seed(args.seed)
        ds = args.dataset or "cifar10"
        size = args.image_size or common.IMAGE_SIZE.get(ds, 224)
        targs = {"dataset": ds, "arch": args.arch, "stem": common.default_stem(ds, size), "patch_size": size // 2,
                 "out_size": size, "norm_mean": list(common.data_stats(ds)[0]), "norm_std": list(common.data_stats(ds)[1]),
                 "proj": None, "method": "random", "data_dir": None}
        return common.resnet(args.arch, targs["stem"]), None, targs
    ckpt = common.load_checkpoint(args.ckpt)
    targs = ckpt["args"]
    backbone = common.resnet(targs["arch"], targs["stem"])
    backbone.load_state_dict(ckpt["backbone"])
    proj = None
    if args.feature == "head1":
        if not targs.get("proj"):
            common.fail(f"checkpoint '{args.ckpt}' has no projector for --feature head1")
        proj = common.projector(backbone.dim, targs["proj"], bias=targs.get("proj_bias", True))
        proj.load_state_dict({k[len("projector."):]: v for k, v in ckpt["model"].items() if k.startswith("projector.")})
        proj = proj[:3]  # Linear-BN-ReLU: the 4096-d feature of the official EMP-SSL evaluation
    return backbone, proj, targs


def sliding_boxes(image_size, size, stride):
    """Top-left corners of a sliding window, row-major (BagSSL App. C.4)."""
    pos = list(range(0, image_size - size + 1, stride))
    return torch.tensor([[t, l, size, size] for t in pos for l in pos]), len(pos)


@torch.no_grad()
def extract(args, embed, ds, device, targs):
    """Features [N, D] of every image of ds under --mode."""
    mean, std = targs["norm_mean"], targs["norm_std"]
    out_size = args.out_size or targs["out_size"]
    gen = torch.Generator(device=device).manual_seed(args.seed)
    aug = common.AugConfig(mean=mean, std=std)
    if args.mode == "bag":
        boxes = common.fixed_patch_boxes(args.patches, args.patch_size, ds.size, args.seed)
    elif args.mode == "local":
        boxes, grid = sliding_boxes(ds.size, args.patch_size, args.stride)
    elif args.mode == "views":  # the multi-view paper's CIFAR augmentation
        vaug = common.AugConfig(jitter=(0.4, 0.4, 0.4, 0.0), p_blur=0.0, p_solarize=0.0, mean=mean, std=std)
    feats = []
    for s in range(0, len(ds), args.batch_size):
        imgs = ds.get(torch.arange(s, min(s + args.batch_size, len(ds))), args.workers).to(device)
        b = len(imgs)
        if args.mode == "bag":
            f = common.bag_of_features(embed, imgs, boxes, out_size, mean, std,
                                       aug=aug if args.bag_augment else None, generator=gen)
        elif args.mode == "central":
            x = imgs.float().div(255)
            if x.shape[-1] != out_size and (args.out_size is not None or targs.get("patch_size") is None):
                x = F.interpolate(x, size=(out_size, out_size), mode="bilinear", align_corners=False, antialias=True)
            f = embed(common.normalize(x, mean, std)).float()
        elif args.mode == "local":
            x = common.resized_crops(imgs.float().div(255).repeat(len(boxes), 1, 1, 1),
                                     boxes.to(device).repeat_interleave(b, 0), out_size)
            h = embed(common.normalize(x, mean, std)).float()  # [P*b, D], patch-major
            h = h.reshape(grid, grid, b, -1).permute(2, 3, 0, 1)  # [b, D, grid, grid]
            f = F.avg_pool2d(h, kernel_size=3, stride=2).flatten(1)
        else:  # views
            x = imgs.float().div(255)
            clean = common.normalize(F.interpolate(x, size=(out_size, out_size), mode="bilinear", align_corners=False)
                                     if x.shape[-1] != out_size else x, mean, std)
            f = embed(clean).float()
            if args.views > 1:
                v, _ = common.sample_views(imgs, args.views - 1, out_size, generator=gen)
                h = embed(common.augment(v, vaug, gen)).float().reshape(args.views - 1, b, -1)
                f = (f + h.sum(0)) / args.views
        feats.append(f.cpu())
    return torch.cat(feats)


def linear_probe(args, tr_f, tr_y, te_f, te_y, num_classes, device):
    """Train a linear layer on fixed features; top-1 on the test split after each epoch."""
    adam = args.linear_opt == "adam"
    epochs = args.linear_epochs or (200 if adam else 100)
    lr = args.linear_lr or (1e-3 if adam else 0.03)
    wd = args.linear_wd if args.linear_wd is not None else (1e-6 if adam else 5e-5)
    bs = args.linear_batch or (512 if adam else 100)
    ls = args.label_smoothing if args.label_smoothing is not None else (0.1 if adam else 0.0)
    torch.manual_seed(args.seed)
    clf = nn.Linear(tr_f.shape[1], num_classes).to(device)
    opt = torch.optim.Adam(clf.parameters(), lr=lr, weight_decay=wd) if adam else \
        torch.optim.SGD(clf.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    steps = epochs * ((len(tr_f) + bs - 1) // bs)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if not adam else None  # adam: constant lr
    tr_f, tr_y, te_f, te_y = tr_f.to(device), tr_y.to(device), te_f.to(device), te_y.to(device)
    g = torch.Generator().manual_seed(args.seed)
    accs = []
    for _ in range(epochs):
        perm = torch.randperm(len(tr_f), generator=g).to(device)
        for s in range(0, len(tr_f), bs):
            idx = perm[s:s + bs]
            loss = F.cross_entropy(clf(tr_f[idx]), tr_y[idx], label_smoothing=ls)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched:
                sched.step()
        with torch.no_grad():
            accs.append((clf(te_f).argmax(1) == te_y).float().mean().item() * 100)
    return accs


def main(argv=None):
    args = parse_args(argv)
    probes = [p for p in args.probe.split(",") if p]
    if not probes or set(probes) - {"linear", "knn"}:
        common.fail(f"--probe takes linear and/or knn, not '{args.probe}'")
    if args.patches <= 0 or args.views <= 0:
        common.fail("--patches and --views must be positive")
    ks = [int(k) for k in args.knn_k.split(",")]
    backbone, proj, targs = load_backbone(args)
    if args.train_dataset and args.train_dataset != targs["dataset"]:
        common.fail(f"--train-dataset {args.train_dataset}: the checkpoint was trained on {targs['dataset']}")
    args.dataset = args.dataset or targs["dataset"]
    if args.data_dir is None:
        args.data_dir = targs.get("data_dir") if args.dataset == targs["dataset"] and targs.get("data_dir") \
            else os.path.join("data", args.dataset)
    args.mode = args.mode or ("bag" if targs.get("patch_size") else "central")
    args.patch_size = args.patch_size or targs.get("patch_size") or 16
    size = args.image_size or common.IMAGE_SIZE.get(args.dataset)
    if size and args.mode in ("bag", "local") and args.patch_size > size:
        common.fail(f"--patch-size {args.patch_size} is larger than the {size}px images")
    out_dir = args.out or (os.path.dirname(os.path.abspath(args.ckpt)) if args.ckpt != "random"
                           else os.path.join("runs", f"random-{args.arch}-{args.dataset}"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    t0 = time.time()
    train = common.load_dataset(args.dataset, args.data_dir, "train", args.image_size, args.workers, seed=args.seed)
    test = common.load_dataset(args.dataset, args.data_dir, "test", args.image_size, args.workers, seed=args.seed)
    if args.subset:
        train = train.subset(common.subset_indices(len(train), args.subset, seed=1))
    if args.test_subset:
        test = test.subset(common.subset_indices(len(test), args.test_subset, seed=2))
    embed = nn.Sequential(backbone, proj) if proj is not None else backbone
    embed = embed.to(device).eval()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        tr_f, te_f = extract(args, embed, train, device, targs), extract(args, embed, test, device, targs)
    t_feat = time.time() - t0

    result = {"ckpt": args.ckpt, "method": targs.get("method"), "trained_on": targs["dataset"],
              "dataset": args.dataset, "mode": args.mode, "feature": args.feature, "dim": tr_f.shape[1],
              "n_train": len(train), "n_test": len(test), "feature_seconds": round(t_feat, 1)}
    if args.mode in ("bag", "local"):
        result.update(patches=args.patches if args.mode == "bag" else None, patch_size=args.patch_size,
                      out_size=args.out_size or targs["out_size"], bag_augment=args.bag_augment)
    if args.mode == "views":
        result["views"] = args.views
    if "knn" in probes:
        result["knn"] = {}
        for k in ks:
            pred = common.knn_predict(tr_f.to(device), train.labels.to(device), te_f.to(device),
                                      train.num_classes, k=k, t=args.knn_t)
            result["knn"][f"k{k}"] = (pred.cpu() == test.labels).float().mean().item() * 100
    if "linear" in probes:
        accs = linear_probe(args, tr_f, train.labels, te_f, test.labels, train.num_classes, device)
        result["linear"] = {"last": accs[-1], "best": max(accs), "epochs": len(accs), "opt": args.linear_opt}

    what = f"{args.mode}" + (f" of {args.patches} x {args.patch_size}px patches" if args.mode == "bag" else "")
    print(f"probe {args.ckpt} on {args.dataset} ({len(train)} train / {len(test)} test), {what}, "
          f"feature {args.feature} ({tr_f.shape[1]}-d), features in {t_feat:.0f}s")
    for k, v in result.get("knn", {}).items():
        print(f"  k-NN {k:>5}  top-1 {v:6.2f}")
    if "linear" in result:
        print(f"  linear      top-1 {result['linear']['last']:6.2f}  (last epoch; best epoch on test, flatters: "
              f"{result['linear']['best']:.2f})")
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, f"eval.json.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, "eval.json"))
    return result


if __name__ == "__main__":
    common.run_cli(main)
