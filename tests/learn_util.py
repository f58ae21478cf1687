"""The learning checks of the method scripts: on `synthetic` (common.synthetic_set, the coarse textures), a
short run of a script on its method's recipe (only sizes and the learning rate for the batch changed) must
lift the k-NN accuracy of its backbone above a random init's under the same probe by MARGIN points.

Everything runs in the test's process (the scripts' main() and eval_linear.main()): a subprocess
costs seconds of imports each (5 s under load). The synthetic set of a seed is generated once per test
(a pure function of split and seed: the run and the probe share it); the random-init probe of a seed is
computed once per session and shared by every check that uses it (one probe, one architecture: the same
number).

The probe is one 16 px patch at a fixed position, at the image's own pixel scale (--mode bag --patches 1
--patch-size 16 --out-size 16). Barlow Twins' check still runs on grating_set, the synthetic set until
2026-12-07 (a period-4 or period-9 grating carries the class), with a departure (tests/test_multiaug_ssl.py).
The EMP-SSL check is the README's quick start (tests/test_emp_ssl.py) and
NPID's runs its own central probe (tests/test_npid_sqrtkl.py)."""
import functools
import math

import torch
import torch.nn.functional as F

import common
import eval_linear
from probe_util import eval_result

SEEDS = (0, 1, 2)
MARGIN = 10.0  # points of k-NN (k 20) accuracy, on every seed
PROBE = ["--dataset", "synthetic", "--arch", "resnet18", "--mode", "bag", "--patches", "1", "--patch-size", "16",
         "--out-size", "16", "--probe", "knn", "--knn-k", "20", "--subset", "500", "--test-subset", "250",
         "--workers", "0"]

def grating_set(split, seed=0, n=None):
    """32x32 images whose class is a grating's orientation (5) and period (4 or 9 px); its sign, phase,
    contrast, noise and a smooth random colour field are nuisances."""
    n = n or (10000 if split == "train" else 2000)
    g = torch.Generator().manual_seed(seed * 7919 + (0 if split == "train" else 1))
    labels = torch.arange(n) % 10
    labels = labels[torch.randperm(n, generator=g)]
    theta = (labels % 5).float() * (math.pi / 10) + math.pi / 20
    theta = theta * (torch.randint(0, 2, (n,), generator=g) * 2 - 1)
    period = torch.where(labels < 5, 4.0, 9.0)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    phase = torch.rand(n, generator=g) * 2 * math.pi
    u = xx[None] * torch.cos(theta)[:, None, None] + yy[None] * torch.sin(theta)[:, None, None]
    tex = torch.sin(2 * math.pi * u / period[:, None, None] + phase[:, None, None])
    amp = 0.15 + 0.2 * torch.rand(n, 1, 1, 1, generator=g)
    ctrl = 0.15 + 0.7 * torch.rand(n, 3, 4, 4, generator=g)
    base = F.interpolate(ctrl, size=(32, 32), mode="bicubic", align_corners=True)
    img = base + amp * tex[:, None] + 0.05 * torch.randn(n, 3, 32, 32, generator=g)
    return common.ImageSet(labels, 10, 32, images=(img.clamp(0, 1) * 255).round().to(torch.uint8))


_random = {}  # (data, seed) -> k20 of the random-init backbone under PROBE


def _probe(ckpt, seed, out):
    eval_linear.main(["--ckpt", str(ckpt), *PROBE, "--seed", str(seed), "--out", str(out)])
    return eval_result(out)["knn"]["k20"]


def random_knn(seed, tmp_path, data):
    """k-NN accuracy of a random ResNet-18 (eval_linear --ckpt random --seed seed: the same
    torch.manual_seed(seed) draw as the initial backbone of a run with --seed seed) under PROBE."""
    if (data, seed) not in _random:
        _random[data, seed] = _probe("random", seed, tmp_path / f"random{seed}")
    return _random[data, seed]


def learning_margins(main, argv, tmp_path, monkeypatch, seeds=SEEDS, data=common.synthetic_set):
    """Train `main` (a script's main) with argv on each seed, probe it and random init under PROBE:
    {seed: (trained, random)} k20 accuracies in %. `data` stands for common.synthetic_set (grating_set)."""
    cached = functools.lru_cache(maxsize=None)(data)  # about 36 MB a seed: not held for the rest of the session
    monkeypatch.setattr(common, "synthetic_set", cached)
    return _train_and_probe(main, argv, tmp_path, seeds, data)


def _train_and_probe(main, argv, tmp_path, seeds, data):
    acc = {}
    for s in seeds:
        run = tmp_path / f"run{s}"
        main([*argv, "--dataset", "synthetic", "--seed", str(s), "--out", str(run), "--workers", "0"])
        acc[s] = (_probe(run / "checkpoint.pt", s, tmp_path / f"trained{s}"), random_knn(s, tmp_path, data))
        print(f"learning check, seed {s}: k20 trained {acc[s][0]:.1f}, random init {acc[s][1]:.1f}", flush=True)
    return acc


def assert_learns(acc, margin=MARGIN):
    """Every seed's trained accuracy clears its random init's by margin points."""
    short = {s: a for s, a in acc.items() if not a[0] > a[1] + margin}
    assert not short, f"trained vs random k20 per seed {acc}: seeds {sorted(short)} within {margin} points"
