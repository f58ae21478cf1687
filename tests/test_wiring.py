"""Tests that catch a wrong wire (issue "Tests that catch a wrong wire"): a recipe value that does not reach
the computation that uses it, or reaches the wrong slot. Mutation testing showed the rest of the suite
misses these: a method's optimiser built without one of its paper's hyper-parameters (the class default
silently used), a warm-up one epoch short, two sizes of a sampler swapped in a main loop, two loss
coefficients that are both 25 by default passed in each other's place, a momentum 0.5 applied as 1 - m.
At the paper's defaults these are invisible; here every recipe value is set to its own number.

For each method, the real main() runs 2 steps on the synthetic set with EVERY recipe flag set to a value
that differs from its default and from every other value (the first test holds that list to parse_args,
so a flag added later fails it until it is covered), and spies record
what the computation received: the loss function's arguments, the optimiser's param groups at each step
(lr as set, weight decay, momentum, eta, the parameters), the schedule's arguments against a closed form
in steps, the sampler's sizes, counts, scales and ratios, the augmentation config, the memory bank
update, the probe info saved in the checkpoint. A test per method holds the defaults to the paper, each
value with its section. The spies: tests/wiring_util.py."""
import math

import pytest
import torch
import torch.nn.functional as F

import bag_ssl
import common
import emp_ssl
import multiaug_ssl
import npid_sqrtkl
from wiring_util import aug_dict, argv, metrics, numbers, optimised, params_of, spies, spy, spy_optimizer

pytestmark = pytest.mark.usefixtures("cached_synthetic")  # tests/conftest.py

SUBSET = 40  # synthetic images of the tiny runs (32 px); 2 steps each
TINY = ["--dataset", "synthetic", "--subset", str(SUBSET), "--max-steps", "2", "--log-every", "1", "--workers", "0"]
# flags that are not a paper hyper-parameter: how a run is executed (common.RUNTIME_FLAGS), the tiny setting
NOT_RECIPE = common.RUNTIME_FLAGS | {"dataset", "image_size", "seed", "subset", "method"}
SYNTHETIC_STATS = [list(v) for v in common.data_stats("synthetic")]

# --- every method's recipe, each value its own number -----------------------------------------------

EMP = dict(epochs=4, schedule_epochs=9, batch_size=12, lr=0.7, weight_decay=0.003, eta=0.02, patches=3,
           patch_size=6, out_size=8, inv_weight=37.0, eps2=0.45, proj="24-10", arch="mobilenet_v3_small")
EMP_RUNS = {"paper": dict(patch_sampler="paper", grad_checkpoint=False),
            "official": dict(patch_sampler="official", grad_checkpoint=True)}

BAG = dict(epochs=6, schedule_epochs=13, batch_size=10, lr=0.45, weight_decay=0.002, eta=0.013, patches=3,
           patch_size=7, out_size=9, proj="20-14", sim_coeff=21.0, std_coeff=17.0, cov_coeff=5.0,
           temperature=0.35, inv_weight=44.0, eps2=0.6, pred_hidden=18, tau_base=0.93, arch="resnet18")
BAG_RUNS = {  # byol: a warm-up longer than half the run, capped there (App. C's 10 epochs in a short run)
    "vicreg": dict(loss="vicreg", multiscale=False, blur=False, warmup_epochs=2),
    "simclr-multiscale": dict(loss="simclr", multiscale=True, blur=True, warmup_epochs=2),
    "tcr": dict(loss="tcr", multiscale=False, blur=True, warmup_epochs=2),
    "byol": dict(loss="byol", multiscale=False, blur=False, warmup_epochs=11)}

MULTI = dict(epochs=2, batch_size=10, lr=0.004, weight_decay=3e-5, views=3, pdim=12, lam=0.07, sim_coeff=21.0,
             std_coeff=17.0, cov_coeff=5.0, train_fraction=0.75, out_size=9, scale=(0.3, 0.85), p_gray=0.35,
             arch="resnet18")
MULTI_RUNS = {"barlow": dict(loss="barlow"), "vicreg": dict(loss="vicreg")}

NPID = dict(epochs=3, schedule_epochs=7, batch_size=10, lr=0.06, weight_decay=0.0007, out_size=9, proj="14",
            temperature=0.27, lam=3.5, bank_momentum=0.3, jitter=(0.32, 0.25, 0.15, 0.05),
            p_jitter=0.65, p_gray=0.45, flip=0.55, arch="mobilenet_v3_small")
NPID_RUNS = {  # the chunked softmax (16 < 40 bank rows) and the whole one (a chunk larger than the bank)
    "calibrate-gradupdate": dict(sqrtkl_part="l2", calibrate_bn="train", bank_grad="full", no_calibrate=False,
                                 no_grad_update=False, bank_chunk=16),
    "random-bank-npid-update": dict(sqrtkl_part="l1", calibrate_bn="eval", bank_grad="ce", no_calibrate=True,
                                    no_grad_update=True, bank_chunk=64)}

# module, recipe, runs, args derived from others (not flags), flags a method refuses
METHODS = {"emp_ssl": (emp_ssl, EMP, EMP_RUNS, {"stem", "norm_mean", "norm_std"}, set()),
           "bag_ssl": (bag_ssl, BAG, BAG_RUNS, {"stem", "norm_mean", "norm_std"}, set()),
           "multiaug_ssl": (multiaug_ssl, MULTI, MULTI_RUNS, set(), {"schedule_epochs"}),  # constant lr, App. D
           "npid_sqrtkl": (npid_sqrtkl, NPID, NPID_RUNS, set(), set())}


class _Loaded(Exception):
    pass


def args_at_load(module, extra, monkeypatch):
    """The args main() holds when it loads the training data (defaults that main resolves included),
    without loading it: no data, no run folder."""
    def stop(args, *a, **k):
        raise _Loaded(args)

    with monkeypatch.context() as m:
        m.setattr(common, "load_train_set", stop)
        with pytest.raises(_Loaded) as e:
            module.main(extra)
    return e.value.args[0]


