"""The learning checks of the method scripts: on `synthetic` (common.synthetic_set, the coarse textures), a
short run of a script on its method's recipe (only sizes and the learning rate for the batch changed) must
lift the k-NN accuracy of its backbone above a random init's under the same probe by MARGIN points.

Everything runs in the test's process (the scripts' main() and eval_linear.main()): a subprocess
costs seconds of imports each (5 s under load). The synthetic set of a seed is generated once per test
(a pure function of split and seed: the run and the probe share it); the random-init probe of a seed is
computed once per session and shared by every check that uses it (one probe, one architecture: the same
number).

The probe is one 16 px patch at a fixed position, at the image's own pixel scale (--mode bag --patches 1
--patch-size 16 --out-size 16). The EMP-SSL check is the README's quick start (tests/test_emp_ssl.py) and
NPID's runs its own central probe (tests/test_npid_sqrtkl.py)."""
import functools

import common
import eval_linear
from probe_util import eval_result

SEEDS = (0, 1, 2)
MARGIN = 10.0  # points of k-NN (k 20) accuracy, on every seed
PROBE = ["--dataset", "synthetic", "--arch", "resnet18", "--mode", "bag", "--patches", "1", "--patch-size", "16",
         "--out-size", "16", "--probe", "knn", "--knn-k", "20", "--subset", "500", "--test-subset", "250",
         "--workers", "0"]

_random = {}  # seed -> k20 of the random-init backbone under PROBE


def _probe(ckpt, seed, out):
    eval_linear.main(["--ckpt", str(ckpt), *PROBE, "--seed", str(seed), "--out", str(out)])
    return eval_result(out)["knn"]["k20"]


def random_knn(seed, tmp_path):
    """k-NN accuracy of a random ResNet-18 (eval_linear --ckpt random --seed seed: the same
    torch.manual_seed(seed) draw as the initial backbone of a run with --seed seed) under PROBE."""
    if seed not in _random:
        _random[seed] = _probe("random", seed, tmp_path / f"random{seed}")
    return _random[seed]


def learning_margins(main, argv, tmp_path, monkeypatch, seeds=SEEDS):
    """Train `main` (a script's main) with argv on each seed, probe it and random init under PROBE:
    {seed: (trained, random)} k20 accuracies in %."""
    cached = functools.lru_cache(maxsize=None)(common.synthetic_set)  # about 36 MB a seed: not held for the session
    monkeypatch.setattr(common, "synthetic_set", cached)
    acc = {}
    for s in seeds:
        run = tmp_path / f"run{s}"
        main([*argv, "--dataset", "synthetic", "--seed", str(s), "--out", str(run), "--workers", "0"])
        acc[s] = (_probe(run / "checkpoint.pt", s, tmp_path / f"trained{s}"), random_knn(s, tmp_path))
        print(f"learning check, seed {s}: k20 trained {acc[s][0]:.1f}, random init {acc[s][1]:.1f}", flush=True)
    return acc


def assert_learns(acc, margin=MARGIN):
    """Every seed's trained accuracy clears its random init's by margin points."""
    short = {s: a for s, a in acc.items() if not a[0] > a[1] + margin}
    assert not short, f"trained vs random k20 per seed {acc}: seeds {sorted(short)} within {margin} points"
