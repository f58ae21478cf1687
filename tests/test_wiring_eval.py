"""Tests that catch a wrong wire in eval_linear.py (issue "Tests that catch a wrong wire"): a probe flag that
does not reach the computation that uses it, or reaches it in another flag's place. At the defaults most such
bugs are invisible (a dropped flag falls back to the default it was meant to be), so the real eval_linear.main
runs here on a checkpoint trained for one step (emp_ssl.py on the synthetic set) with EVERY probe setting set to
its own number, none equal to another or to a default (test_every_probe_flag_is_set_distinct_and_non_default
holds that list to parse_args: a new flag fails it until it is covered), and spies record what the computation
received: the optimiser's hyper-parameters at every step, the schedule's horizon and milestones in steps, the
loss's label smoothing and batch sizes, k-NN's k and T, the patch boxes, crop sizes and counts, the views and
their augmentation, the subsets and the seeds. The last tests hold the defaults to the papers, with sections."""
import functools
import math
import os

import pytest
import torch
import torch.nn.functional as F

import common
import emp_ssl
import eval_linear
import wiring_util

spy = functools.partial(wiring_util.spy, flat=True)  # each call: {parameter: argument, ..., "returned": ...}

N_TRAIN, N_TEST = 200, 60  # the synthetic splits of these tests (smaller than the real ones: faster to make)
# the checkpoint's run (a small backbone, for speed): its patch side and input side are the probe's defaults
# for --patch-size and --out-size
RUN = dict(arch="mobilenet_v3_small", patch_size=15, out_size=18, proj="26-19")
# the patch augmentation the checkpoint's run saved (--bag-augment applies it): off AugConfig's defaults, which are
# EMP-SSL's, so that the probe's own default in its place shows
RUN_AUG = dict(flip=0.45, jitter=[0.3, 0.25, 0.2, 0.05], p_jitter=0.65, p_gray=0.35, p_blur=0.15,
               blur_sigma=[0.2, 1.5], p_solarize=0.05)
# every numeric probe setting, each its own number (none equal to another, to a default or to RUN's)
PROBE = dict(patches=2, views=3, stride=5, linear_batch=6, knn_k="7,9", batch_size=8, patch_size=10,
             test_subset=11, linear_epochs=12, subset=13, out_size=14, seed=17, knn_t=0.21, linear_lr=0.37,
             linear_wd=0.0023, label_smoothing=0.13)
# choices and switches: each is off its default in at least one test below
SWITCHES = dict(mode="views", positions="random", bag_augment=True, feature="head1", probe="knn", linear_aug=True,
                linear_opt="adam", amp="off", compare_random=True)
# what the probe is run on, not how it probes
NOT_PROBE = {"ckpt", "arch", "dataset", "data_dir", "download", "image_size", "train_dataset", "workers", "out"}
BATCHES = [6, 6, 1] * 12  # the linear probe's: --subset in --linear-batch (the last not dropped), --linear-epochs
STEPS = len(BATCHES)  # 36
TRAIN_BATCHES, TEST_BATCHES = [8, 5], [8, 3]  # feature extraction: --subset, --test-subset in --batch-size
_REAL_SYNTHETIC, _SYNTHETIC = common.synthetic_set, {}


def _small_synthetic_set(split, seed=0, n=None):
    """The synthetic set at N_TRAIN / N_TEST images per split, each made once (its content is not under test)."""
    key = (split, seed, n or (N_TRAIN if split == "train" else N_TEST))
    if key not in _SYNTHETIC:
        _SYNTHETIC[key] = _REAL_SYNTHETIC(*key)
    return _SYNTHETIC[key]


@pytest.fixture(autouse=True)
def small_synthetic(monkeypatch):
    """Every probe of this file reads the small synthetic splits."""
    monkeypatch.setattr(common, "synthetic_set", _small_synthetic_set)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A one-step EMP-SSL run on the synthetic set, with an architecture, patch side, input side and projector of
    its own (shared by the tests, which only read it)."""
    out = tmp_path_factory.mktemp("wiring_eval") / "run"
    with pytest.MonkeyPatch.context() as m:
        m.setattr(common, "synthetic_set", _small_synthetic_set)
        emp_ssl.main(["--dataset", "synthetic", "--subset", "32", "--batch-size", "16", "--patches", "2", "--epochs",
                      "1", "--max-steps", "1", "--workers", "0", "--arch", RUN["arch"], "--patch-size",
                      str(RUN["patch_size"]), "--out-size", str(RUN["out_size"]), "--proj", RUN["proj"], "--out",
                      str(out)])
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    ckpt["probe"]["aug"].update(RUN_AUG)
    torch.save(ckpt, out / "checkpoint.pt")
    return out


@pytest.fixture(scope="module")
def dim(ckpt):
    """The width of the run's backbone embedding."""
    return common.backbone(RUN["arch"], run_info(ckpt)["stem"]).dim


