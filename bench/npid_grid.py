"""NPID + SqrtKL on real CIFAR-10: which Feature Calibrate BatchNorm mode and colour jitter to default to.

Cao & Wu (2024, arXiv:2404.19289) name neither the BatchNorm mode of Feature Calibrate (Sec. 3.2) nor
a colour jitter of their own (NPID's CIFAR code jitters ColorJitter(0.4, 0.4, 0.4, 0.4) on every
image). This grid trains npid_sqrtkl.py for a fixed number of steps on 10,000 CIFAR-10 training images
at a 16 px input (bench/learn_cpu.py's protocol 2, with a smaller batch and a shorter schedule) for each
of: calibrate mode {train, eval} x jitter {NPID's: 0.4 0.4 0.4 0.4 at p 1; brightness and contrast
only: 0.4 0.4 0 0 at p 0.8} x lambda {0, 20} (Table 6 with and without SqrtKL), and probes each
checkpoint by k-NN (k = 20, T = 0.07) on the central 16 px image, 2,000 train / 1,000 test images,
against a random init of the same architecture under the same probe.

    EFFSSL_CIFAR10=cache/cifar10 python bench/npid_grid.py [--seed 0] [--jobs 2]

Runs go --jobs at a time, each with one thread (accuracy after a fixed number of steps does not
depend on the wall time, so the grid may share the cores); rows go to results/npid_grid.jsonl.
"""
import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JITTER = {"npid": ["--jitter", "0.4", "0.4", "0.4", "0.4", "--p-jitter", "1.0"],
          "bc": ["--jitter", "0.4", "0.4", "0", "0", "--p-jitter", "0.8"]}


def run(cmd, log):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(log, "a") as f:
        subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    with open(log) as f:
        return f.read()


def one(args, calib, jitter, lam, compare_random):
    name = f"calib-{calib}_jitter-{jitter}_lam{lam:g}_seed{args.seed}"
    out = os.path.join(args.work, name)
    log = out + ".log"
    if os.path.exists(log):
        os.remove(log)
    t0 = time.time()
    train = [sys.executable, os.path.join(ROOT, "npid_sqrtkl.py"), "--dataset", "cifar10", "--data-dir", args.data_dir,
             "--subset", "10000", "--workers", "0", "--log-every", "26", "--out", out, "--arch", "resnet18",
             "--out-size", "16", "--batch-size", str(args.batch_size), "--epochs", str(args.epochs),
             "--calibrate-bn", calib, *JITTER[jitter], "--lam", str(lam), "--seed", str(args.seed)]
    if os.path.exists(os.path.join(out, "checkpoint.pt")):
        train.append("--resume")
    run(train, log)
    minutes = (time.time() - t0) / 60
    probe = [sys.executable, os.path.join(ROOT, "eval_linear.py"), "--ckpt", out, "--data-dir", args.data_dir,
             "--mode", "central", "--out-size", "16", "--probe", "knn", "--knn-k", "20", "--subset", "2000",
             "--test-subset", "1000", "--workers", "0"] + (["--compare-random"] if compare_random else [])
    text = run(probe, log)
    path = [x for x in text.splitlines() if x.startswith("wrote ")][-1][len("wrote "):]
    with open(path) as f:
        r = json.load(f)
    ce = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl")) if '"ce"' in x]
    row = {"calibrate_bn": calib, "jitter": jitter, "lam": lam, "seed": args.seed, "steps": ce[-1]["step"],
           "central": round(r["knn"]["k20"], 2), "random": r.get("random", {}).get("knn", {}).get("k20"),
           "ce_first": round(ce[0]["ce"], 3), "ce_last": round(sum(x["ce"] for x in ce[-3:]) / len(ce[-3:]), 3),
           "train_minutes_1thread": round(minutes, 1), "flags": " ".join(train[train.index("--arch"):])}
    print(f"{name}: central {row['central']:.2f}, CE {row['ce_first']:.2f} -> {row['ce_last']:.2f}", flush=True)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=2, help="cosine schedule length (2 x 78 = 156 steps at batch 128)")
    p.add_argument("--calibrate", default="train,eval")
    p.add_argument("--jitters", default="npid,bc")
    p.add_argument("--lams", default="0,20")
    p.add_argument("--data-dir", default=os.environ.get("EFFSSL_CIFAR10", os.path.join(ROOT, "cache", "cifar10")))
    p.add_argument("--work", default=os.path.join(ROOT, "runs", "npid_grid"))
    p.add_argument("--out", default=os.path.join(ROOT, "results", "npid_grid.jsonl"))
    args = p.parse_args()
    if not os.path.isdir(os.path.join(args.data_dir, "train")):
        print(f"error: CIFAR-10 ImageFolder tree not found at {args.data_dir} (set EFFSSL_CIFAR10)", file=sys.stderr)
        sys.exit(2)
    os.makedirs(args.work, exist_ok=True)
    grid = list(itertools.product(args.calibrate.split(","), args.jitters.split(","),
                                  [float(x) for x in args.lams.split(",")]))
    t0 = time.time()
    with ThreadPoolExecutor(args.jobs) as ex:
        rows = list(ex.map(lambda c: one(args, *c[1], compare_random=c[0] == 0), enumerate(grid)))
    rnd = round(next(r["random"] for r in rows if r["random"] is not None), 2)
    date = time.strftime("%Y-%m-%d %H:%M")
    with open(args.out, "a") as f:
        for r in rows:
            r.update(random=rnd, gain=round(r["central"] - rnd, 2), date=date, jobs=args.jobs)
            f.write(json.dumps(r) + "\n")
    print(f"\n{len(rows)} runs in {(time.time() - t0) / 60:.1f} wall min ({args.jobs} at a time, one thread each)")
    print("calibrate  jitter  lambda  steps  central  random   gain  CE first -> last")
    for r in rows:
        print(f"{r['calibrate_bn']:<10} {r['jitter']:<7} {r['lam']:6g} {r['steps']:6d} {r['central']:8.2f} "
              f"{rnd:7.2f} {r['gain']:+6.2f}  {r['ce_first']:.2f} -> {r['ce_last']:.2f}")


if __name__ == "__main__":
    main()
