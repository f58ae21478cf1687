"""Which reading of NPID + SqrtKL (Cao & Wu 2024, arXiv:2404.19289) lets its lambda 20 train instance
discrimination at least as fast as lambda 0 (Sec. 4.4, Fig. 3b)? Each reading is a flag set of
npid_sqrtkl.py, trained on 10,000 CIFAR-10 images (an ImageFolder copy) at a 16 px input, batch 512
(Sec. 4.1), for --epochs epochs of a 400-epoch cosine (the paper's first epochs: the lr stays 0.1);
every step logs the CE and the instance accuracy (top-1 of the bank softmax on the batch's own rows).
After training, k-NN (k 20, T 0.07) on the central 16 px image, 5,000 train / 1,000 test images,
against a random-init ResNet-18 probed the same way (once per seed).

    EFFSSL_CIFAR10=cache/cifar10 python bench/npid_readings.py --readings paper,lam0 --seeds 0,1
    python bench/npid_readings.py --plot        # curves.png from the rows

Rows go to results/cpu/npid-readings/rows.jsonl (with each run's per-step curve); a reading and
seed already there is skipped, so the script resumes.
"""
import argparse
import glob
import json
import os
import resource
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "results", "cpu", "npid-readings")
READINGS = {  # name: (flags on top of the default recipe, what it reads)
    "paper": ([], "the default: tau 0.1 (NPID), lambda 20, Grad Update from CE, eval-mode calibrate"),
    "lam0": (["--lam", "0"], "the default without SqrtKL (Table 6)"),
    "tau1": (["--temperature", "1"], "Eq. 1 as printed: no temperature, lambda 20"),
    "tau1-lam0": (["--temperature", "1", "--lam", "0"], "Eq. 1 as printed, without SqrtKL"),
    "lam2": (["--lam", "2"], "tau 0.1 with lambda scaled by tau: the gradient balance of tau 1, lambda 20"),
    "bankfull": (["--bank-grad", "full"], "Grad Update from the whole loss CE + lambda SqrtKL (Eq. 13)"),
    "calib-train": (["--calibrate-bn", "train"], "Feature Calibrate with batch statistics"),
    "calib-train-lam0": (["--calibrate-bn", "train", "--lam", "0"], "the same without SqrtKL"),
}


def run(cmd):
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode:
        sys.exit(f"failed ({out.returncode}): {' '.join(cmd)}\n{out.stderr[-2000:]}")
    return out.stdout, time.time() - t0, (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)


def knn(folder, data_dir, extra=()):
    out = os.path.join(folder, "probe")
    run([sys.executable, "eval_linear.py", "--ckpt", folder, "--probe", "knn", "--knn-k", "20", "--mode", "central",
         "--dataset", "cifar10", "--data-dir", data_dir, "--subset", "5000", "--test-subset", "1000", "--workers", "2",
         "--out", out, *extra])
    with open(glob.glob(os.path.join(out, "eval-*.json"))[0]) as f:
        return json.load(f)


def train(name, seed, args, rows):
    flags = READINGS[name][0]
    folder = os.path.join(args.work, f"{name}-s{seed}-b{args.batch_size}")
    shutil.rmtree(folder, ignore_errors=True)
    cmd = [sys.executable, "npid_sqrtkl.py", "--dataset", "cifar10", "--data-dir", args.data_dir, "--subset", "10000",
           "--out-size", "16", "--batch-size", str(args.batch_size), "--epochs", str(args.epochs), "--schedule-epochs", "400",
           "--log-every", "1", "--workers", "2", "--seed", str(seed), "--out", folder, *flags]
    _, wall, cpu = run(cmd)
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        curve = [{k: round(r[k], 4) for k in ("step", "ce", "sqrtkl", "inst_acc")} for r in map(json.loads, f)]
    key = f"random-s{seed}"  # the probe does not depend on the batch
    probe = knn(folder, args.data_dir, [] if key in rows else ["--compare-random"])
    if key not in rows:  # the random-init floor of the probe (same architecture, normalisation, images)
        rows[key] = {"name": key, "seed": seed, "knn_k20": probe["random"]["knn"]["k20"]}
    row = {"name": name, "seed": seed, "batch": args.batch_size, "flags": " ".join(flags), "reads": READINGS[name][1],
           "knn_k20": probe["knn"]["k20"], "wall_min": round(wall / 60, 1), "cpu_min": round(cpu / 60, 1),
           "load": round(os.getloadavg()[0], 2), "date": time.strftime("%Y-%m-%d %H:%M"), "cmd": " ".join(cmd[1:]),
           "curve": curve}
    return row


