"""CPU learning benchmark : does each method learn within 15 CPU minutes?

Each method trains on 10,000 CIFAR-10 training images (the shared JPEG copy) for about 200 steps
with its paper optimiser and a batch the CPU allows, then a k-NN probe (k = 20, T = 0.07) on
8-patch bags of 2,000 train / 1,000 test images is run on the trained and on a random-init
backbone. Prints, per method, trained vs random accuracy and the minutes taken.

    EFFSSL_CIFAR10=cache/cifar10 python bench/learn_cpu.py [--methods emp_ssl,bag_ssl] [--out results]

--curve K trains a recipe with --max-steps in segments of K steps (each resumes the last exactly) and probes after each,
giving the accuracy-vs-minutes curve to report when a method falls short. Minutes are wall
clock of training only; "cpu_minutes" is the training processes' user+system CPU time (the
2-core budget is 15 wall minutes = 30 CPU minutes), which other load on the machine inflates less.
The random-init probe depends only on the bag geometry and is run once per geometry.
"""
import argparse
import glob
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# per method: training flags on top of --dataset cifar10 --subset 10000, and the bag patch
# geometry (patch px, input px) used for both the trained and the random-init probe.
RECIPES = {
    # EMP-SSL: paper batch 100, LARS lr 0.3; 8 patches of 16 px, not upsampled; one epoch
    # of the 10,000 images = 100 steps (200 steps did not fit 15 minutes on 2 cores)
    "emp_ssl": (["--batch-size", "100", "--patches", "8", "--patch-size", "16", "--out-size", "16",
                 "--epochs", "1"], (16, 16)),
    # The other methods take 256 views of 32 px a step: on the idle 2-core machine a ResNet-18 step
    # on 256 views takes about 4 s, so 200 steps fill the 15 minutes (results/learn_cpu.md)
    # BagSSL, VICReg loss, ResNet-18, LARS; 2 fixed-scale patches 14 px -> 32, batch 128; the
    # paper's lr 0.3 is for batch 1024, scaled linearly to 0.3 x 128 / 1024
    "bag_ssl": (["--loss", "vicreg", "--arch", "resnet18", "--batch-size", "128", "--epochs", "3",
                 "--max-steps", "200", "--warmup-epochs", "0", "--lr", "0.0375"], (14, 32)),
    # Barlow Twins with 4 views, pdim 256, ResNet-18, Adam (constant lr); batch 64
    "multiaug_ssl": (["--loss", "barlow", "--views", "4", "--pdim", "256", "--arch", "resnet18",
                      "--batch-size", "64", "--epochs", "2", "--max-steps", "200"], (16, 32)),
    # NPID + Feature Calibrate + Grad Update + SqrtKL, ResNet-18, SGD lr 0.1, batch 256
    "npid_sqrtkl": (["--arch", "resnet18", "--batch-size", "256", "--epochs", "6", "--max-steps", "200"], (16, 32)),
}
# Feature Calibrate + Grad Update without SqrtKL (Table 6's row with --lam 0): on synthetic, lambda = 20
# keeps short runs from learning (tests/test_npid_sqrtkl.py); this row shows the same budget without it
RECIPES["npid_no_sqrtkl"] = (RECIPES["npid_sqrtkl"][0] + ["--lam", "0"], RECIPES["npid_sqrtkl"][1])
# plain NPID (Table 6's first row), for the margin the issue asks to report
RECIPES["npid_plain"] = (RECIPES["npid_no_sqrtkl"][0] + ["--no-calibrate", "--no-grad-update"], RECIPES["npid_sqrtkl"][1])
# bag_ssl at the paper's unscaled lr 0.3: the norm and bias parameters take plain SGD steps at lr,
# outside LARS's trust ratio (results/learn_cpu.md); argparse keeps the last --lr
RECIPES["bag_ssl_paper_lr"] = (RECIPES["bag_ssl"][0] + ["--lr", "0.3"], RECIPES["bag_ssl"][1])
SCRIPT = {"npid_plain": "npid_sqrtkl", "npid_no_sqrtkl": "npid_sqrtkl", "bag_ssl_paper_lr": "bag_ssl"}


def _result(out):
    """k20 of the newest eval_linear result file in out (one probe setting per folder here)."""
    files = sorted(glob.glob(os.path.join(out, "eval-*.json")), key=os.path.getmtime)
    if not files:
        return None
    with open(files[-1]) as f:
        return json.load(f)["knn"]["k20"]