def run_probe(ckpt, out, **over):
    """eval_linear.main on the checkpoint with PROBE's flags, changed by `over` (True: a switch on)."""
    argv = ["--ckpt", str(ckpt), "--workers", "0", "--out", str(out)]
    for dest, v in {**PROBE, **over}.items():
        flag = "--" + dest.replace("_", "-")
        argv += [flag] if v is True else [] if v is False else [flag, str(v)]
    return eval_linear.main(argv)


def recording(cls, made):
    """A subclass of an optimiser or lr schedule that records itself, its first parameters and, for an optimiser,
    its param group as each step() reads it (lr as the schedule set it)."""
    class Recording(cls):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.at_step = []
            if isinstance(self, torch.optim.Optimizer):
                self.initial = [p.detach().clone() for g in self.param_groups for p in g["params"]]
            made.append(self)

        def step(self, *a, **k):
            if isinstance(self, torch.optim.Optimizer):
                self.at_step.append({key: v for key, v in self.param_groups[0].items() if key != "params"})
            return super().step(*a, **k)
    Recording.__name__ = Recording.__qualname__ = cls.__name__
    return Recording


def record_training(monkeypatch):
    """Spies on the linear probe: optimisers, lr schedules, the loss."""
    opts, scheds = [], []
    for name in ("SGD", "Adam"):
        monkeypatch.setattr(torch.optim, name, recording(getattr(torch.optim, name), opts))
    for name in ("CosineAnnealingLR", "MultiStepLR"):
        monkeypatch.setattr(torch.optim.lr_scheduler, name, recording(getattr(torch.optim.lr_scheduler, name), scheds))
    return opts, scheds, spy(monkeypatch, F, "cross_entropy")


def plain(cfg):
    """An AugConfig (or its vars(), as a checkpoint saves it) with lists for tuples, to compare."""
    d = cfg if isinstance(cfg, dict) else vars(cfg)
    return {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in d.items()}


def run_info(ckpt):
    """The probe info the checkpoint's run saved (its normalisation, its patch augmentation)."""
    return torch.load(ckpt / "checkpoint.pt", weights_only=True)["probe"]


def cosine(s, horizon, base):
    """CosineAnnealingLR to 0 at 0-based step s of a horizon in steps."""
    return base * 0.5 * (1 + math.cos(math.pi * s / horizon))


def assert_sgd(opt, lrs, wd):
    """One SGD step per lr in lrs, momentum 0.9 (no Nesterov, no dampening) and weight decay wd at each."""
    assert type(opt).__name__ == "SGD" and len(opt.at_step) == len(lrs), (type(opt).__name__, len(opt.at_step))
    assert [g["lr"] for g in opt.at_step] == pytest.approx(lrs, rel=1e-9, abs=1e-12)
    hyper = {(g["momentum"], g["weight_decay"], g["nesterov"], g["dampening"]) for g in opt.at_step}
    assert hyper == {(0.9, wd, False, 0)}, hyper