def norm(v):
    return [float(x) for x in v] if isinstance(v, (list, tuple)) else v


def run_main(module, flags, out, defaults):
    module.main(TINY + argv(flags, defaults) + ["--out", str(out)])


def defaults_of(name, tmp_path, monkeypatch):
    return vars(args_at_load(METHODS[name][0], ["--out", str(tmp_path / "defaults")], monkeypatch))


def cosine(s, horizon, base):
    """The paper's cosine to 0 at 0-based step s of a horizon in steps, no warm-up."""
    return base * 0.5 * (1 + math.cos(math.pi * s / horizon))


def the_run(steps):
    """The common.Run of a run, from the spy on Run.step (each call's self)."""
    runs = {id(c["args"]["self"]): c["args"]["self"] for c in steps}
    assert len(runs) == 1 and len(steps) == 2, (len(runs), len(steps))
    return next(iter(runs.values()))


def assert_optimiser(made, model, lrs, **hyper):
    """One optimiser over exactly the model's parameters, one param group, and at step k the group as step()
    read it: lr lrs[k] and every hyper-parameter in `hyper`."""
    assert len(made) == 1, f"{len(made)} optimisers"
    opt = made[0]
    ids = optimised(opt)
    assert len(ids) == len(set(ids)) and set(ids) == params_of(model), "not over the model's parameters"
    assert [len(groups) for groups in opt.groups_at_step] == [1] * len(lrs)
    for k, (groups, lr) in enumerate(zip(opt.groups_at_step, lrs)):
        g = groups[0]
        assert g["lr"] == pytest.approx(lr, rel=1e-12), ("lr at step", k + 1, g["lr"], lr)
        for key, want in hyper.items():
            assert g[key] == want, (key, g[key], want)


def assert_logged_lr(out, lrs):
    assert [r["lr"] for r in metrics(out)] == pytest.approx(lrs, rel=1e-12)


def assert_saved_args(ckpt, flags, skip=()):
    for k, v in flags.items():
        if k not in skip:
            assert norm(ckpt["args"][k]) == norm(v), (k, ckpt["args"][k], v)


# --- the list of flags --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_recipe_flag_is_set_distinct_and_non_default(name, tmp_path, monkeypatch):
    """The recipes below cover every recipe flag of the method's parse_args (a flag added later fails here
    until the wiring test sets it); in every run, every number differs from its default and from every
    other number of the run (a value passed in another's place, or dropped for its default, changes what
    the spies see); every choice or switch is off its default in at least one run."""
    _, recipe, runs, derived, refused = METHODS[name]
    d = defaults_of(name, tmp_path, monkeypatch)
    dests = set(d) - NOT_RECIPE - derived - refused
    for run, choices in runs.items():
        flags = {**recipe, **choices}
        assert set(flags) == dests, (run, sorted(dests ^ set(flags)))
        nums = numbers(flags)
        assert len(nums) == len(set(nums)), (run, sorted(x for x in nums if nums.count(x) > 1))
        for k, v in flags.items():
            if not numbers({k: v}):
                continue  # a switch or a choice: below
            if isinstance(v, (list, tuple)):
                assert all(a != b for a, b in zip(norm(v), norm(d[k]))), (run, k, v, d[k])
            else:
                assert v != d[k], (run, k, v)
    for k in dests:
        assert any({**recipe, **r}[k] != d[k] for r in runs.values()), f"--{k} is at its default in every run"


# --- EMP-SSL ----------------------------------------------------------------------------------------

# App. A.1 (VICReg's augmentation); normalisation mean = std = 0.5 as the authors' code
EMP_AUG = {"flip": 0.5, "jitter": [0.4, 0.4, 0.4, 0.2], "p_jitter": 0.8, "p_gray": 0.2, "p_blur": 0.1,
           "blur_sigma": [0.1, 2.0], "p_solarize": 0.1, "mean": [0.5] * 3, "std": [0.5] * 3}


