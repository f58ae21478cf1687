"""GPU benchmark of EMP-SSL (run on a CUDA GPU).

In one call, on the same patch tensor:
  - EMP-SSL training step throughput (patches/s) at --patches x --batch-size (20 x 100) in
    float32, bf16, bf16 + channels_last, and bf16 + channels_last + torch.compile (--compile);
  - the ceiling: ResNet-18 forward + backward alone in bf16 + channels_last on those patches;
  - the patch pipeline alone (sample_patches + augment) on the GPU;
  - peak memory and throughput of a step at 20 and 200 patches, with and without
    --grad-checkpoint, and the 50,000-image CIFAR-10 epoch time that throughput gives;
  - --pipeline-rows: for EMP-SSL at 20 and 200 patches, BagSSL's and multiaug's views, side by side
    in one call, the training step alone (on views made once), the view pipeline alone (sampling +
    augmentation), the training step with the pipeline, their ratio (the target: 0.9 or more), and
    the host-device syncs torch.cuda.set_sync_debug_mode counts in one step with the pipeline.

    python bench/gpu.py [--compile] [--compile-pipeline]
    python bench/gpu.py --smoke                                           # every row at toy size (CPU too)
    python bench/gpu.py --configs bf16+channels_last+compile --memory-patches ""       # compile alone
"""
import argparse
import os
import sys
import time
import types
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import bag_ssl  # noqa: E402
import emp_ssl  # noqa: E402
import multiaug_ssl  # noqa: E402


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
    p.add_argument("--compile", action="store_true", help="add the bf16+channels_last+compile config")
    p.add_argument("--configs", default="fp32,bf16,bf16+channels_last",
                   help="comma list of fp32, bf16, bf16+channels_last, bf16+channels_last+compile")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--memory-patches", default="20,200", help="comma list; empty: no memory rows")
    p.add_argument("--memory-iters", type=int, default=3, help="timed steps of each memory row (after one)")
    p.add_argument("--pipeline-rows", default="emp20,emp200,bag,multiaug", help="comma list; empty: none")
    p.add_argument("--compile-pipeline", action="store_true", help="torch.compile the view pipeline too")
    p.add_argument("--smoke", action="store_true", help="every row at toy size, 1 iteration (a CPU can run it)")
    args = p.parse_args()
    if args.smoke:
        args.patches, args.batch_size, args.iters, args.configs, args.memory_patches = 2, 4, 1, "fp32", "2"
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, {args.patches} patches x batch {args.batch_size}", flush=True)
    torch.backends.cudnn.benchmark = True
    n, B = args.patches, args.batch_size
    imgs = common.synthetic_set("train").images[:max(B, 1024)].to(device)
    pipeline_rows(args, imgs, device)
    imgs = imgs[:B]
    gen = common.make_generator(0, 0, device)
    aug = common.AugConfig()

    def patches():
        x, _ = common.sample_patches(imgs, n, 16, 32, gen)
        return common.augment(x, aug, gen)

    x = patches()
    t_pipe = timed(patches, args.iters, device)
    print(f"pipeline (sample_patches + augment) {n * B / t_pipe:,.0f} patches/s", flush=True)

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
    known = {"fp32": (False, False, False), "bf16": (True, False, False), "bf16+channels_last": (True, True, False),
             "bf16+channels_last+compile": (True, True, True)}
    names = [c for c in args.configs.split(",") if c] + (["bf16+channels_last+compile"] if args.compile else [])
    if set(names) - set(known):
        p.error(f"--configs: unknown {sorted(set(names) - set(known))}; known: {', '.join(known)}")
    configs = [(c, *known[c]) for c in dict.fromkeys(names)]
    for label, bf16, cl, comp in configs:
        model = emp_ssl.EMPNet("resnet18", "cifar", "4096-512").to(device)
        if cl:
            model = model.to(memory_format=torch.channels_last)
        opt = common.LARS(model.parameters(), lr=0.3, weight_decay=1e-4)
        fwd = torch.compile(model) if comp else model
        step = step_fn(fwd, opt, bf16, cl)
        try:
            t0 = time.time()
            step()  # the first step (compiles under torch.compile)
            sync(device)
            first = time.time() - t0
            t = timed(step, args.iters, device, warmup=2)
        except Exception as e:  # a compile failure leaves the other rows standing
            print(f"EMP-SSL step {label:<28} failed: {e.__class__.__name__}: {str(e).splitlines()[0][:200]}", flush=True)
            continue
        rows.append((label, n * B / t))
        print(f"EMP-SSL step {label:<28} {n * B / t:10,.0f} patches/s (first step {first:.1f} s)", flush=True)

    backbone = common.backbone("resnet18", "cifar").to(device).to(memory_format=torch.channels_last)
    xc = x.contiguous(memory_format=torch.channels_last)

    def ceiling():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            h = backbone(xc)
        h.float().sum().backward()

    t_ceil = timed(ceiling, args.iters, device)
    print(f"ceiling: ResNet-18 fwd+bwd bf16+channels_last {n * B / t_ceil:10,.0f} patches/s", flush=True)
    for label, rate in rows:
        print(f"{label} step / ceiling = {rate / (n * B / t_ceil):.2f}; pipeline time / step time = "
              f"{t_pipe / (n * B / rate):.2f}", flush=True)
    if device.type == "cuda":
        for m in [int(v) for v in args.memory_patches.split(",") if v]:
            for gc in (False, True):
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                try:
                    model = emp_ssl.EMPNet("resnet18", "cifar", "4096-512", grad_checkpoint=gc).to(device)
                    model = model.to(memory_format=torch.channels_last)
                    opt = common.LARS(model.parameters(), lr=0.3, weight_decay=1e-4)
                    xm, _ = common.sample_patches(imgs, m, 16, 32, gen)
                    xm = common.augment(xm, aug, gen).contiguous(memory_format=torch.channels_last)

                    def mstep():
                        with torch.autocast("cuda", dtype=torch.bfloat16):
                            z = model(xm)
                        loss, _, _ = emp_ssl.emp_loss(z.float().reshape(m, B, -1))
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()

                    t = timed(mstep, args.memory_iters, device, warmup=1)
                    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30
                    print(f"peak memory {m} patches x {B}, grad-checkpoint {gc}: {peak:.1f} GiB; "
                          f"{m * B / t:,.0f} patches/s, a 50,000-image epoch in {50000 / B * t / 60:.1f} min "
                          f"(bf16+channels_last, patches made once)", flush=True)
                except torch.cuda.OutOfMemoryError:
                    print(f"peak memory {m} patches x {B}, grad-checkpoint {gc}: out of memory")
                model = opt = xm = None