def assert_linear_layer_seeded(opt, dim, seed):
    """The linear layer's initial weights are nn.Linear(dim, 10) drawn after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    ref = torch.nn.Linear(dim, 10)
    assert len(opt.initial) == 2 and all(torch.equal(a, b) for a, b in zip(opt.initial, (ref.weight, ref.bias)))


def assert_losses(losses, batches, smoothing):
    assert [c["input"].shape[0] for c in losses] == batches, [c["input"].shape[0] for c in losses]
    assert {c["label_smoothing"] for c in losses} == {smoothing} and {c["input"].shape[1] for c in losses} == {10}


def assert_subsets(calls):
    """--subset of the train split (seed 1), --test-subset of the test split (seed 2)."""
    assert [(c["n"], c["k"], c["seed"]) for c in calls] == [(N_TRAIN, 13, 1), (N_TEST, 11, 2)]


def assert_knn(calls, n_train=13, n_test=11, ks=(7, 9), t=0.21):
    assert [c["k"] for c in calls] == list(ks) and {c["t"] for c in calls} == {t}
    assert {(len(c["train_f"]), len(c["train_y"]), len(c["test_f"]), c["num_classes"]) for c in calls} == {
        (n_train, n_train, n_test, 10)}


# --- the list of flags --------------------------------------------------------------------------------------


def test_every_probe_flag_is_set_distinct_and_non_default():
    """PROBE and SWITCHES cover every probe flag of parse_args (a flag added later fails here until a test
    below sets it); every number differs from every other, from RUN's sizes and from every default number
    (a value passed in another's place, or dropped for its default, changes what the spies see)."""
    d = vars(eval_linear.parse_args(["--ckpt", "x"]))
    covered = set(PROBE) | set(SWITCHES)
    assert set(d) - NOT_PROBE == covered, sorted((set(d) - NOT_PROBE) ^ covered)
    nums = [float(x) for v in PROBE.values() for x in str(v).split(",")]
    nums += [float(x) for x in (RUN["patch_size"], RUN["out_size"], *RUN["proj"].split("-"))]
    assert len(nums) == len(set(nums)), sorted(x for x in nums if nums.count(x) > 1)
    defaults = {float(x) for v in d.values() if isinstance(v, (int, float, str)) and not isinstance(v, bool)
                for x in str(v).split(",") if x.replace(".", "").replace("e-", "").isdigit()}
    defaults |= {float(x) for row in eval_linear.LINEAR.values() for x in row}
    assert {20.0, 200.0, 0.07, 128.0, 16.0, 4.0, 256.0, 0.03, 512.0} <= defaults  # the scan sees the defaults
    assert not set(nums) & defaults, sorted(set(nums) & defaults)
    for k, v in SWITCHES.items():
        assert v != d[k], k


# --- every flag reaches the computation ---------------------------------------------------------------------


def test_bag_probe_with_sgd_receives_every_flag(ckpt, dim, tmp_path, monkeypatch):
    """Catches: --linear-wd passed as the lr (or the lr as the wd), SGD without momentum 0.9, the cosine over
    epochs instead of steps (T_max 12, not 36) or not stepped, --label-smoothing dropped for 0, --linear-batch
    taken from --batch-size, --linear-epochs not reaching the loop, the linear layer not drawn from --seed;
    --patches, --patch-size, --out-size swapped or dropped for the run's sizes in the bag; fixed positions not
    drawn from --seed; --bag-augment dropped or given the default VICReg config instead of the run's;
    --batch-size not batching the extraction; --subset and --test-subset swapped; --knn-k or --knn-t dropped
    or swapped; the result file not named after the setting (--amp off, --seed, the subsets)."""
    opts, scheds, losses = record_training(monkeypatch)
    subsets = spy(monkeypatch, common, "subset_indices")
    fixed = spy(monkeypatch, common, "fixed_patch_boxes")
    bags = spy(monkeypatch, common, "bag_of_features")
    knn = spy(monkeypatch, common, "knn_predict")
    r = run_probe(ckpt, tmp_path / "res", mode="bag", positions="fixed", bag_augment=True, probe="linear,knn",
                  amp="off")

    assert_subsets(subsets)
    assert [(c["n"], c["size"], c["image_size"], c["seed"]) for c in fixed] == [(2, 10, 32, 17)] * 2
    run_aug = plain(run_info(ckpt)["aug"])
    assert {k: run_aug[k] for k in RUN_AUG} == RUN_AUG
    assert [c["images"].shape[0] for c in bags] == TRAIN_BATCHES + TEST_BATCHES
    for c in bags:
        assert c["boxes"].shape == (2, 4) and torch.equal(c["boxes"], fixed[0]["returned"])
        assert (c["boxes"][:, 2:] == 10).all() and c["out_size"] == 14
        assert c["aug"] is not None and plain(c["aug"]) == run_aug  # the run's own patch augmentation
    assert_knn(knn)
    assert len(opts) == 1 and [type(s).__name__ for s in scheds] == ["CosineAnnealingLR"]
    assert scheds[0].T_max == STEPS  # in steps: the lr is stepped once a batch
    assert_sgd(opts[0], [cosine(s, STEPS, 0.37) for s in range(STEPS)], wd=0.0023)
    assert_linear_layer_seeded(opts[0], dim, 17)
    assert_losses(losses, BATCHES, 0.13)
    assert os.path.basename(r["path"]) == "eval-bag-p2-s10-fixed-aug-o14-backbone-fp32-n13-11-seed17.json"
    assert (r["patches"], r["patch_size"], r["out_size"], r["positions"], r["bag_augment"], r["seed"]) == (
        2, 10, 14, "fixed", True, 17)
    assert (r["dim"], r["n_train"], r["n_test"], sorted(r["knn"]), r["linear"]["epochs"], r["linear"]["opt"]) == (
        dim, 13, 11, ["k7", "k9"], 12, "sgd")


def test_random_positions_are_drawn_per_image_from_the_seed(ckpt, tmp_path, monkeypatch):
    """Catches: --positions random drawn from seed 0 instead of --seed, the test split drawing the train split's
    positions again (no seed offset), one draw shared by every image, a draw of --patches boxes only, the
    per-image boxes handed to the wrong batch, the boxes without --bag-augment still augmented."""
    real = common.patch_boxes
    boxes = spy(monkeypatch, common, "patch_boxes")
    bags = spy(monkeypatch, common, "bag_of_features")
    run_probe(ckpt, tmp_path / "res", mode="bag", positions="random", probe="knn")

    assert [(c["n"], c["size"], c["h"], c["w"]) for c in boxes] == [(2 * 13, 10, 32, 32), (2 * 11, 10, 32, 32)]
    for c, n, seed in zip(boxes, (13, 11), (17, 18)):  # --seed for the train split, --seed + 1 for the test split
        assert torch.equal(c["returned"], real(2 * n, 10, 32, 32, torch.Generator().manual_seed(seed)))
    seen = [c["boxes"] for c in bags]
    assert [tuple(b.shape) for b in seen] == [(2, b, 4) for b in TRAIN_BATCHES + TEST_BATCHES]
    assert torch.equal(torch.cat(seen[:2], 1), boxes[0]["returned"].view(2, 13, 4))
    assert torch.equal(torch.cat(seen[2:], 1), boxes[1]["returned"].view(2, 11, 4))
    assert {c["aug"] for c in bags} == {None} and {c["out_size"] for c in bags} == {14}


def test_local_mode_receives_patch_size_stride_and_out_size(ckpt, dim, tmp_path, monkeypatch):
    """Catches: --stride and --patch-size swapped (3 x 3 windows of 5 px instead of 5 x 5 of 10 px), --stride
    dropped for 4 (6 x 6), --out-size not reaching the crops, the run's patch size used over --patch-size,
    the window map pooled to another size than BagSSL's (3, stride 2)."""
    crops = spy(monkeypatch, common, "resized_crops")
    pools, real_pool = [], F.avg_pool2d

    def avg_pool2d(x, kernel_size, stride=None, **k):  # a builtin: no signature for spy()
        pools.append((tuple(x.shape), kernel_size, stride))
        return real_pool(x, kernel_size, stride, **k)
    monkeypatch.setattr(F, "avg_pool2d", avg_pool2d)
    r = run_probe(ckpt, tmp_path / "res", mode="local", probe="knn")

    assert [len(c["boxes"]) for c in crops] == [25 * b for b in TRAIN_BATCHES + TEST_BATCHES]
    for c in crops:
        assert c["out_size"] == 14 and (c["boxes"][:, 2:] == 10).all()
        assert sorted(set(c["boxes"][:, 0].tolist())) == sorted(set(c["boxes"][:, 1].tolist())) == [0, 5, 10, 15, 20]
    assert pools == [((b, dim, 5, 5), 3, 2) for b in TRAIN_BATCHES + TEST_BATCHES]  # BagSSL App. C.4: (3, stride 2)
    assert r["dim"] == dim * 2 * 2  # the 5 x 5 map average-pooled (3, stride 2) to 2 x 2
    assert (r["patches"], r["patch_size"], r["positions"], r["out_size"]) == (None, 10, "grid", 14)


def test_views_mode_receives_views_and_out_size_and_the_papers_views(ckpt, tmp_path, monkeypatch):
    """Catches: --views V drawn as V augmented views (not 1 clean + V-1) or dropped for 16, --out-size not
    reaching the clean view or the crops, the multi-view paper's views (Ghosh et al. 2024, App. D: crops of
    scale (0.08, 1), flip, jitter 0.4 without hue, grayscale 0.2, no blur or solarize) changed or replaced by
    the run's EMP-SSL patch augmentation, the views not drawn from --seed."""
    real = common.sample_views
    views = spy(monkeypatch, common, "sample_views")
    central = spy(monkeypatch, common, "central_view")
    augs = spy(monkeypatch, common, "augment")
    r = run_probe(ckpt, tmp_path / "res", mode="views", probe="knn")

    batches = TRAIN_BATCHES + TEST_BATCHES
    assert [c["images"].shape[0] for c in views] == [c["images"].shape[0] for c in central] == batches
    assert {(c["m"], c["out_size"], tuple(c["scale"]), tuple(c["ratio"])) for c in views} == {
        (2, 14, (0.08, 1.0), (3 / 4, 4 / 3))}
    assert {c["out_size"] for c in central} == {14} and [len(c["x"]) for c in augs] == [2 * b for b in batches]
    info = run_info(ckpt)
    paper = plain(common.AugConfig(jitter=(0.4, 0.4, 0.4, 0.0), p_gray=0.2, p_blur=0.0, p_solarize=0.0,
                                   mean=info["mean"], std=info["std"]))
    assert all(plain(c["cfg"]) == paper for c in augs), plain(augs[0]["cfg"])
    g = torch.Generator().manual_seed(17)
    assert torch.equal(views[0]["returned"][1], real(views[0]["images"], 2, 14, (0.08, 1.0), generator=g)[1])
    assert r["views"] == 3 and os.path.basename(r["path"]) == "eval-views-v3-o14-backbone-n13-11-seed17.json"


def test_adam_probe_on_head1_receives_every_flag(ckpt, tmp_path, monkeypatch):
    """Catches: Adam given --linear-wd as its lr or its lr dropped for 1e-3, a schedule on Adam (the multi-view
    paper's probe keeps the lr constant), --label-smoothing dropped for Adam's default 0.1, --linear-batch or
    --linear-epochs not reaching the loop, --feature head1 not probing the projector's first block (26 wide),
    --mode central's whole image not resized to --out-size."""
    opts, scheds, losses = record_training(monkeypatch)
    central = spy(monkeypatch, common, "central_view")
    r = run_probe(ckpt, tmp_path / "res", mode="central", linear_opt="adam", feature="head1", probe="linear")

    assert [type(o).__name__ for o in opts] == ["Adam"] and not scheds
    assert [(g["lr"], g["weight_decay"]) for g in opts[0].at_step] == [(0.37, 0.0023)] * STEPS
    assert_linear_layer_seeded(opts[0], 26, 17)
    assert_losses(losses, BATCHES, 0.13)
    assert [c["images"].shape[0] for c in central] == TRAIN_BATCHES + TEST_BATCHES
    assert {c["out_size"] for c in central} == {14}
    assert (r["dim"], r["feature"], r["linear"]["opt"], r["linear"]["epochs"]) == (26, "head1", "adam", 12)


def test_linear_aug_probe_receives_every_flag(ckpt, dim, tmp_path, monkeypatch):
    """Catches: the SSQL steps at epochs 7 and 10 taken as steps 7 and 10 (milestones in epochs, not steps), a
    gamma other than 0.1, the cosine used instead; --linear-wd or --linear-lr dropped for the probe's 0 and 30;
    the train features computed once instead of a fresh view each epoch; a fresh view of another --out-size,
    scale or augmentation (RandomResizedCrop(0.08, 1) + flip only); the batches not drawn from --seed."""
    opts, scheds, losses = record_training(monkeypatch)
    views = spy(monkeypatch, common, "sample_views")
    augs = spy(monkeypatch, common, "augment")
    gets = spy(monkeypatch, common.ImageSet, "get")
    knn = spy(monkeypatch, common, "knn_predict")
    r = run_probe(ckpt, tmp_path / "res", mode="central", linear_aug=True, probe="linear,knn")

    assert [type(s).__name__ for s in scheds] == ["MultiStepLR"] and scheds[0].gamma == 0.1
    assert sorted(scheds[0].milestones.elements()) == [7 * 3, 10 * 3]  # 60 % and 80 % of 12 epochs, in steps
    assert_sgd(opts[0], [0.37 * 0.1 ** ((s >= 21) + (s >= 30)) for s in range(STEPS)], wd=0.0023)
    assert_linear_layer_seeded(opts[0], dim, 17)
    assert_losses(losses, BATCHES, 0.13)
    assert [c["images"].shape[0] for c in views] == BATCHES  # a fresh view each epoch
    assert {(c["m"], c["out_size"], tuple(c["scale"]), tuple(c["ratio"])) for c in views} == {
        (1, 14, (0.08, 1.0), (3 / 4, 4 / 3))}
    info = run_info(ckpt)
    flip = plain(common.AugConfig(flip=0.5, p_jitter=0.0, p_gray=0.0, p_blur=0.0, p_solarize=0.0, mean=info["mean"],
                                  std=info["std"]))
    assert len(augs) == len(views) and all(plain(c["cfg"]) == flip for c in augs)
    perm = torch.randperm(13, generator=torch.Generator().manual_seed(17))
    first = [c["idx"] for c in gets if len(c["self"]) == 13][-STEPS:]
    assert [x.tolist() for x in first[:3]] == [perm[:6].tolist(), perm[6:12].tolist(), perm[12:].tolist()]
    assert_knn(knn)
    assert (r["linear"]["opt"], r["linear"]["epochs"], os.path.basename(r["path"])) == (
        "sgd-aug", 12, "eval-central-o14-backbone-linaug-n13-11-seed17.json")


def test_compare_random_probes_a_random_init_drawn_from_the_seed(ckpt, tmp_path, monkeypatch):
    """Catches: --compare-random's random init not drawn from --seed (seed 0, or the global RNG as it stands),
    or of another architecture; the random init probed with other settings than the trained backbone."""
    real = common.backbone
    nets = spy(monkeypatch, common, "backbone")
    knn = spy(monkeypatch, common, "knn_predict")
    r = run_probe(ckpt, tmp_path / "res", mode="central", compare_random=True, probe="knn")

    assert len(nets) == 2 and (nets[1]["arch"], nets[1]["stem"]) == (nets[0]["arch"], nets[0]["stem"])
    torch.manual_seed(17)
    ref = real(nets[0]["arch"], nets[0]["stem"]).state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in nets[1]["returned"].state_dict().items())
    assert_knn(knn[:2])
    assert_knn(knn[2:])
    assert sorted(r["random"]["knn"]) == ["k7", "k9"]


