"""Two diagnostics for bench/learn_cpu.py, where the trained networks fall below random init.

colour: how much of a random network's k-NN comes from colour? The random-init ResNet-18 under
learn_cpu's probe (k-NN k = 20 on 8-patch bags of 16 -> 32 px, 2,000 / 1,000 images) on the
images and on the same images in grey (common.grayscale, 3 equal channels), and a k-NN on raw
8 x 8 thumbnails (mean-centred, cosine) in colour and in grey.

npid: at step 0 of npid_sqrtkl (Feature Calibrate bank of the 10,000 images), the per-sample
gradient on z of CE against lambda * SqrtKL (Eq. 13, lambda 20) for a few temperatures, with
the bank's mean pairwise cosine and covariance spectrum.

    EFFSSL_CIFAR10=cache/cifar10 python bench/learn_cpu_why.py [--what colour,npid]
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import eval_linear  # noqa: E402
import npid_sqrtkl  # noqa: E402


def grey(ds):
    """The same ImageSet in grey: common.grayscale (the augmentation's weights), 3 equal uint8 channels."""
    g = common.grayscale(ds.images.float()).round().clamp(0, 255).to(torch.uint8)
    return common.ImageSet(ds.labels, ds.num_classes, ds.size, g.expand(-1, 3, -1, -1).contiguous())


def thumb_knn(tr, te):
    def f(ds):
        x = F.adaptive_avg_pool2d(ds.images.float() / 255, 8).flatten(1)
        return F.normalize(x - x.mean(1, keepdim=True), dim=1)
    pred = common.knn_predict(f(tr), tr.labels, f(te), tr.num_classes, k=20, t=0.07)
    return (pred == te.labels).float().mean().item() * 100


def colour(data, out):
    tr, te = (common.load_dataset("cifar10", data, s) for s in ("train", "test"))
    tr = tr.subset(common.subset_indices(len(tr), 2000, seed=1))  # eval_linear's --subset / --test-subset
    te = te.subset(common.subset_indices(len(te), 1000, seed=2))
    print(f"8 x 8 thumbnail k-NN, colour: {thumb_knn(tr, te):.2f}, grey: {thumb_knn(grey(tr), grey(te)):.2f}", flush=True)
    load = common.load_dataset
    for to_grey in (False, True):
        common.load_dataset = (lambda *a, **k: grey(load(*a, **k))) if to_grey else load
        try:
            r = eval_linear.main(["--ckpt", "random", "--dataset", "cifar10", "--data-dir", data, "--mode", "bag",
                                  "--patches", "8", "--patch-size", "16", "--out-size", "32", "--probe", "knn",
                                  "--knn-k", "20", "--subset", "2000", "--test-subset", "1000", "--workers", "2",
                                  "--out", os.path.join(out, "grey" if to_grey else "colour")])
        finally:
            common.load_dataset = load
        print(f"random ResNet-18, 8-patch bag k-NN, {'grey' if to_grey else 'colour'}: {r['knn']['k20']:.2f}", flush=True)


def npid(data, n=10000, lam=20.0):
    torch.manual_seed(0)
    ds = common.load_dataset("cifar10", data, "ssl")
    ds = ds.subset(common.subset_indices(len(ds), n))  # learn_cpu's --subset 10000
    mean, std = common.data_stats("cifar10")
    model = npid_sqrtkl.NPIDNet("resnet18", common.default_stem("cifar10", 32), "128")
    bank = npid_sqrtkl.calibrate(model, ds, 32, mean, std, torch.device("cpu"))
    ev = torch.linalg.eigvalsh(torch.cov(bank.T)).flip(0)
    print(f"bank N={n}: mean pairwise cosine {((bank @ bank.T).sum() - n) / (n * n - n):.3f}, covariance trace "
          f"{ev.sum():.4f}, top eigenvalues {', '.join(f'{v:.4f}' for v in ev[:4].tolist())}")
    gen = common.make_generator(0, 0, torch.device("cpu"))
    aug = common.AugConfig(jitter=(0.4,) * 4, p_jitter=1.0, p_gray=0.2, p_blur=0.0, p_solarize=0.0, mean=mean, std=std)
    idx = torch.arange(256)
    x, _ = common.sample_views(ds.get(idx), 1, 32, scale=(0.2, 1.0), generator=gen)
    with torch.no_grad():
        z0 = model.train()(common.augment(x, aug, gen)).float()
    for tau in (0.1, 0.2, 0.5, 1.0):
        z = z0.clone().requires_grad_(True)
        ce, kl, _ = npid_sqrtkl.instance_loss(z, bank, idx, tau)
        g_ce, = torch.autograd.grad(ce.sum(), z, retain_graph=True)
        g_kl, = torch.autograd.grad(lam * kl.sum(), z)
        ratio = (g_kl.norm(dim=1) / g_ce.norm(dim=1)).median()
        cos = F.cosine_similarity(g_ce, g_kl, dim=1).median()
        print(f"tau {tau}: CE {ce.mean():.3f} (log N {torch.tensor(float(n)).log():.3f}), SqrtKL {kl.mean():.5f}, "
              f"median |{lam:g} dSqrtKL/dz| / |dCE/dz| {ratio:.2f}, median cosine {cos:.2f}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--what", default="colour,npid")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "learn_cpu_why"))
    args = p.parse_args()
    data = os.environ.get("EFFSSL_CIFAR10", os.path.join(ROOT, "cache", "cifar10"))
    if not os.path.isdir(data):
        common.fail(f"CIFAR-10 ImageFolder tree '{data}' not found: set EFFSSL_CIFAR10")
    parts = {"colour": lambda: colour(data, args.out), "npid": lambda: npid(data)}
    what = args.what.split(",")
    if set(what) - set(parts):
        common.fail(f"--what takes colour and/or npid, not '{args.what}'")
    for w in what:
        parts[w]()


if __name__ == "__main__":
    common.run_cli(main, training=False)