def plot(rows):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in rows.values():
        if "curve" not in r:
            continue
        s = [c["step"] for c in r["curve"]]
        line = a1.plot(s, [c["inst_acc"] for c in r["curve"]], label=f"{r['name']} s{r['seed']} b{r.get('batch', 512)}",
                       ls="-" if r["seed"] == 0 else "--")[0]
        a2.plot(s, [c["ce"] for c in r["curve"]], color=line.get_color(), ls=line.get_linestyle())
    a1.set(xlabel="step (an epoch of 10,000 images: 19 steps of 512, 78 of 128)", ylabel="instance accuracy %")
    a2.set(xlabel="step", ylabel="CE (log N = 9.21 at tau 0.1 and 1 alike)")
    a1.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, "curves.png"), dpi=90)


def table(rows):
    """The results page's table: per run, CE at steps 1 / lowest / last, instance accuracy (last, highest),
    SqrtKL at the end, k-NN against random init, minutes."""
    print("| reading | flags | batch | seed | CE step 1 / lowest (step) / last | inst. acc. last / max % | SqrtKL last "
          "| k-NN k20 (random) | wall / CPU min (load) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in sorted((r for r in rows.values() if "curve" in r), key=lambda r: (r.get("batch", 512), r["name"], r["seed"])):
        c, low = r["curve"], min(r["curve"], key=lambda x: x["ce"])
        rnd = rows[f"random-s{r['seed']}"]["knn_k20"]
        print(f"| {r['name']} | `{r['flags'] or '(default)'}` | {r.get('batch', 512)} | {r['seed']} | {c[0]['ce']:.3f} / "
              f"{low['ce']:.3f} ({low['step']}) / {c[-1]['ce']:.3f} | {c[-1]['inst_acc']:.1f} / "
              f"{max(x['inst_acc'] for x in c):.1f} | {c[-1]['sqrtkl']:.4f} | {r['knn_k20']:.1f} ({rnd:.1f}) | "
              f"{r['wall_min']} / {r['cpu_min']} ({r['load']}) |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--readings", default="paper,lam0", help=f"comma-separated, of: {', '.join(READINGS)}")
    p.add_argument("--seeds", default="0")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=512, help="the paper's 512 (Sec. 4.1); 128: 78 steps an epoch")
    p.add_argument("--data-dir", default=os.environ.get("EFFSSL_CIFAR10", os.path.join(ROOT, "cache", "cifar10")))
    p.add_argument("--work", default=os.path.join(ROOT, "runs", "npid-readings"))
    p.add_argument("--plot", action="store_true", help="only draw curves.png from rows.jsonl and print the table")
    args = p.parse_args()
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, "rows.jsonl")
    rows = {}
    if os.path.exists(path):
        with open(path) as f:
            rows = {(r["name"] if r["name"].startswith("random") else (r["name"], r["seed"], r.get("batch", 512))): r
                    for r in map(json.loads, f)}
    if not args.plot:
        for seed in map(int, args.seeds.split(",")):
            for name in args.readings.split(","):
                if (name, seed, args.batch_size) in rows:
                    continue
                r = rows[(name, seed, args.batch_size)] = train(name, seed, args, rows)
                print(f"{name} s{seed} b{args.batch_size}: inst_acc {r['curve'][-1]['inst_acc']:.1f} ce {r['curve'][-1]['ce']:.3f} "
                      f"k20 {r['knn_k20']:.2f} (random {rows[f'random-s{seed}']['knn_k20']:.2f}) "
                      f"{r['wall_min']} min, load {r['load']}", flush=True)
                with open(path + ".tmp", "w") as f:
                    f.writelines(json.dumps(v) + "\n" for v in rows.values())
                os.replace(path + ".tmp", path)
    plot(rows)
    table(rows)


if __name__ == "__main__":
    main()