# --- the defaults are the papers' ----------------------------------------------------------------------------


@pytest.mark.parametrize("opt", ["sgd", "adam", "linear-aug"])
def test_linear_probe_defaults_are_the_papers(opt, monkeypatch):
    """Catches: label smoothing 0.1 also under sgd (or 0 under adam), a default swapped between the three
    probes (Adam's batch 512 under sgd, SSQL's lr 30 under the cosine probe), Adam given a schedule or SGD
    none, the SSQL steps at epochs 60 and 80 taken as steps, 200 epochs under sgd or 100 under adam."""
    n = {"sgd": 250, "adam": 600, "linear-aug": 300}[opt]  # a last batch smaller than the default batch
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n + 20) % 10
    f = torch.randn(n + 20, 4, generator=g) + y[:, None].float()
    extra = {"sgd": [], "adam": ["--linear-opt", "adam"], "linear-aug": ["--linear-aug"]}[opt]
    args = eval_linear.parse_args(["--ckpt", "x", *extra])
    opts, scheds, losses = record_training(monkeypatch)
    accs = eval_linear.linear_probe(args, lambda idx: f[idx], y[:n], f[n:], y[n:], 10, torch.device("cpu"))

    if opt == "sgd":
        # EMP-SSL (Tong et al. 2023, arXiv:2304.03977), Sec. 3: "trained with 100 epochs, optimized by SGD ... with a
        # learning rate of 0.03"; the authors' evaluation code (func.py, linear()): momentum 0.9, weight decay
        # 5e-5, batch 100, cosine annealing to 0, no label smoothing
        steps = 100 * 3
        assert len(accs) == 100 and [type(s).__name__ for s in scheds] == ["CosineAnnealingLR"]
        assert scheds[0].T_max == steps
        assert_sgd(opts[0], [cosine(s, steps, 0.03) for s in range(steps)], wd=5e-5)
        assert_losses(losses, [100, 100, 50] * 100, 0.0)
    elif opt == "adam":
        # the multi-view paper (Ghosh et al. 2024, arXiv:2312.10725), App. D, the linear evaluation table:
        # Adam, lr 1e-3, batch 512, 200 epochs, weight decay 1e-6, constant lr; label smoothing 0.1 is its
        # authors' probe (fastssl scripts/train_model_multiPatch.py), not in App. D
        assert len(accs) == 200 and [type(o).__name__ for o in opts] == ["Adam"] and not scheds
        assert [(g["lr"], g["weight_decay"]) for g in opts[0].at_step] == [(1e-3, 1e-6)] * 400
        assert_losses(losses, [512, 88] * 200, 0.1)
    else:
        # NPID + SqrtKL (Cao & Wu 2024, arXiv:2404.19289), Sec. 4.2: linear probing "following the practice
        # in [3]" (SSQL): SGD lr 30, weight decay 0, batch 128, 100 epochs, lr x0.1 at epochs 60 and 80
        assert len(accs) == 100 and [type(s).__name__ for s in scheds] == ["MultiStepLR"]
        assert sorted(scheds[0].milestones.elements()) == [60 * 3, 80 * 3] and scheds[0].gamma == 0.1
        assert_sgd(opts[0], [30.0 * 0.1 ** ((s >= 180) + (s >= 240)) for s in range(300)], wd=0.0)
        assert_losses(losses, [128, 128, 44] * 100, 0.0)