@pytest.mark.parametrize("sampler", sorted(EMP_RUNS))
def test_emp_ssl_recipe_values_reach_the_computation(sampler, tmp_path, monkeypatch):
    """Catches: LARS built without --eta or --weight-decay (LARS's defaults used), or with SGD's own weight
    decay on top (decay twice, and on biases); momentum or Nesterov off the official code's; the cosine
    over --epochs instead of --schedule-epochs, a warm-up, or the lr not set on the optimiser; --patch-size
    and --out-size swapped (or one dropped) in sample_patches; --patches, --batch-size, --proj not reaching
    the views, the batch, the projector; --eps2 and --inv-weight swapped or dropped in emp_loss or the
    coding rate; the official sampler's scale 0.25 / ratio 1 or its --out-size wrong; --grad-checkpoint
    not reaching the forward; the checkpoint's probe info (patch size, out size, proj, aug) off the run's."""
    f = {**EMP, **EMP_RUNS[sampler]}
    out = tmp_path / "run"
    d = defaults_of("emp_ssl", tmp_path, monkeypatch)
    made = spy_optimizer(monkeypatch, common, "LARS")
    sched, patches, boxes, crops, augs, projs, nets = spies(
        monkeypatch, common, "cosine_lr", "sample_patches", "random_resized_boxes", "resized_crops",
        "augment", "projector", "backbone")
    losses, rates, ckpt_fwd = spies(monkeypatch, emp_ssl, "emp_loss", "total_coding_rate", "forward_checkpointed")
    steps = spy(monkeypatch, common.Run, "step")
    run_main(emp_ssl, f, out, d)

    B, n, spe = f["batch_size"], f["patches"], SUBSET // f["batch_size"]
    horizon = spe * f["schedule_epochs"]  # Sec. 3: cosine to 0 over the schedule, in steps
    run = the_run(steps)
    assert (run.steps_per_epoch, run.total, run.horizon, len(run.train), run.inputs) == (
        spe, spe * f["epochs"], horizon, SUBSET, n * B)
    lrs = [cosine(0, horizon, f["lr"]), cosine(1, horizon, f["lr"])]
    # LARS (Sec. 3: eta, weight decay; SPEC 1.4: over SGD momentum 0.9, Nesterov, no SGD weight decay)
    assert_optimiser(made, run.model, lrs, eta=f["eta"], lars_weight_decay=f["weight_decay"], weight_decay=0.0,
                     momentum=0.9, nesterov=True)
    assert [(c["args"]["step"], c["args"]["total"], c["args"]["base_lr"], c["args"]["warmup"], c["args"]["final"])
            for c in sched] == [(0, horizon, f["lr"], 0, 0.0), (1, horizon, f["lr"], 0, 0.0)]
    assert_logged_lr(out, lrs)
    assert [(c["args"]["arch"], c["args"]["stem"]) for c in nets] == [(f["arch"], "cifar")]
    assert [(c["args"]["in_dim"], c["args"]["spec"]) for c in projs] == [(run.model.backbone.dim, f["proj"])]
    if sampler == "paper":  # Sec. 2: n fixed-size patches, resized to the network input
        assert [(tuple(c["args"]["images"].shape), c["args"]["n"], c["args"]["size"], c["args"]["out_size"])
                for c in patches] == [((B, 3, 32, 32), n, f["patch_size"], f["out_size"])] * 2
        assert boxes == [] and crops == [] and ckpt_fwd == []
    else:  # the authors' CIFAR crop: RandomResizedCrop(scale 0.25, ratio 1) of the 32 px image
        assert patches == []
        assert [(c["args"]["n"], c["args"]["h"], c["args"]["w"], tuple(c["args"]["scale"]), tuple(c["args"]["ratio"]))
                for c in boxes] == [(n * B, 32, 32, (0.25, 0.25), (1.0, 1.0))] * 2
        assert [(len(c["args"]["images"]), c["args"]["out_size"]) for c in crops] == [(n * B, f["out_size"])] * 2
        assert len(ckpt_fwd) == 2 and all(c["args"]["net"] is run.model.backbone for c in ckpt_fwd)
    assert [tuple(c["args"]["x"].shape) for c in augs] == [(n * B, 3, f["out_size"], f["out_size"])] * 2
    assert [aug_dict(c["args"]["cfg"]) for c in augs] == [EMP_AUG] * 2
    dim = int(f["proj"].split("-")[-1])
    assert [(tuple(c["args"]["Z"].shape), c["args"]["eps2"], c["args"]["lam"]) for c in losses] == \
        [((n, B, dim), f["eps2"], f["inv_weight"])] * 2
    assert [c["args"]["eps2"] for c in rates] == [f["eps2"]] * 2
    for r in metrics(out):  # Eq. (2): loss = -(R + lam D), averaged over the patches
        assert r["loss"] == pytest.approx(-(r["R"] + f["inv_weight"] * r["D"]), rel=1e-5, abs=1e-5)
    ck = common.load_checkpoint(str(out / "checkpoint.pt"), "emp_ssl")
    p = ck["probe"]
    assert (p["arch"], p["stem"], p["out_size"], p["represent"], p["patch_size"], p["proj"]) == (
        f["arch"], "cifar", f["out_size"], "bag", f["patch_size"], f["proj"])
    assert (p["mean"], p["std"]) == ([0.5] * 3, [0.5] * 3) and aug_dict(p["aug"]) == EMP_AUG
    assert_saved_args(ck, f)


def test_emp_ssl_defaults_are_the_papers(tmp_path, monkeypatch):
    """No flags is the paper's CIFAR-10 recipe. Catches a default changed or mistyped (0.3 vs 0.03, 200 vs 20)."""
    a = args_at_load(emp_ssl, ["--out", str(tmp_path / "d")], monkeypatch)
    assert a.dataset == "cifar10"
    assert a.arch == "resnet18"  # Sec. 3: ResNet-18
    assert a.batch_size == 100  # Sec. 3: batch size 100
    assert a.lr == 0.3  # Sec. 3: learning rate 0.3, cosine to 0
    assert a.weight_decay == 1e-4  # Sec. 3: weight decay 1e-4
    assert a.eta == 0.005  # Sec. 3: LARS with eta 0.005
    assert a.inv_weight == 200.0  # Sec. 3 / Eq. (2): lambda 200
    assert a.eps2 == 0.2  # Sec. 3 / Eq. (1): epsilon^2 0.2
    assert a.proj == "4096-512"  # Sec. 3: 4096 hidden, 512 out
    assert a.patches == 200  # Sec. 3: n = 200 unless specified otherwise
    assert (a.patch_size, a.out_size, a.stem) == (16, 32, "cifar")  # Sec. 3: 16 x 16 patches upsampled to 32
    assert a.epochs == 10 and a.schedule_epochs is None  # Table 2's 10-epoch column; Sec. 3.1: the cosine spans the run
    assert a.patch_sampler == "paper" and not a.grad_checkpoint  # Sec. 2's fixed-size patches
    assert aug_dict(emp_ssl.augmentation(a)) == EMP_AUG  # App. A.1


# --- BagSSL -------------------------------------------------------------------------------------------


def byol_aug(blur, view):
    """App. C.1 -> BYOL (Grill et al. 2020) Table 6: flip, jitter 0.4/0.4/0.2/0.1 p 0.8, grey 0.2; blur 1.0 / 0.1
    (sigma 0.1-2), solarize 0.0 / 0.2 on views 1 / 2; --no-blur: no blur."""
    return {"flip": 0.5, "jitter": [0.4, 0.4, 0.2, 0.1], "p_jitter": 0.8, "p_gray": 0.2,
            "p_blur": (1.0 if view == 0 else 0.1) if blur else 0.0, "blur_sigma": [0.1, 2.0],
            "p_solarize": 0.0 if view == 0 else 0.2, "mean": SYNTHETIC_STATS[0], "std": SYNTHETIC_STATS[1]}


