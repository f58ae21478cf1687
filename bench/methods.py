"""The four methods' training cost side by side: step time and peak memory of each at its paper
recipe on CIFAR-10 shapes, on the machine at hand (the counterpart of the training-cost and
GPU-memory columns of Cao & Wu 2024, arXiv:2404.19289, Table 1, which compares methods at one
batch on one machine).

Rows (each script's own defaults for --dataset cifar10, with the recipe flags below made explicit):
  emp200    emp_ssl.py: ResNet-18, batch 100 x 200 patches of 16 px -> 32 (Tong et al. 2023,
            arXiv:2304.03977, Sec. 3, Table 1)
  emp20     the same with 20 patches (Table 2's other row)
  bag       bag_ssl.py: VICReg, ResNet-34, batch 1024 x 2 patches of 14 px -> 32 (Chen et al. 2022,
            arXiv:2206.08954, App. C.1)
  multiaug  multiaug_ssl.py: Barlow Twins, ResNet-50, batch 256 x 4 views (Ghosh et al. 2024,
            arXiv:2312.10725, Sec. 4.2, App. D)
  npid      npid_sqrtkl.py: ResNet-18, batch 512 x 1 crop, softmax over a bank of 50,000 rows
            (Cao & Wu 2024, Sec. 4.1)
A step is what the script's training loop does each iteration: views sampled and augmented on the
device, forward, loss, backward, optimiser step (and NPID's bank update), built from the method
modules' own models, augmentations and losses. The images are synthetic 32 px (common.synthetic_set):
the cost does not depend on the pixels.

On CUDA: the full recipe, bf16 autocast and channels_last as the scripts run by default; peak memory
is torch.cuda.max_memory_allocated over the step's model, optimiser state, bank and activations (the
image pool excluded). On a CPU the recipes are too slow: --scale F divides every batch by F (at least
2 images; printed beside each row; NPID's bank keeps its 50,000 rows) and the step runs in float32;
peak memory is the growth of the process's resident set (VmHWM after resetting it, less VmRSS before
the model is built), so it counts what the step touches in host memory, not what it allocates.
Per-epoch and per-recipe times scale the measured time per image to 50,000 images and to the
script's default epochs. Ratios are to --ref, side by side.

    python bench/methods.py                       # CUDA if there is one, else the CPU at --scale 50
    python bench/methods.py --device cpu --scale 20 --iters 2 --methods emp20,npid
    python bench/methods.py --smoke               # every row at toy size (a CPU runs it in seconds)
"""
import argparse
import ctypes
import gc
import os
import re
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import bag_ssl  # noqa: E402
import emp_ssl  # noqa: E402
import multiaug_ssl  # noqa: E402
import npid_sqrtkl  # noqa: E402

# row -> (script, the recipe's flags; everything else is the script's default for --dataset cifar10)
ROWS = {
    "emp200": ("emp_ssl", ["--arch", "resnet18", "--batch-size", "100", "--patches", "200"]),
    "emp20": ("emp_ssl", ["--arch", "resnet18", "--batch-size", "100", "--patches", "20"]),
    "bag": ("bag_ssl", ["--loss", "vicreg", "--arch", "resnet34", "--batch-size", "1024", "--patches", "2"]),
    "multiaug": ("multiaug_ssl", ["--loss", "barlow", "--arch", "resnet50", "--batch-size", "256", "--views", "4"]),
    "npid": ("npid_sqrtkl", ["--arch", "resnet18", "--batch-size", "512"]),
}
BANK = 50000  # NPID's memory bank: one row per CIFAR-10 training image
IMAGES = 50000  # a CIFAR-10 epoch


def num(x):
    """A rate to 3 significant digits, thousands separated."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_status():
    """(VmRSS, VmHWM) of this process in bytes, from /proc/self/status; None where there is none."""
    try:
        s = open("/proc/self/status").read()
        return tuple(int(re.search(rf"{k}:\s+(\d+)", s).group(1)) * 1024 for k in ("VmRSS", "VmHWM"))
    except (OSError, AttributeError):
        return None


def reset_host_peak():
    """Return freed heap to the system and reset VmHWM to VmRSS (Linux: clear_refs 5); False where
    the peak cannot be reset."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return host_status() is not None
    except OSError:
        return False


def script_args(module, argv, device):
    """The script's own parsed and resolved arguments for argv (no data is read)."""
    out = os.path.join(tempfile.gettempdir(), f"effssl-methods-{os.getpid()}")  # checked, never written
    argv = ["--dataset", "cifar10", "--out", out] + argv
    if module is emp_ssl:
        args = emp_ssl.resolve_args(emp_ssl.parse_args(argv))
    elif module is bag_ssl:
        args = bag_ssl.resolve_args(argv)
    else:  # multiaug_ssl and npid_sqrtkl resolve their data-dependent defaults in main()
        args = common.resolve_common(module.parse_args(argv), module.__name__)
        args.out_size = args.out_size or common.IMAGE_SIZE["cifar10"]
        args.stem = common.default_stem(args.out_size)
        args.norm_mean, args.norm_std = (list(v) for v in common.data_stats(args.dataset))
    args.channels_last = device.type == "cuda"
    return args