def test_probe_defaults_are_the_papers():
    """Catches a default changed away from its paper: the bag's 128 patches, k-NN's k and T, BagSSL's stride,
    the multi-view paper's 16 views, the extraction batch, the seed."""
    a = eval_linear.parse_args(["--ckpt", "x"])
    assert a.patches == 128  # EMP-SSL Sec. 3: "we choose 128 as the number of patches in the bag-of-feature"
    assert a.positions == "fixed" and a.patch_size is None and a.out_size is None  # the run's patch and input sides
    assert a.stride == 4  # BagSSL (Chen et al. 2022, arXiv:2206.08954) Sec. 4.4, Table 5 and App. C.4: stride 4
    assert a.views == 16  # the multi-view paper, App. D: "test-patches 16"
    # weighted k-NN: NPID (Wu et al. 2018, arXiv:1805.01978) k 200, T 0.07; k 20: EMP-SSL's evaluation code
    # (WeightedKNNClassifier(k=20, T=0.07), as solo-learn)
    assert (a.knn_k, a.knn_t) == ("20,200", 0.07)
    assert (a.linear_opt, a.linear_aug, a.label_smoothing, a.mode, a.feature) == ("sgd", False, None, None, "backbone")
    assert (a.seed, a.subset, a.test_subset, a.batch_size, a.probe) == (0, None, None, 256, "linear,knn")


