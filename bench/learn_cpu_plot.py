"""The picture of bench/learn_cpu.py: k-NN accuracy against training CPU minutes for each method,
with its random-init accuracy as a dashed line, one panel per probe (central 16 px, 8-patch bag).

    python bench/learn_cpu_plot.py [--rows results/cpu/learn_cpu.jsonl] [--out results/cpu/learn_cpu.png]

Needs matplotlib (pip install matplotlib). Takes, for each method and seed, the newest protocol-2 row
trained with bench/learn_cpu.py's current recipe (its flags, a repeated flag's last value winning),
else the newest row: seed 0 solid with markers, other seeds thin lines of the same colour.
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))


def effective(flags):
    """{flag: value} of a flag list, the last occurrence winning (as argparse reads it)."""
    out, key = {}, None
    for tok in flags:
        if tok.startswith("--"):
            key = tok
            out[key] = None
        elif key is not None:
            out[key] = tok
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=os.path.join(ROOT, "results", "cpu", "learn_cpu.jsonl"))
    p.add_argument("--out", default=os.path.join(ROOT, "results", "cpu", "learn_cpu.png"))
    args = p.parse_args()
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("error: the plot needs matplotlib: pip install matplotlib", file=sys.stderr)
        sys.exit(2)
    from learn_cpu import RECIPES
    rows, current = {}, {}
    with open(args.rows) as f:
        for line in f:
            r = json.loads(line)
            if r.get("protocol") != 2:
                continue
            key = (r["method"], r.get("seed", 0))
            recipe = effective(RECIPES.get(r["method"], []) + ["--seed", str(key[1])])
            if effective(r.get("flags", "").split()) == recipe:
                current[key] = r  # the newest row of the current recipe
            rows[key] = r  # the newest row
    rows.update(current)
    if not rows:
        print(f"error: no protocol-2 rows in {args.rows}", file=sys.stderr)
        sys.exit(2)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, probe in zip(axes, ("central", "bag")):
        methods = sorted({m for m, _ in rows})
        for (m, seed), r in sorted(rows.items()):
            c = f"C{methods.index(m)}"
            xs = [0.0] + [pt["cpu_minutes"] for pt in r["curve"]]
            ys = [r["curve"][0][f"{probe}_random"]] + [pt[probe] for pt in r["curve"]]
            if seed == min(s for mm, s in rows if mm == m):
                ax.plot(xs, ys, marker="o", ms=3, color=c, label=m)
                ax.axhline(r["curve"][0][f"{probe}_random"], color=c, ls="--", lw=0.8)
            else:
                ax.plot(xs, ys, color=c, lw=0.8, alpha=0.6)
        ax.set_title(f"{probe} probe ({'whole image at 16 px' if probe == 'central' else '8 patches 16 -> 16 px'})")
        ax.set_xlabel("training CPU minutes (2 cores)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("k-NN k=20 top-1 (%), 2,000 / 1,000 CIFAR-10 images")
    axes[0].legend(fontsize=8, title="dashed: random init; thin: other seeds", title_fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