def build(row, args, pool, device, gen):
    """(model, step function, views per step) of one row, from the method module's pieces."""
    B = args.batch_size
    imgs = pool[:B]
    ac = lambda: common.autocast(args, device)  # noqa: E731
    cl = (lambda x: x.contiguous(memory_format=torch.channels_last)) if args.channels_last else (lambda x: x)
    if row.startswith("emp"):
        n = args.patches
        model = emp_ssl.EMPNet(args.arch, args.stem, args.proj, args.grad_checkpoint)
        opt = common.LARS(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, eta=args.eta)
        aug = emp_ssl.augmentation(args)

        def loss_fn():
            x, _ = common.sample_patches(imgs, n, args.patch_size, args.out_size, gen)
            with ac():
                z = model(cl(common.augment(x, aug, gen)))
            return emp_ssl.emp_loss(common.gather_views(z.float(), n).reshape(n, -1, z.shape[1]),
                                    args.eps2, args.inv_weight)[0]
        views = n * B
    elif row == "bag":
        n = args.patches
        model = bag_ssl.BagNet(args.arch, args.stem, args.proj)
        opt = bag_ssl.make_optimizer(model, args)
        augs = bag_ssl.byol_augs(args)

        def loss_fn():
            x, _ = bag_ssl.sample(imgs, args, gen)
            with ac():
                z = model(cl(bag_ssl.augment_views(x, n, augs, gen)))
            return bag_ssl.global_loss(z.float(), None, args)["loss"]
        views = n * B
    elif row == "multiaug":
        M = args.views
        model = multiaug_ssl.MultiViewNet(args.arch, args.stem, args.pdim)
        opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        aug = multiaug_ssl.augmentation(args)

        def loss_fn():
            x, _ = common.sample_views(imgs, M, args.out_size, tuple(args.scale), generator=gen)
            with ac():
                z = model(cl(common.augment(x, aug, gen)))
            return multiaug_ssl.barlow_loss(common.gather_views(z.float(), M).reshape(M, -1, z.shape[1]), args.lam)[0]
        views = M * B
    else:  # npid
        model = npid_sqrtkl.NPIDNet(args.arch, args.stem, args.proj)
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
        aug = npid_sqrtkl.augmentation(args)
        dim = int(args.proj.split("-")[-1])
        bank = F.normalize(npid_sqrtkl.random_bank(args.bank_rows, dim, 0), dim=1).to(device)  # rows as calibrated
        idx = torch.arange(B, device=device)
        state = {}

        def loss_fn():
            # npid_sqrtkl.main's crop: one view of scale (0.2, 1)
            x, _ = common.sample_views(imgs, 1, args.out_size, scale=(0.2, 1.0), generator=gen)
            with ac():
                z = model(cl(common.augment(x, aug, gen)))
            z = z.float()
            ce, kl, lse, H, _ = npid_sqrtkl.instance_loss(z, bank, idx, args.temperature, args.sqrtkl_part,
                                                          args.bank_chunk)
            state["update"] = (z.detach(), lse, H)
            return ce.mean() + args.lam * kl.mean()
        views = B
    model = model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)

    def step():
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if row == "npid":  # Grad Update of the bank rows, as the script after its optimiser step
            z, lse, H = state.pop("update")
            npid_sqrtkl.global_batch_update(bank, z, idx, lse, H, args.temperature, args.bank_momentum,
                                            not args.no_grad_update)
    return model, step, views


