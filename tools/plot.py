"""Plot run folders: every logged loss term against step, and the --eval-every k-NN accuracy
against step and against minutes, the runs overlaid, in one PNG (needs matplotlib):

    pip install matplotlib && python tools/plot.py runs/demo [runs/other ...] [--out plot.png]
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
from common import fail  # noqa: E402


def read_metrics(run):
    """(step records, k-NN records) of a run folder's metrics.jsonl."""
    path = os.path.join(run, "metrics.jsonl") if os.path.isdir(run) else run
    if not os.path.isfile(path):
        fail(f"no metrics.jsonl in {run}")
    steps, evals = [], []
    with open(path) as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:
                continue  # a torn last line of a killed run
            (evals if "knn_top1" in r else steps).append(r)
    return steps, evals


def plot_runs(runs, out):
    """One PNG: every logged loss term against step, and the k-NN accuracy against step and
    against minutes, the runs overlaid."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        fail("plot needs matplotlib, an optional dependency: pip install matplotlib")
    data = {os.path.basename(os.path.normpath(r)) or r: read_metrics(r) for r in runs}
    skip = {"epoch", "step", "lr", "patches_per_s", "elapsed_s"}
    terms = sorted({k for s, _ in data.values() for r in s for k in r if k not in skip})
    has_knn = any(e for _, e in data.values())
    panels = [(t, "step") for t in terms] + ([("knn_top1", "step"), ("knn_top1", "minutes")] if has_knn else [])
    if not panels:
        fail("nothing to plot: the metrics hold no logged step")
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (key, x) in zip(axes.flat, panels):
        for name, (steps, evals) in data.items():
            recs = [r for r in (evals if key == "knn_top1" else steps) if key in r]
            xs = [r["step"] if x == "step" else r.get("elapsed_s", 0) / 60 for r in recs]
            ax.plot(xs, [r[key] for r in recs], marker="o" if key == "knn_top1" else None, ms=3, label=name)
        ax.set_xlabel(x)
        ax.set_title("k-NN top-1 (%)" if key == "knn_top1" else key)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main(argv=None):
    p = common.ArgParser(description=__doc__)
    p.add_argument("runs", nargs="+", help="run folders (or metrics.jsonl files), overlaid")
    p.add_argument("--out", default=None, help="PNG path (default: <first run>/plot.png)")
    args = p.parse_args(argv)
    first = args.runs[0] if os.path.isdir(args.runs[0]) else os.path.dirname(args.runs[0]) or "."
    plot_runs(args.runs, args.out or os.path.join(first, "plot.png"))


if __name__ == "__main__":
    common.run_cli(main, training=False)