def pipeline_rows(args, imgs, device):
    """Each method's step alone, its view pipeline alone and the step with the pipeline, side by side."""
    cl = device.type == "cuda"
    for row in [r for r in args.pipeline_rows.split(",") if r]:
        gen = common.make_generator(0, 0, device)
        if row.startswith("emp"):  # EMP-SSL: n patches of 16 px -> 32, VICReg's augmentations, batch 100
            n, B = (2, args.batch_size) if args.smoke else (int(row[3:]), 100)
            model, aug = emp_ssl.EMPNet("resnet18", "cifar", "4096-512"), common.AugConfig()

            def views():
                return common.augment(common.sample_patches(imgs[:B], n, 16, 32, gen)[0], aug, gen)

            def loss_of(z):
                return emp_ssl.emp_loss(z.float().reshape(n, B, -1))[0]
        elif row == "bag":  # BagSSL: 2 patches of 14 px -> 32, BYOL's augmentations per view, VICReg, batch 1024
            n, B = 2, args.batch_size if args.smoke else 1024
            a = types.SimpleNamespace(loss="vicreg", sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0, blur=False,
                                      norm_mean=[0.5] * 3, norm_std=[0.25] * 3)
            model, augs = bag_ssl.BagNet("resnet18", "cifar", "4096-128"), bag_ssl.byol_augs(a)

            def views():
                return bag_ssl.augment_views(common.sample_patches(imgs[:B], n, 14, 32, gen)[0], n, augs, gen)

            def loss_of(z):
                return bag_ssl.bag_loss(z.float().reshape(n, B, -1), None, a)["loss"]
        elif row == "multiaug":  # 4 random resized crops at 32 px, the authors' CIFAR augmentation, batch 128
            n, B = (2, args.batch_size) if args.smoke else (4, 128)
            model = multiaug_ssl.MultiViewNet("resnet18", "cifar", 256)
            aug = common.AugConfig(jitter=(0.4, 0.4, 0.4, 0.0), p_blur=0.0, p_solarize=0.0)

            def views():
                return common.augment(common.sample_views(imgs[:B], n, 32, (0.08, 1.0), generator=gen)[0], aug, gen)

            def loss_of(z):
                return multiaug_ssl.barlow_loss(z.float().reshape(n, B, -1), 0.01)[0]
        else:
            print(f"pipeline row {row}: unknown (emp<N>, bag, multiaug)", flush=True)
            continue
        model = model.to(device).to(memory_format=torch.channels_last) if cl else model.to(device)
        opt = common.LARS(model.parameters(), lr=0.1, weight_decay=1e-4)
        make = torch.compile(views) if args.compile_pipeline else views

        def step(x):
            x = x.contiguous(memory_format=torch.channels_last) if cl else x
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cl):
                z = model(x)
            loss = loss_of(z)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        try:
            x0 = make()
            t_step = timed(lambda: step(x0), args.iters, device)
            t_pipe = timed(make, args.iters, device)
            t_both = timed(lambda: step(make()), args.iters, device)
            syncs = "n/a (CPU)"
            if device.type == "cuda":
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode("warn")
                    step(make())
                    torch.cuda.set_sync_debug_mode("default")
                found = [str(w.message).splitlines()[0][:80] for w in caught if "synchron" in str(w.message)]
                syncs = f"{len(found)}" + (f" (first: {found[0]})" if found else "")
        except torch.cuda.OutOfMemoryError:
            print(f"pipeline row {row}: out of memory", flush=True)
            continue
        P = n * B
        print(f"pipeline row {row:<9} {n} views x {B}: step alone {P / t_step:10,.0f} patches/s, pipeline alone "
              f"{P / t_pipe:10,.0f}, step with pipeline {P / t_both:10,.0f}; with / alone = {t_step / t_both:.2f}; "
              f"syncs in a step with the pipeline: {syncs}", flush=True)
        model = opt = x0 = None


if __name__ == "__main__":
    main()