def nt_xent(z1, z2, t):
    z = F.normalize(torch.cat([z1, z2]).double(), dim=1)
    s = (z @ z.T / t).fill_diagonal_(float("-inf"))
    B = len(z1)
    return F.cross_entropy(s, torch.cat([torch.arange(B, 2 * B), torch.arange(B)]))


@pytest.mark.parametrize("loss", sorted(BAG_RUNS))
def test_bag_ssl_recipe_values_reach_the_computation(loss, tmp_path, monkeypatch):
    """Catches: LARS built without --weight-decay or --eta (LARS's defaults used), or with SGD's own decay on
    top; the warm-up one epoch short (or long, or its cap at half a short run wrong), or the cosine over
    --epochs instead of --schedule-epochs; --patch-size and --out-size swapped in sample_patches;
    --multiscale's scale (0.08, 1) or ratio off; --sim-coeff and --std-coeff swapped (both 25 by default),
    --cov-coeff dropped; --temperature not reaching NT-Xent; --inv-weight and --eps2 swapped in TCR;
    --pred-hidden not reaching the predictor; --tau-base not reaching the EMA, its cosine over the wrong
    horizon, or the EMA at tau-base throughout; the BYOL target in the optimiser; the two views' blur /
    solarize configs swapped, or --blur not reaching them; the probe info off."""
    f = {**BAG, **BAG_RUNS[loss]}
    out = tmp_path / "run"
    d = defaults_of("bag_ssl", tmp_path, monkeypatch)
    made = spy_optimizer(monkeypatch, common, "LARS")
    sched, patches, views, boxes, augs, projs, nets = spies(
        monkeypatch, common, "cosine_lr", "sample_patches", "sample_views", "random_resized_boxes", "augment",
        "projector", "backbone")
    vicregs, simclrs, tcrs, rates, byols, taus, emas = spies(
        monkeypatch, bag_ssl, "vicreg", "simclr", "tcr", "total_coding_rate", "byol", "byol_tau", "ema_update")
    steps = spy(monkeypatch, common.Run, "step")
    run_main(bag_ssl, f, out, d)

    B, n, spe = f["batch_size"], f["patches"], SUBSET // f["batch_size"]
    horizon = spe * f["schedule_epochs"]
    # App. C: linear warm-up over the warm-up epochs, in steps; a short run caps it at half its schedule
    warmup = f["warmup_epochs"] * spe if f["warmup_epochs"] * spe <= horizon // 2 else horizon // 2
    assert (warmup == horizon // 2) == (loss == "byol")
    run = the_run(steps)
    assert (run.steps_per_epoch, run.total, run.horizon, len(run.train), run.inputs) == (
        spe, spe * f["epochs"], horizon, SUBSET, n * B)
    lrs = [f["lr"] * 1 / warmup, f["lr"] * 2 / warmup]  # steps 1, 2 of the linear warm-up
    assert_optimiser(made, run.model, lrs, eta=f["eta"], lars_weight_decay=f["weight_decay"], weight_decay=0.0,
                     momentum=0.9, nesterov=True)  # App. C: LARS; eta: the EMP-SSL code's
    assert [(c["args"]["step"], c["args"]["total"], c["args"]["base_lr"], c["args"]["warmup"], c["args"]["final"])
            for c in sched] == [(0, horizon, f["lr"], warmup, 0.0), (1, horizon, f["lr"], warmup, 0.0)]
    assert_logged_lr(out, lrs)
    assert [(c["args"]["arch"], c["args"]["stem"]) for c in nets] == [(f["arch"], "cifar")]
    dim = int(f["proj"].split("-")[-1])
    want_proj = [(run.model.backbone.dim, f["proj"])] + ([(dim, f"{f['pred_hidden']}-{dim}")] if loss == "byol" else [])
    assert [(c["args"]["in_dim"], c["args"]["spec"]) for c in projs] == want_proj
    if f["multiscale"]:  # Tables 1-3 baselines: RandomResizedCrop(0.08, 1), torchvision's ratio
        assert patches == []
        assert [(len(c["args"]["images"]), c["args"]["m"], c["args"]["out_size"]) for c in views] == \
            [(B, n, f["out_size"])] * 2
        assert [(c["args"]["n"], tuple(c["args"]["scale"]), tuple(c["args"]["ratio"])) for c in boxes] == \
            [(n * B, (0.08, 1.0), (3 / 4, 4 / 3))] * 2
    else:  # Sec. 3: fixed-scale patches
        assert views == [] and boxes == []
        assert [(len(c["args"]["images"]), c["args"]["n"], c["args"]["size"], c["args"]["out_size"]) for c in patches] \
            == [(B, n, f["patch_size"], f["out_size"])] * 2
    assert all(c["args"]["generator"] is run.gen for c in views + patches)  # the run's seeded, resumable stream
    assert [tuple(c["args"]["x"].shape) for c in augs] == [(B, 3, f["out_size"], f["out_size"])] * (2 * n)
    assert [aug_dict(c["args"]["cfg"]) for c in augs] == [byol_aug(f["blur"], i % 2) for i in range(n)] * 2
    pairs = n * (n - 1) // 2 * 2  # every pair of views, 2 steps
    called = {"vicreg": vicregs, "simclr": simclrs, "tcr": tcrs, "byol": byols}
    assert {k: len(v) for k, v in called.items()} == {k: (2 if k == "tcr" else pairs) if k == f["loss"] else 0
                                                      for k in called}
    logged = metrics(out)
    if f["loss"] == "vicreg":
        assert [(c["args"]["z1"].shape, c["args"]["sim_coeff"], c["args"]["std_coeff"], c["args"]["cov_coeff"])
                for c in vicregs] == [((B, dim), f["sim_coeff"], f["std_coeff"], f["cov_coeff"])] * pairs
        for r in logged:  # Eq. 6 of VICReg, averaged over the pairs
            want = f["sim_coeff"] * r["inv"] + f["std_coeff"] * r["var"] + f["cov_coeff"] * r["cov"]
            assert r["loss"] == pytest.approx(want, rel=1e-5)
    if f["loss"] == "simclr":
        for c in simclrs:
            a = c["args"]
            assert a["temperature"] == f["temperature"] and a["z1"].shape == (B, dim)
            assert c["result"]["loss"].item() == pytest.approx(nt_xent(a["z1"], a["z2"], f["temperature"]).item(),
                                                               rel=1e-4)
    if f["loss"] == "tcr":
        assert [(tuple(c["args"]["Z"].shape), c["args"]["eps2"], c["args"]["lam"]) for c in tcrs] == \
            [((n, B, dim), f["eps2"], f["inv_weight"])] * 2
        assert [c["args"]["eps2"] for c in rates] == [f["eps2"]] * 2
        for r in logged:
            assert r["loss"] == pytest.approx(-(r["R"] + f["inv_weight"] * r["D"]), rel=1e-5, abs=1e-5)
    if f["loss"] == "byol":  # BYOL Sec. 3.2: tau = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2, K the schedule
        want_tau = [1 - (1 - f["tau_base"]) * (math.cos(math.pi * k / horizon) + 1) / 2 for k in (0, 1)]
        assert [(c["args"]["k"], c["args"]["K"], c["args"]["tau_base"]) for c in taus] == \
            [(0, horizon, f["tau_base"]), (1, horizon, f["tau_base"])]
        assert [c["args"]["tau"] for c in emas] == pytest.approx(want_tau, rel=1e-12)
        assert [r["tau"] for r in logged] == pytest.approx(want_tau, rel=1e-12)
        target = emas[0]["args"]["target"]
        assert all(c["args"]["model"] is run.model for c in emas) and not params_of(target) & set(optimised(made[0]))
    else:
        assert taus == [] and emas == []
    ck = common.load_checkpoint(str(out / "checkpoint.pt"), "bag_ssl")
    p = ck["probe"]
    assert (p["arch"], p["stem"], p["out_size"], p["proj"], [p["mean"], p["std"]]) == (
        f["arch"], "cifar", f["out_size"], f["proj"], SYNTHETIC_STATS)
    assert (p["represent"], p["patch_size"]) == (("image", None) if f["multiscale"] else ("bag", f["patch_size"]))
    assert_saved_args(ck, f, skip={"patch_size"} if f["multiscale"] else ())


def test_bag_ssl_defaults_are_the_papers(tmp_path, monkeypatch):
    """No flags is App. C.1's CIFAR-10 recipe. Catches a default changed or mistyped."""
    a = args_at_load(bag_ssl, ["--out", str(tmp_path / "d")], monkeypatch)
    assert a.dataset == "cifar10" and a.loss == "vicreg"
    assert a.arch == "resnet34"  # App. C.1: ResNet-34
    assert a.epochs == 600 and a.schedule_epochs is None  # App. C.1: 600 epochs, one cosine over them
    assert a.batch_size == 1024  # App. C.1: batch 1024
    assert a.lr == 0.3  # App. C.1: LARS, lr 0.3
    assert a.weight_decay == 1e-4  # App. C.1: weight decay 1e-4
    assert a.warmup_epochs == 10  # App. C.1: 10 epochs of warm-up, cosine to 0
    assert a.eta == 0.005  # not in the paper: the same group's EMP-SSL value (Sec. 3 there; docs/recipes.md)
    assert (a.std_coeff, a.sim_coeff, a.cov_coeff) == (25.0, 25.0, 1.0)  # App. C.1: variance/invariance/cov 25, 25, 1
    assert a.temperature == 0.1  # App. C.1: SimCLR temperature 0.1
    assert (a.inv_weight, a.eps2) == (30.0, 0.2)  # App. C.1: TCR lambda 30, epsilon 0.2 (as eps^2: docs/recipes.md)
    assert a.proj == "4096-128"  # App. C.1: 4096 hidden, 128 out on CIFAR-10
    assert a.pred_hidden == 4096  # BYOL Sec. 3.3: predictor hidden 4096
    assert a.tau_base == 0.99  # BYOL Sec. 3.2 schedule; base 0.99 solo-learn's CIFAR value (docs/recipes.md)
    assert a.blur is True  # App. C.1: augmentations "identical to those described in BYOL"
    # Sec. 4.1, Tables 1-3: two patches of 14 px, resized to 32
    assert (a.patches, a.patch_size, a.out_size, a.multiscale) == (2, 14, 32, False)
    cifar = common.data_stats("cifar10")
    assert [aug_dict(c) for c in bag_ssl.byol_augs(a)] == [  # App. C.1 -> BYOL Table 6
        {**byol_aug(True, v), "mean": list(cifar[0]), "std": list(cifar[1])} for v in (0, 1)]


# --- multiple views, small projector --------------------------------------------------------------------


@pytest.mark.parametrize("loss", sorted(MULTI_RUNS))
def test_multiaug_ssl_recipe_values_reach_the_computation(loss, tmp_path, monkeypatch):
    """Catches: Adam built without --weight-decay or at another lr (its defaults used), or an lr schedule where
    App. D has a constant lr; --views, --out-size, --scale not reaching sample_views (or the scale dropped
    for (0.08, 1)), the ratio off torchvision's; --p-gray not reaching the augmentation; --sim-coeff and
    --std-coeff swapped (both 25 by default) or --cov-coeff dropped in the VICReg form; --lam not reaching
    the Barlow Twins form; --pdim not reaching the projector; --train-fraction not cutting the data; the
    probe info (views' scale, ratio, aug; the projector's biases) off the run's."""
    f = {**MULTI, **MULTI_RUNS[loss]}
    out = tmp_path / "run"
    d = defaults_of("multiaug_ssl", tmp_path, monkeypatch)
    made = spy_optimizer(monkeypatch, torch.optim, "Adam")
    sched, setlr, views, boxes, augs, projs, nets = spies(
        monkeypatch, common, "cosine_lr", "set_lr", "sample_views", "random_resized_boxes", "augment",
        "projector", "backbone")
    barlows = spy(monkeypatch, multiaug_ssl, "barlow_loss")
    vicregs = spy(monkeypatch, multiaug_ssl, "vicreg_loss")
    steps = spy(monkeypatch, common.Run, "step")
    run_main(multiaug_ssl, f, out, d)

    B, M = f["batch_size"], f["views"]
    images = round(f["train_fraction"] * SUBSET)  # Sec. 4.3: a fixed fraction of the training set
    spe = images // B
    run = the_run(steps)
    assert (run.steps_per_epoch, run.total, len(run.train), run.inputs) == (spe, spe * f["epochs"], images, M * B)
    lrs = [f["lr"]] * 2  # App. D: Adam at a constant lr
    assert_optimiser(made, run.model, lrs, weight_decay=f["weight_decay"], betas=(0.9, 0.999), eps=1e-8,
                     amsgrad=False, decoupled_weight_decay=False)  # App. D: Adam (torch's defaults), not AdamW
    assert sched == [] and setlr == []
    assert_logged_lr(out, lrs)
    assert [(c["args"]["arch"], c["args"]["stem"]) for c in nets] == [(f["arch"], "cifar")]
    assert [(c["args"]["in_dim"], c["args"]["spec"], c["args"]["bias"]) for c in projs] == \
        [(run.model.backbone.dim, f"{f['pdim']}-{f['pdim']}", [False, True])]  # the authors' projector: pdim-pdim
    assert [(len(c["args"]["images"]), c["args"]["m"], c["args"]["out_size"], tuple(c["args"]["scale"]),
             tuple(c["args"]["ratio"])) for c in views] == [(B, M, f["out_size"], f["scale"], (3 / 4, 4 / 3))] * 2
    assert [(c["args"]["n"], tuple(c["args"]["scale"]), tuple(c["args"]["ratio"])) for c in boxes] == \
        [(M * B, f["scale"], (3 / 4, 4 / 3))] * 2
    # the authors' CIFAR pipeline: flip 0.5, jitter 0.4/0.4/0.4/0 p 0.8, grey --p-gray, no blur, no solarize
    want_aug = {"flip": 0.5, "jitter": [0.4, 0.4, 0.4, 0.0], "p_jitter": 0.8, "p_gray": f["p_gray"], "p_blur": 0.0,
                "blur_sigma": [0.1, 2.0], "p_solarize": 0.0, "mean": SYNTHETIC_STATS[0], "std": SYNTHETIC_STATS[1]}
    assert [tuple(c["args"]["x"].shape) for c in augs] == [(M * B, 3, f["out_size"], f["out_size"])] * 2
    assert [aug_dict(c["args"]["cfg"]) for c in augs] == [want_aug] * 2
    logged = metrics(out)
    if loss == "barlow":
        assert vicregs == []
        assert [(tuple(c["args"]["Z"].shape), c["args"]["lam"]) for c in barlows] == [((M, B, f["pdim"]), f["lam"])] * 2
        for r in logged:  # Eq. (10), Barlow Twins form: invariance + lam * redundancy
            assert r["loss"] == pytest.approx(r["inv"] + f["lam"] * r["redundancy"], rel=1e-5)
    else:
        assert barlows == []
        assert [(tuple(c["args"]["Z"].shape), c["args"]["sim_coeff"], c["args"]["std_coeff"], c["args"]["cov_coeff"])
                for c in vicregs] == [((M, B, f["pdim"]), f["sim_coeff"], f["std_coeff"], f["cov_coeff"])] * 2
        for r in logged:  # Eq. (10), VICReg form (App. D Eq. 49)
            want = f["sim_coeff"] * r["inv"] + f["std_coeff"] * r["var"] + f["cov_coeff"] * r["cov"]
            assert r["loss"] == pytest.approx(want, rel=1e-5)
    ck = common.load_checkpoint(str(out / "checkpoint.pt"), "multiaug_ssl")
    p = ck["probe"]
    assert (p["arch"], p["stem"], p["out_size"], p["represent"], p["proj"], p["proj_bias"], [p["mean"], p["std"]]) == (
        f["arch"], "cifar", f["out_size"], "image", f"{f['pdim']}-{f['pdim']}", [False, True], SYNTHETIC_STATS)
    assert norm(p["views"]["scale"]) == norm(f["scale"]) and norm(p["views"]["ratio"]) == [3 / 4, 4 / 3]
    assert aug_dict(p["views"]["aug"]) == want_aug
    assert ck["args"]["train_images"] == images
    assert_saved_args(ck, f)


def test_multiaug_ssl_defaults_are_the_papers(tmp_path, monkeypatch):
    """No flags is the paper's CIFAR-10 multi-view recipe. Catches a default changed or mistyped."""
    a = args_at_load(multiaug_ssl, ["--out", str(tmp_path / "d")], monkeypatch)
    assert a.dataset == "cifar10"
    assert a.arch == "resnet50"  # App. D: ResNet-50 on CIFAR-10 and STL-10
    assert a.epochs == 100 and a.schedule_epochs is None  # Sec. 4 / App. D Table 4: 100 epochs, constant lr
    assert a.batch_size == 256  # App. D Table 4: 256 on CIFAR
    assert a.lr == 1e-3  # App. D Table 4: Adam, lr 1e-3
    assert a.weight_decay == 1e-6  # App. D Table 4: weight decay 1e-6
    assert a.views == 4 and a.loss == "barlow"  # Sec. 4.2, Fig. 3: the 4-augmentation runs
    assert a.pdim == 256  # Sec. 4.2: a 256-d projector for all multi-augmentation runs
    assert a.lam == 0.01  # Sec. 4.1 tunes lambda per pdim; the authors' scripts: 0.01 for 4 views, pdim 256
    assert (a.sim_coeff, a.std_coeff, a.cov_coeff) == (25.0, 25.0, 1.0)  # App. D Eq. (49): VICReg's 25, 25, 1
    assert a.train_fraction == 1.0  # Sec. 4.3: the whole set unless the sample-efficiency runs
    assert a.out_size is None  # the image side (32 on CIFAR), as the authors' CIFAR pipeline
    assert tuple(a.scale) == (0.08, 1.0) and a.p_gray == 0.2  # the authors' CIFAR pipeline (SPEC 3.3)


# --- NPID + SqrtKL ----------------------------------------------------------------------------------------

SQRTKL_COEF = {"full": 0.5, "l1": 1.0, "l2": -0.5}  # App. A.1: dL/ds_n = coef p_n (log p_n + H) of each part


@pytest.mark.parametrize("variant", sorted(NPID_RUNS))
def test_npid_sqrtkl_recipe_values_reach_the_computation(variant, tmp_path, monkeypatch):
    """Catches: the bank momentum m applied as 1 - m (0.5 by default, where the two agree), in main or in the
    update; --temperature, --sqrtkl-part, --bank-chunk not reaching the loss; --lam not weighting SqrtKL, or
    not reaching Grad Update's --bank-grad full share (or --sqrtkl-part's coefficient wrong there); --no-grad-
    update or --no-calibrate ignored; Feature Calibrate at another input side or BatchNorm mode than
    --out-size / --calibrate-bn, or its bank not the one training starts from; SGD built without
    --weight-decay or momentum 0.9; the cosine over --epochs instead of --schedule-epochs; the crop's scale
    (0.2, 1) or --out-size off; --flip, --jitter, --p-jitter, --p-gray not reaching the augmentation (or
    two of them swapped); --proj not reaching the head; the probe info off."""
    f = {**NPID, **NPID_RUNS[variant]}
    out = tmp_path / "run"
    d = defaults_of("npid_sqrtkl", tmp_path, monkeypatch)
    made = spy_optimizer(monkeypatch, torch.optim, "SGD")
    sched, views, boxes, augs, projs, nets = spies(
        monkeypatch, common, "cosine_lr", "sample_views", "random_resized_boxes", "augment", "projector", "backbone")
    cals = spy(monkeypatch, npid_sqrtkl, "calibrate", copy=("result",))
    rands = spy(monkeypatch, npid_sqrtkl, "random_bank", copy=("result",))
    losses = spy(monkeypatch, npid_sqrtkl, "instance_loss")
    updates = spy(monkeypatch, npid_sqrtkl, "global_batch_update", copy=("bank",))
    steps = spy(monkeypatch, common.Run, "step")
    run_main(npid_sqrtkl, f, out, d)

    B, spe, tau, m = f["batch_size"], SUBSET // f["batch_size"], f["temperature"], f["bank_momentum"]
    horizon = spe * f["schedule_epochs"]
    run = the_run(steps)
    assert (run.steps_per_epoch, run.total, run.horizon, len(run.train), run.inputs) == (
        spe, spe * f["epochs"], horizon, SUBSET, B)
    lrs = [cosine(0, horizon, f["lr"]), cosine(1, horizon, f["lr"])]
    assert_optimiser(made, run.model, lrs, weight_decay=f["weight_decay"], momentum=0.9, dampening=0,
                     nesterov=False)  # Sec. 4.1: SGD, momentum 0.9
    assert [(c["args"]["step"], c["args"]["total"], c["args"]["base_lr"], c["args"]["warmup"], c["args"]["final"])
            for c in sched] == [(0, horizon, f["lr"], 0, 0.0), (1, horizon, f["lr"], 0, 0.0)]
    assert_logged_lr(out, lrs)
    assert [(c["args"]["arch"], c["args"]["stem"]) for c in nets] == [(f["arch"], "cifar")]
    assert [(c["args"]["in_dim"], c["args"]["spec"]) for c in projs] == [(run.model.backbone.dim, f["proj"])]
    dim = int(f["proj"])
    # one crop per image: NPID's RandomResizedCrop(scale (0.2, 1)), torchvision's ratio
    assert [(len(c["args"]["images"]), c["args"]["m"], c["args"]["out_size"], tuple(c["args"]["scale"]),
             tuple(c["args"]["ratio"])) for c in views] == [(B, 1, f["out_size"], (0.2, 1.0), (3 / 4, 4 / 3))] * 2
    assert [(c["args"]["n"], tuple(c["args"]["scale"])) for c in boxes] == [(B, (0.2, 1.0))] * 2
    want_aug = {"flip": f["flip"], "jitter": list(f["jitter"]), "p_jitter": f["p_jitter"], "p_gray": f["p_gray"],
                "p_blur": 0.0, "blur_sigma": [0.1, 2.0], "p_solarize": 0.0,
                "mean": SYNTHETIC_STATS[0], "std": SYNTHETIC_STATS[1]}
    assert [tuple(c["args"]["x"].shape) for c in augs] == [(B, 3, f["out_size"], f["out_size"])] * 2
    assert [aug_dict(c["args"]["cfg"]) for c in augs] == [want_aug] * 2
    # the bank training starts from: Feature Calibrate (Sec. 3.2) or NPID's random bank (--no-calibrate)
    if f["no_calibrate"]:
        assert cals == [] and [(c["args"]["n"], c["args"]["dim"]) for c in rands] == [(SUBSET, dim)]
        start = rands[0]["result_copy"]
    else:
        assert rands == [] and len(cals) == 1
        a = cals[0]["args"]
        assert (a["model"] is run.model, len(a["train"]), a["out_size"], a["bn"], [list(a["mean"]), list(a["std"])]) \
            == (True, SUBSET, f["out_size"], f["calibrate_bn"], SYNTHETIC_STATS)
        start = cals[0]["result_copy"]
    assert len(updates) == 2 and torch.equal(updates[0]["before"]["bank"], start)
    # the loss: s = W z / tau over the whole bank (Eq. 1), CE (Eq. 2) + lam SqrtKL (Eq. 7, 12, 13)
    assert [(tuple(c["args"]["z"].shape), c["args"]["tau"], c["args"]["part"], c["args"]["chunk"]) for c in losses] \
        == [((B, dim), tau, f["sqrtkl_part"], f["bank_chunk"])] * 2
    kl_coef = f["lam"] * SQRTKL_COEF[f["sqrtkl_part"]] if f["bank_grad"] == "full" else 0.0
    for c, up, r in zip(losses, updates, metrics(out)):
        a, u = c["args"], up["args"]
        pre, post, z, I = up["before"]["bank"], up["after"]["bank"], u["z"], u["idx"]
        assert torch.equal(a["target"], I) and torch.equal(a["z"].detach(), z)
        logp = F.log_softmax(z.double() @ pre.double().T / tau, dim=1)
        p = logp.exp()
        ce = -logp.gather(1, I[:, None]).squeeze(1)
        L1, L2 = (p * logp).sum(1), -(p * F.log_softmax(0.5 * logp, dim=1)).sum(1)
        kl = {"full": L1 + L2, "l1": L1, "l2": L2}[f["sqrtkl_part"]]
        assert (r["ce"], r["sqrtkl"]) == pytest.approx((ce.mean().item(), kl.mean().item()), rel=1e-4, abs=1e-6)
        assert r["loss"] == pytest.approx(r["ce"] + f["lam"] * r["sqrtkl"], rel=1e-5)  # Eq. (13)
        # the bank update: Grad Update Eq. (5)-(6) (or NPID's Eq. 3), w <- m w + (1 - m) z_hat, re-normalised
        assert (u["tau"], u["m"], u["grad_update"], u["kl_coef"]) == (tau, m, not f["no_grad_update"], kl_coef)
        H = -(p * logp).sum(1)
        P, logP = p[:, I], logp[:, I]
        G = P + kl_coef * P * (logP + H[:, None])
        z_hat = z.double() - G.T @ z.double() if not f["no_grad_update"] else z.double()
        want = F.normalize(m * pre[I].double() + (1 - m) * z_hat, dim=1)
        assert torch.allclose(post[I].double(), want, atol=1e-5), (post[I] - want).abs().max()
        rest = torch.ones(SUBSET, dtype=torch.bool)
        rest[I] = False
        assert torch.equal(post[rest], pre[rest])
    ck = common.load_checkpoint(str(out / "checkpoint.pt"), "npid_sqrtkl")
    p = ck["probe"]
    assert (p["arch"], p["stem"], p["out_size"], p["represent"], p["proj"], [p["mean"], p["std"]]) == (
        f["arch"], "cifar", f["out_size"], "image", f["proj"], SYNTHETIC_STATS)
    assert torch.equal(ck["state"]["bank"], updates[-1]["after"]["bank"])
    assert_saved_args(ck, f)


def test_npid_sqrtkl_defaults_are_the_papers(tmp_path, monkeypatch):
    """No flags is Sec. 4.1's CIFAR-10 recipe (NPID's code where the paper is silent). Catches a default changed
    or mistyped."""
    a = args_at_load(npid_sqrtkl, ["--out", str(tmp_path / "d")], monkeypatch)
    assert a.dataset == "cifar10"
    assert a.arch == "resnet18"  # Sec. 4.1 / Table 1: ResNet-18
    assert a.batch_size == 512  # Sec. 4.1: batch 512
    assert a.lr == 0.1  # Sec. 4.1: base lr 0.1, cosine decay
    assert a.weight_decay == 1e-4  # Sec. 4.1: weight decay 0.0001 (momentum 0.9: the wiring test)
    assert a.epochs == 400 and a.schedule_epochs is None  # Sec. 4.1: 400 epochs on CIFAR
    assert a.bank_momentum == 0.5  # Sec. 4.1: m = 0.5 (Eq. 3 / 6)
    assert a.lam == 20.0  # Sec. 4.1: lambda = 20 (Eq. 13)
    assert a.temperature == 0.1  # NPID's CIFAR temperature (the paper's Eq. 1 has none; docs/recipes.md)
    assert a.proj == "128"  # Sec. 3.1: a linear head to 128-d, as NPID
    assert a.sqrtkl_part == "full"  # Eq. (12)-(13): L_SqrtKL = L1 + L2 (Table 8 ablates the parts)
    assert not a.no_calibrate and not a.no_grad_update  # Sec. 3.2: Feature Calibrate and Grad Update (Table 6 ablates)
    assert a.bank_grad == "ce" and a.calibrate_bn == "eval"  # Eq. (4)-(5): the CE gradient; NPID's eval-mode features
    assert a.bank_chunk == 0 and a.out_size is None  # the whole softmax at once; the image side
    # the augmentation: NPID's CIFAR code (the paper is silent): jitter 0.4 x 4 always, grey 0.2, no flip
    assert (tuple(a.jitter), a.p_jitter, a.p_gray, a.flip) == ((0.4, 0.4, 0.4, 0.4), 1.0, 0.2, 0.0)