def measure(row, a, pool, device):
    """One row: its resolved recipe, the mean step time over a.iters steps after a.warmup, peak memory."""
    module_name, flags = ROWS[row]
    module = sys.modules[module_name]
    args = script_args(module, flags + (["--out-size", "16"] if a.smoke else []), device)
    full_batch = args.batch_size
    args.batch_size = max(2, round(args.batch_size / a.scale))
    if a.smoke:  # toy size: the code path of every row, not its cost
        args.batch_size = 2
        for k in ("patches", "views"):
            if hasattr(args, k):
                setattr(args, k, min(getattr(args, k), 2))
    args.bank_rows = 1000 if a.smoke else BANK
    gen = common.make_generator(0, 0, device)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_ok = reset_host_peak()
        base = host_status()[0] if reset_ok else None
    model, step, views = build(row, args, pool, device, gen)
    for _ in range(a.warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(a.iters):
        step()
    sync(device)
    t = (time.perf_counter() - t0) / a.iters
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = host_status()[1] - base if base is not None else None
    del model, step
    gc.collect()
    per_image = t / args.batch_size
    return dict(row=row, script=module_name, arch=args.arch, batch=args.batch_size, full_batch=full_batch,
                views=views, step_s=t, images_s=args.batch_size / t, views_s=views / t,
                epoch_min=per_image * IMAGES / 60, epochs=args.epochs,
                recipe_h=per_image * IMAGES * args.epochs / 3600, peak=peak)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(ROWS), help=f"comma list of rows ({', '.join(ROWS)})")
    p.add_argument("--ref", default="npid", help="the row the ratios are taken to (default npid)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--scale", type=float, default=None,
                   help="divide every batch by F (default: 1 on CUDA, 50 on a CPU)")
    p.add_argument("--iters", type=int, default=None, help="timed steps per row (default: 10 on CUDA, 2 on a CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 3 on CUDA, 1 on a CPU)")
    p.add_argument("--smoke", action="store_true",
                   help="every row at toy size (batch 2, 2 views of 16 px, bank 1,000), 1 step")
    a = p.parse_args(argv)
    rows = [r for r in a.methods.split(",") if r]
    if not rows or set(rows) - set(ROWS):
        p.error(f"--methods: unknown {sorted(set(rows) - set(ROWS))}; rows: {', '.join(ROWS)}")
    if a.ref not in rows:
        p.error(f"--ref {a.ref} is not among --methods")
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    a.scale = a.scale or (1.0 if cuda else 50.0)
    a.iters = 1 if a.smoke else (a.iters or (10 if cuda else 2))
    a.warmup = 0 if a.smoke else (a.warmup if a.warmup is not None else (3 if cuda else 1))
    if a.scale < 1 or a.iters < 1 or a.warmup < 0:
        p.error("--scale must be at least 1, --iters at least 1, --warmup at least 0")
    torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    memory = ("torch.cuda.max_memory_allocated, model + optimiser + bank + activations, bf16 + channels_last"
              if cuda else "growth of the resident set (VmHWM - VmRSS before the model), float32")
    print(f"device {name}, torch {torch.__version__}; batch / {a.scale:g}; {a.warmup} warm-up + {a.iters} timed "
          f"steps a row{'; --smoke: toy sizes' if a.smoke else ''}", flush=True)
    print(f"peak memory: {memory}", flush=True)
    pool = common.synthetic_set("train", n=1024).images.to(device)
    results = []
    for row in rows:
        try:
            r = measure(row, a, pool, device)
        except torch.cuda.OutOfMemoryError:
            print(f"row {row}: out of memory", flush=True)
            continue
        results.append(r)
        mem = f"{r['peak'] / 2 ** 20:,.0f} MiB" if r["peak"] is not None else "n/a"
        print(f"row {row:<8} {r['script']:<12} {r['arch']:<9} batch {r['batch']:>4} (recipe {r['full_batch']}, "
              f"scale {a.scale:g}) {r['views']:>6} views: step {r['step_s']:.3f} s, {num(r['images_s'])} images/s, "
              f"{num(r['views_s'])} views/s, peak {mem}", flush=True)
    ref = next((r for r in results if r["row"] == a.ref), None)
    print(f"\n{'row':<9}{'scale':>6}{'batch':>7}{'views/step':>11}{'step_s':>9}{'images/s':>10}{'epoch_min':>11}"
          f"{'epochs':>7}{'recipe_h':>10}{'peak_MiB':>10}{'time/' + a.ref:>12}{'epoch/' + a.ref:>12}"
          f"{'mem/' + a.ref:>11}", flush=True)
    for r in results:
        def ratio(k):
            if ref is None or r[k] is None or not ref[k]:
                return "n/a"
            return f"{r[k] / ref[k]:.2f}"
        mem = f"{r['peak'] / 2 ** 20:,.0f}" if r["peak"] is not None else "n/a"
        print(f"{r['row']:<9}{a.scale:>6g}{r['batch']:>7}{r['views']:>11}{r['step_s']:>9.3f}{num(r['images_s']):>10}"
              f"{r['epoch_min']:>11.2f}{r['epochs']:>7}{r['recipe_h']:>10.2f}{mem:>10}{ratio('step_s'):>12}"
              f"{ratio('epoch_min'):>12}{ratio('peak'):>11}", flush=True)
    print("step_s: one training step at the row's batch; epoch_min: 50,000 images at the measured time per image; "
          "recipe_h: that times the script's default epochs; time/, epoch/, mem/: the row over --ref", flush=True)
    return results


if __name__ == "__main__":
    main()
