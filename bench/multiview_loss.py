"""Cost of the multi-view loss in the number of views M (multiaug_ssl.py, Eq. 10, Sec. 3.4).

Eq. (10) pulls every view towards the mean view, so its invariance term costs O(M); comparing all
view pairs, the straightforward extension of Barlow Twins / VICReg, costs O(M^2). On fixed
embeddings (B = 256 images, pdim 256) this times forward + backward of both, side by side in one
run, for M = 2, 4, 8, 16, and prints each as a ratio to its own M = 2 time.

    python bench/multiview_loss.py [--batch 256] [--pdim 256] [--repeats 5] [--threads 1] [--device cpu|cuda]
"""
import argparse
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import multiaug_ssl as ma  # noqa: E402


def barlow_all_pairs(Z, lam):
    """Barlow Twins on every view pair a < b (C_ab = Z_a^T Z_b / B), averaged: O(M^2) D x D products."""
    M, B, D = Z.shape
    Z = F.normalize(Z, dim=-1)
    flat = Z.reshape(M * B, D)
    Z = ((flat - flat.mean(0)) / flat.std(0)).reshape(M, B, D)
    a, b = torch.triu_indices(M, M, 1)
    C = Z[a].transpose(1, 2) @ Z[b] / B  # [pairs, D, D]
    inv = (torch.diagonal(C, dim1=1, dim2=2) - 1).pow(2).sum()
    red = ma.off_diagonal(C).pow(2).sum()
    return (inv + lam * red) / len(a)


def vicreg_all_pairs(Z, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0):
    """VICReg with the invariance over every view pair a < b (O(M^2) differences), variance and
    covariance once per view (O(M)), as a multi-view VICReg without the mean view would be."""
    M, B, D = Z.shape
    a, b = torch.triu_indices(M, M, 1)
    inv = (Z[a] - Z[b]).pow(2).mean((1, 2)).mean()
    var = F.relu(1 - torch.sqrt(Z.var(1) + 1e-4)).mean()
    Zc = Z - Z.mean(1, keepdim=True)
    cov = (ma.off_diagonal(Zc.transpose(1, 2) @ Zc / (B - 1)).pow(2).sum(-1) / D).mean()
    return sim_coeff * inv + std_coeff * var + cov_coeff * cov


def timed(fn, Z, repeats, device):
    """Fastest of `repeats` forward + backward passes (the least disturbed by other load)."""
    times = []
    for r in range(repeats + 1):  # the first call warms up
        z = Z.detach().requires_grad_()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn(z).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if r:
            times.append(time.perf_counter() - t)
    return min(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--pdim", type=int, default=256)
    p.add_argument("--views", default="2,4,8,16")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (default 1: on a shared machine, multi-threaded timings of these small "
                        "matrix products stall on other processes)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    views = [int(v) for v in args.views.split(",")]
    g = torch.Generator().manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"multi-view loss, forward + backward, B={args.batch}, pdim={args.pdim}, device {device} ({name})")
    print("ratios to M=2 of the same loss; absolute ms are for this machine only")
    losses = {
        "barlow": (lambda Z: ma.barlow_loss(Z, 0.01)[0], lambda Z: barlow_all_pairs(Z, 0.01)),
        "vicreg": (lambda Z: ma.vicreg_loss(Z)[0], vicreg_all_pairs),
    }
    for kind, (ours, pairs) in losses.items():
        print(f"\n{kind:6s} {'M':>3s} | {'mean-view Eq.10 (O(M))':>24s} | {'all pairs (O(M^2))':>24s} | pairs")
        base = None
        for M in views:
            Z = torch.randn(M, args.batch, args.pdim, generator=g).to(device)
            t_ours, t_pairs = timed(ours, Z, args.repeats, device), timed(pairs, Z, args.repeats, device)
            base = base or (t_ours, t_pairs)
            print(f"{'':6s} {M:3d} | {t_ours * 1e3:9.2f} ms  x{t_ours / base[0]:6.2f}    | "
                  f"{t_pairs * 1e3:9.2f} ms  x{t_pairs / base[1]:6.2f}    | {M * (M - 1) // 2}")


if __name__ == "__main__":
    main()