def test_default_bag_and_knn_reach_the_computation(ckpt, tmp_path, monkeypatch):
    """Catches: the defaults resolved in the wrong place: the bag not of 128 patches at the run's patch side
    (15) and input side (18) at positions from seed 0, augmented without --bag-augment, or k-NN not at k 20 and
    200 with T 0.07."""
    fixed = spy(monkeypatch, common, "fixed_patch_boxes")
    bags = spy(monkeypatch, common, "bag_of_features")
    knn = spy(monkeypatch, common, "knn_predict")
    eval_linear.main(["--ckpt", str(ckpt), "--probe", "knn", "--patches", "2", "--workers", "0", "--out",
                      str(tmp_path / "res")])
    assert [(c["n"], c["size"], c["image_size"], c["seed"]) for c in fixed] == [(2, 15, 32, 0)] * 2
    assert {(c["out_size"], c["aug"]) for c in bags} == {(18, None)}
    assert_knn(knn, N_TRAIN, N_TEST, (20, 200), 0.07)
    eval_linear.main(["--ckpt", str(ckpt), "--probe", "linear", "--linear-epochs", "1", "--subset", "3",
                      "--test-subset", "2", "--workers", "0", "--out", str(tmp_path / "res")])
    assert fixed[-1]["n"] == 128 and all(c["boxes"].shape == (128, 4) for c in bags[-2:])
