"""GPU benchmark of EMP-SSL (run on a CUDA GPU).

In one call, on the same patch tensor:
  - EMP-SSL training step throughput (patches/s) at --patches x --batch-size (20 x 100) in
    float32, bf16, bf16 + channels_last, and bf16 + channels_last + torch.compile (--compile);
  - the ceiling: ResNet-18 forward + backward alone in bf16 + channels_last on those patches;
  - the patch pipeline alone (sample_patches + augment) on the GPU;
  - peak memory of one step at 20 and 200 patches (200 with --grad-checkpoint).

    python bench/gpu.py [--compile] [--device cpu --patches 2 --batch-size 8 --iters 2]  # cpu: smoke run
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import emp_ssl  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, iters, device, warmup=2):
    for _ in range(warmup):
        fn()
    sync(device)
    t = time.time()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.time() - t) / iters


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patches", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--memory-patches", default="20,200")
    args = p.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, {args.patches} patches x batch {args.batch_size}")
    torch.backends.cudnn.benchmark = True
    n, B = args.patches, args.batch_size
    imgs = common.synthetic_set("train").images[:B].to(device)
    gen = common.make_generator(0, 0, device)
    aug = common.AugConfig()

    def patches():
        x, _ = common.sample_patches(imgs, n, 16, 32, gen)
        return common.augment(x, aug, gen)

    x = patches()
    t_pipe = timed(patches, args.iters, device)
    print(f"pipeline (sample_patches + augment) {n * B / t_pipe:,.0f} patches/s")

    def step_fn(model, opt, bf16, cl):
        def step():
            xx = x.contiguous(memory_format=torch.channels_last) if cl else x
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                z = model(xx)
            loss, _, _ = emp_ssl.emp_loss(z.float().reshape(n, B, -1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    rows = []
    configs = [("fp32", False, False, False), ("bf16", True, False, False), ("bf16+channels_last", True, True, False)]
    if args.compile:
        configs.append(("bf16+channels_last+compile", True, True, True))
    for label, bf16, cl, comp in configs:
        model = emp_ssl.EMPNet("resnet18", "cifar", "4096-512").to(device)
        if cl:
            model = model.to(memory_format=torch.channels_last)
        opt = common.LARS(model.parameters(), lr=0.3, weight_decay=1e-4)
        fwd = torch.compile(model) if comp else model
        t = timed(step_fn(fwd, opt, bf16, cl), args.iters, device, warmup=3 if comp else 2)
        rows.append((label, n * B / t))
        print(f"EMP-SSL step {label:<28} {n * B / t:10,.0f} patches/s")

    backbone = common.resnet("resnet18", "cifar").to(device).to(memory_format=torch.channels_last)
    xc = x.contiguous(memory_format=torch.channels_last)

    def ceiling():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            h = backbone(xc)
        h.float().sum().backward()

    t_ceil = timed(ceiling, args.iters, device)
    print(f"ceiling: ResNet-18 fwd+bwd bf16+channels_last {n * B / t_ceil:10,.0f} patches/s")
    best = max(r[1] for r in rows)
    print(f"best step / ceiling = {best / (n * B / t_ceil):.2f}; pipeline share of a step = "
          f"{t_pipe / (n * B / best):.2f}")
    if device.type == "cuda":
        for m in [int(v) for v in args.memory_patches.split(",")]:
            for gc in (False, True):
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                try:
                    model = emp_ssl.EMPNet("resnet18", "cifar", "4096-512", grad_checkpoint=gc).to(device)
                    model = model.to(memory_format=torch.channels_last)
                    opt = common.LARS(model.parameters(), lr=0.3, weight_decay=1e-4)
                    xm, _ = common.sample_patches(imgs, m, 16, 32, gen)
                    xm = common.augment(xm, aug, gen).contiguous(memory_format=torch.channels_last)
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        z = model(xm)
                    loss, _, _ = emp_ssl.emp_loss(z.float().reshape(m, B, -1))
                    loss.backward()
                    opt.step()
                    torch.cuda.synchronize()
                    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30
                    print(f"peak memory {m} patches x {B}, grad-checkpoint {gc}: {peak:.1f} GiB")
                except torch.cuda.OutOfMemoryError:
                    print(f"peak memory {m} patches x {B}, grad-checkpoint {gc}: out of memory")
                del model, opt
                xm = z = loss = None


if __name__ == "__main__":
    main()