def probe(ckpt, data, patch, size, out, arch="resnet18"):
    if ckpt == "random" and _result(out) is not None:  # seeded: the same network
        return _result(out)
    cmd = [sys.executable, os.path.join(ROOT, "eval_linear.py"), "--ckpt", ckpt, "--dataset", "cifar10",
           "--data-dir", data, "--mode", "bag", "--patches", "8", "--patch-size", str(patch), "--out-size", str(size),
           "--probe", "knn", "--knn-k", "20", "--subset", "2000", "--test-subset", "1000", "--out", out,
           "--arch", arch, "--workers", "2"]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return _result(out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="emp_ssl,bag_ssl,multiaug_ssl,npid_sqrtkl,npid_plain")
    p.add_argument("--data-dir", default=os.environ.get("EFFSSL_CIFAR10", os.path.join(ROOT, "cache", "cifar10")))
    p.add_argument("--work", default=os.path.join(ROOT, "runs", "learn_cpu"))
    p.add_argument("--out", default=os.path.join(ROOT, "results"), help="where learn_cpu.jsonl is appended")
    p.add_argument("--curve", type=int, default=0, help="probe every K training steps (accuracy vs minutes)")
    args = p.parse_args()
    if not os.path.isdir(os.path.join(args.data_dir, "train")):
        print(f"error: CIFAR-10 ImageFolder tree not found at {args.data_dir} (set EFFSSL_CIFAR10)", file=sys.stderr)
        sys.exit(2)
    import torch
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    rows = []
    randoms = {}
    for m in args.methods.split(","):
        flags, (patch, size) = RECIPES[m]
        run = os.path.join(args.work, m)
        steps = int(flags[flags.index("--max-steps") + 1]) if "--max-steps" in flags else None
        if (patch, size) not in randoms:
            randoms[patch, size] = probe("random", args.data_dir, patch, size, os.path.join(args.work, f"random_{patch}_{size}"))
        random = randoms[patch, size]
        base = [sys.executable, os.path.join(ROOT, f"{SCRIPT.get(m, m)}.py"), "--dataset", "cifar10",
                "--data-dir", args.data_dir, "--subset", "10000", "--workers", "2", "--log-every", "20",
                "--out", run, *flags]
        ends = list(range(args.curve, steps, args.curve)) + [steps] if args.curve and steps else [None]
        shutil.rmtree(run, ignore_errors=True)  # a run folder holds one run: start this one afresh
        train_s = cpu_s = 0.0
        curve = []
        for i, end in enumerate(ends):
            cmd = base + (["--max-steps", str(end)] if end else []) + (["--resume"] if i else [])
            t0, c0 = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
            subprocess.run(cmd, check=True, cwd=ROOT)
            c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            train_s += time.time() - t0
            cpu_s += (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)
            acc = probe(os.path.join(run, "checkpoint.pt"), args.data_dir, patch, size, run)
            curve.append({"step": end, "train_minutes": round(train_s / 60, 1), "knn20": round(acc, 2)})
            print(f"{m}: step {end}: k-NN {acc:.2f} after {train_s / 60:.1f} min training", flush=True)
        trained = curve[-1]["knn20"]
        row = {"method": m, "trained_knn20": trained, "random_knn20": round(random, 2),
               "gain": round(trained - random, 2), "train_minutes": round(train_s / 60, 1),
               "cpu_minutes": round(cpu_s / 60, 1), "curve": curve if len(curve) > 1 else None,
               "flags": " ".join(flags), "cores": os.cpu_count(), "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d %H:%M")}
        rows.append(row)
        print(f"{m}: k-NN top-1 {trained:.2f} trained vs {random:.2f} random ({trained - random:+.2f}), "
              f"{row['train_minutes']:.1f} min training ({row['cpu_minutes']:.1f} CPU min)", flush=True)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "learn_cpu.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
    print("\nmethod        trained  random   gain  train min  CPU min")
    for r in rows:
        print(f"{r['method']:<13} {r['trained_knn20']:7.2f} {r['random_knn20']:7.2f} {r['gain']:6.2f} "
              f"{r['train_minutes']:10.1f} {r['cpu_minutes']:8.1f}")


if __name__ == "__main__":
    main()
