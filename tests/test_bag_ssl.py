"""Tests of bag_ssl.py: the four losses against float64 re-computations and closed forms, the
global-batch gather (1 process vs 2 gloo processes), BYOL's EMA target, the views, and the CLI."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import bag_ssl
import common
from dist_util import run_world
from learn_util import assert_learns, learning_margins

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSSES = ("vicreg", "simclr", "tcr", "byol")


def args_for(loss, *extra):
    return bag_ssl.resolve_args(["--dataset", "synthetic", "--loss", loss, "--out", "/nonexistent", *extra])


# --- float64 references, written from the papers' formulas ----------------------------------


def ref_vicreg(z1, z2, sim=25.0, std=25.0, cov=1.0):
    z1, z2 = z1.double(), z2.double()
    B, d = z1.shape
    inv = ((z1 - z2) ** 2).sum() / (B * d)
    var = cov_term = 0.0
    for z in (z1, z2):
        mu = z.sum(0) / B
        c = sum(torch.outer(z[i] - mu, z[i] - mu) for i in range(B)) / (B - 1)  # covariance matrix
        var = var + torch.clamp(1 - torch.sqrt(torch.diagonal(c) + 1e-4), min=0).sum() / d / 2
        cov_term = cov_term + (c ** 2).sum() / d - (torch.diagonal(c) ** 2).sum() / d
    return sim * inv + std * var + cov * cov_term, inv, var, cov_term


def ref_simclr(z1, z2, t):
    z = torch.cat([z1, z2]).double()
    z = z / z.norm(dim=1, keepdim=True)
    n, B = len(z), len(z1)
    total = 0.0
    for i in range(n):
        pos = (i + B) % n
        num = math.exp(float(z[i] @ z[pos]) / t)
        den = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(n) if k != i)
        total += -math.log(num / den)
    return total / n


def ref_tcr(Z, eps2, lam):
    Z = Z.double()
    Z = Z / Z.norm(dim=-1, keepdim=True)
    n, b, d = Z.shape
    Z_bar = Z.mean(0)
    total = 0.0
    for i in range(n):  # always the d x d form: independent of the code's Sylvester switch
        R = 0.5 * torch.logdet(torch.eye(d, dtype=torch.float64) + d / (b * eps2) * Z[i].T @ Z[i])
        cos = (Z[i] * Z_bar).sum(1) / (Z[i].norm(dim=1) * Z_bar.norm(dim=1))
        total += R + lam * cos.mean()
    return -total / n


def ref_byol(p1, p2, t1, t2):
    def nmse(p, t):
        p, t = p.double(), t.double()
        return (((p / p.norm(dim=1, keepdim=True) - t / t.norm(dim=1, keepdim=True)) ** 2).sum(1)).mean()
    return nmse(p1, t2) + nmse(p2, t1)


def reference(loss, Z, T, args):
    if loss == "vicreg":
        return ref_vicreg(Z[0], Z[1])[0]
    if loss == "simclr":
        return ref_simclr(Z[0], Z[1], args.temperature)
    if loss == "tcr":
        return ref_tcr(Z, args.eps2, args.inv_weight)
    return ref_byol(Z[0], Z[1], T[0], T[1])


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("B,d", [(12, 20), (24, 8)])  # d > B and d < B (TCR's two Gram forms)
def test_loss_equals_float64_recomputation(loss, B, d):
    g = torch.Generator().manual_seed(B + d)
    Z = torch.randn(2, B, d, generator=g)
    T = torch.randn(2, B, d, generator=g)
    args = args_for(loss)
    got = bag_ssl.bag_loss(Z, T, args)["loss"]
    want = float(reference(loss, Z, T, args))
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(want, rel=1e-4, abs=1e-4)


def test_vicreg_terms_and_three_views_average_the_pairs():
    g = torch.Generator().manual_seed(3)
    Z = torch.randn(3, 16, 6, generator=g)
    t = bag_ssl.vicreg(Z[0], Z[1])
    _, inv, var, cov = ref_vicreg(Z[0], Z[1])
    for k, v in (("inv", inv), ("var", var), ("cov", cov)):
        assert float(t[k]) == pytest.approx(float(v), rel=1e-4)
    got = bag_ssl.bag_loss(Z, None, args_for("vicreg", "--patches", "3"))["loss"]
    want = sum(float(ref_vicreg(Z[i], Z[j])[0]) for i, j in ((0, 1), (0, 2), (1, 2))) / 3
    assert float(got) == pytest.approx(want, rel=1e-4)


def test_vicreg_variance_term_is_zero_when_every_std_is_at_least_one():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(32, 10, generator=g), torch.randn(32, 10, generator=g)
    scale = 1 + 2 * torch.rand(10, generator=g)  # per-dimension std in [1, 3]
    z1 = (z1 - z1.mean(0)) / z1.std(0) * scale
    z2 = (z2 - z2.mean(0)) / z2.std(0) * scale
    assert float(bag_ssl.vicreg(z1, z2)["var"]) == 0.0
    # std exactly 0.5 in every dimension: the hinge is 1 - sqrt(0.25 + 1e-4) in closed form
    h1, h2 = z1 / scale * 0.5, z2 / scale * 0.5
    assert float(bag_ssl.vicreg(h1, h2)["var"]) == pytest.approx(1 - math.sqrt(0.25 + 1e-4), rel=1e-5)


@pytest.mark.parametrize("t", [0.1, 1.0])
def test_simclr_closed_form_for_identical_views_of_orthonormal_samples(t):
    B, d = 6, 16
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(1)))
    z = q[:B] * 3.0  # orthogonal rows (the loss normalises them)
    got = float(bag_ssl.simclr(z, z.clone(), t)["loss"])
    # positive similarity 1, the 2B - 2 negatives 0: -log(e^(1/t) / (e^(1/t) + 2B - 2))
    assert got == pytest.approx(math.log(1 + (2 * B - 2) * math.exp(-1 / t)), rel=1e-5, abs=1e-6)


def test_byol_loss_is_zero_when_prediction_matches_other_target_and_four_when_opposite():
    g = torch.Generator().manual_seed(2)
    t1, t2 = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    assert float(bag_ssl.byol(2 * t2, 0.5 * t1, t1, t2)["loss"]) == pytest.approx(0.0, abs=1e-6)
    assert float(bag_ssl.byol(-t2, -t1, t1, t2)["loss"]) == pytest.approx(8.0, rel=1e-6)


# --- 1 process vs 2 gloo processes: the loss sees the global batch ---------------------------


def _global_batch(world=2, b=5, d=12):
    g = torch.Generator().manual_seed(7)
    return torch.randn(2, world * b, d, generator=g), torch.randn(2, world * b, d, generator=g), b


def _loss_and_grad(rank, world, Z, T, b):
    """Each rank takes its slice of every view of the global batch (view-major rows)."""
    out = {}
    for loss in LOSSES:
        args = args_for(loss)
        z = Z[:, rank * b:(rank + 1) * b].reshape(-1, Z.shape[-1]).clone().requires_grad_(True)
        t = T[:, rank * b:(rank + 1) * b].reshape(-1, T.shape[-1]) if loss == "byol" else None
        value = bag_ssl.global_loss(z, t, args)["loss"]
        value.backward()
        out[loss] = (value.detach(), z.grad)
    return out


@pytest.mark.slow
def test_two_process_loss_and_gradients_equal_one_process_on_the_concatenated_batch():
    Z, T, b = _global_batch()
    world = 2
    one = _loss_and_grad(0, 1, Z, T, world * b)  # no process group: gather is the identity
    two = run_world(_loss_and_grad, world=world, args=(Z, T, b))
    for loss in LOSSES:
        value, grad = one[loss]
        grad = grad.reshape(2, world * b, -1)
        for r in range(world):
            v, gr = two[r][loss]
            assert torch.allclose(v, value, rtol=1e-5, atol=1e-6), loss
            # the gather's backward sums over the ranks' copies of the loss (DDP then averages)
            assert torch.allclose(gr.reshape(2, b, -1) / world, grad[:, r * b:(r + 1) * b], rtol=1e-4, atol=1e-6), loss


# --- BYOL target ------------------------------------------------------------------------------


def _small_byol():
    torch.manual_seed(0)
    model = bag_ssl.BagNet("resnet18", "cifar", "64-32", pred_hidden=64)
    return model, bag_ssl.Target(model)



def test_byol_ema_update_follows_the_cosine_momentum_schedule():
    model, target = _small_byol()
    assert bag_ssl.byol_tau(0, 100, 0.99) == pytest.approx(0.99)
    assert bag_ssl.byol_tau(100, 100, 0.99) == pytest.approx(1.0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    old = [p.clone() for p in target.parameters()]
    online = [*model.backbone.parameters(), *model.projector.parameters()]
    k, K = 30, 100
    tau = 1 - (1 - 0.99) * (math.cos(math.pi * k / K) + 1) / 2  # BYOL Sec. 3.2, by hand
    bag_ssl.ema_update(target, model, bag_ssl.byol_tau(k, K, 0.99))
    assert len(old) == len(online)
    for xi, xi0, theta in zip(target.parameters(), old, online):
        assert torch.allclose(xi, tau * xi0 + (1 - tau) * theta, atol=1e-6)
    assert not torch.allclose(old[0], next(target.parameters()))


def test_byol_target_is_not_in_the_optimiser_and_takes_no_gradient():
    model, target = _small_byol()
    opt = bag_ssl.make_optimizer(model, args_for("byol"))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.parameters()}
    assert not in_opt & {id(p) for p in target.parameters()}
    assert not any(p.requires_grad for p in target.parameters())
    assert not any(k.startswith(("target", "predictor")) for k in target.state_dict())


# --- views and augmentations ------------------------------------------------------------------


def test_default_views_are_fixed_14px_patches_and_multiscale_views_are_random_resized_crops():
    imgs = common.synthetic_set("test", n=64).images
    g = torch.Generator().manual_seed(0)
    args = args_for("vicreg")
    x, boxes = bag_ssl.sample(imgs, args, g)
    assert x.shape == (2 * 64, 3, 32, 32) and args.patch_size == 14
    assert (boxes[:, 2] == 14).all() and (boxes[:, 3] == 14).all()
    ms = args_for("vicreg", "--multiscale")
    x, boxes = bag_ssl.sample(imgs, ms, g)
    assert x.shape == (2 * 64, 3, 32, 32) and ms.patch_size is None
    area = (boxes[:, 2] * boxes[:, 3]).float() / (32 * 32)
    assert len(set(boxes[:, 2].tolist())) > 5 and area.min() < 0.3 and area.max() > 0.7
    assert (area > 0.08 * 0.9).all()  # scale (0.08, 1), up to rounding


def test_augmentations_are_byol_asymmetric_and_applied_per_view():
    # App. C.1: BYOL's augmentations on every data set, 32 px included; --no-blur drops the blur only
    for args in (args_for("vicreg"), bag_ssl.resolve_args(["--dataset", "in100", "--out", "/nonexistent"])):
        a1, a2 = bag_ssl.byol_augs(args)
        assert (a1.p_blur, a2.p_blur, a1.p_solarize, a2.p_solarize) == (1.0, 0.1, 0.0, 0.2)
        assert a1.blur_sigma == a2.blur_sigma == (0.1, 2.0)
    a1, a2 = bag_ssl.byol_augs(args_for("vicreg", "--no-blur"))
    assert (a1.p_blur, a2.p_blur, a1.p_solarize, a2.p_solarize) == (0.0, 0.0, 0.0, 0.2)
    assert a1.jitter == (0.4, 0.4, 0.2, 0.1) and a1.p_jitter == 0.8 and a1.p_gray == 0.2
    # view slices get their own config: view 1 untouched, view 2 always grayscale
    keep = common.AugConfig(flip=0, p_jitter=0, p_gray=0, p_blur=0, p_solarize=0, mean=(0,) * 3, std=(1,) * 3)
    gray = common.AugConfig(flip=0, p_jitter=0, p_gray=1, p_blur=0, p_solarize=0, mean=(0,) * 3, std=(1,) * 3)
    x = torch.rand(2 * 4, 3, 8, 8)
    y = bag_ssl.augment_views(x, 2, (keep, gray))
    assert torch.equal(y[:4], x[:4])
    assert torch.allclose(y[4:, 0], y[4:, 1]) and not torch.allclose(x[4:, 0], x[4:, 1])


def test_defaults_follow_the_paper_per_data_set():
    c10 = bag_ssl.resolve_args(["--out", "/nonexistent"])
    assert (c10.arch, c10.proj, c10.lr, c10.epochs, c10.batch_size, c10.weight_decay) == \
        ("resnet34", "4096-128", 0.3, 600, 1024, 1e-4)
    assert (c10.patches, c10.patch_size, c10.out_size, c10.stem, c10.inv_weight) == (2, 14, 32, "cifar", 30.0)
    assert c10.norm_mean == list(common.data_stats("cifar10")[0])
    assert bag_ssl.resolve_args(["--dataset", "cifar100", "--out", "/x"]).proj == "4096-512"
    in100 = bag_ssl.resolve_args(["--dataset", "in100", "--out", "/x"])
    assert (in100.arch, in100.proj, in100.lr, in100.epochs, in100.patch_size, in100.out_size, in100.stem) == \
        ("resnet50", "8192-8192-8192", 0.1, 400, 100, 224, "imagenet")


# --- command line -----------------------------------------------------------------------------

TINY = ["--dataset", "synthetic", "--epochs", "1", "--arch", "resnet18", "--out-size", "16", "--log-every", "1"]


def run(args, env=None, **kw):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=e, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("loss,extra", [("simclr", ["--multiscale"]), ("vicreg", [])])
def test_cli_runs_and_writes_a_checkpoint(tmp_path, loss, extra):
    r = run(["bag_ssl.py", *TINY, "--loss", loss, "--subset", "64", "--batch-size", "16", "--max-steps", "2",
             "--out", str(tmp_path), *extra])
    assert r.returncode == 0, r.stderr
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    a = ck["args"]
    assert ck["method"] == "bag_ssl" and ck["step"] == 2 and a["loss"] == loss
    assert a["patch_size"] == (None if extra else 14) and a["out_size"] == 16 and a["stem"] == "cifar"
    for k in ("arch", "norm_mean", "norm_std", "proj"):
        assert a[k] is not None
    assert any(k.startswith("backbone.") for k in ck["model"]) and any(k.startswith("projector.") for k in ck["model"])
    lines = [json.loads(s) for s in open(tmp_path / "metrics.jsonl")]
    assert len(lines) == 2 and all(math.isfinite(x["loss"]) for x in lines)
    # the probe represents the whole image for --multiscale, else the bag: the rate counts views or patches
    unit, other = ("views", "patches") if extra else ("patches", "views")
    assert ck["probe"]["represent"] == ("image" if extra else "bag")
    assert all(f"{unit}_per_s" in x and f"{other}_per_s" not in x for x in lines)
    assert all(f" {unit}/s " in s for s in r.stdout.splitlines() if s.startswith("epoch")) and f"{unit}/s" in r.stdout


@pytest.mark.slow
def test_byol_resume_after_a_crash_restores_the_ema_target(tmp_path):
    base = ["bag_ssl.py", *TINY, "--loss", "byol", "--subset", "64", "--batch-size", "8", "--max-steps", "4",
            "--proj", "128-32", "--pred-hidden", "64"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert run(base + ["--out", str(full)]).returncode == 0
    r = run(["tests/crash_at.py", "3", *base, "--out", str(part), "--save-every", "2"])  # dies after step 3
    assert r.returncode == 137  # died after step 3; the checkpoint holds step 2
    assert torch.load(part / "checkpoint.pt", weights_only=True)["step"] == 2
    r = run(base + ["--out", str(part), "--resume"])
    assert r.returncode == 0 and "resumed" in r.stdout, r.stderr
    a, b = (torch.load(p / "checkpoint.pt", weights_only=True) for p in (full, part))
    assert a["step"] == b["step"] == 4
    tgt = a["state"]["target"]
    assert set(tgt) == {k for k in a["model"] if not k.startswith("predictor.")}  # backbone + projector
    # the target is the EMA of the online net, not the online net, and not in the optimiser
    w = "projector.0.weight"
    assert not torch.allclose(tgt[w], a["model"][w])
    assert len(a["optimizer"]["state"]) == sum(1 for k in a["model"] if "running" not in k and "num_batches" not in k)
    for k in tgt:
        assert torch.allclose(tgt[k].float(), b["state"]["target"][k].float(), atol=1e-5), k
    for k in a["model"]:
        assert torch.allclose(a["model"][k].float(), b["model"][k].float(), atol=1e-5), k


def test_bad_patch_size_exits_2_with_one_line(tmp_path):
    r = run(["bag_ssl.py", "--dataset", "synthetic", "--patch-size", "40", "--out", str(tmp_path / "x")])
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "patch-size" in r.stderr
    assert not (tmp_path / "x").exists()


# BagSSL's check on the coarse-texture set (2026-12-07, 2-core AMD EPYC, one thread, learn_util's probe; random
# init 28.0 / 24.8 on seeds 0 / 1; results/cpu/coarse-texture/results.log): TCR with BYOL's blur (the recipe), lr
# 0.1 for the batch of 32: 60 steps +4.4 (seed 0), 120 steps +12.0 / +7.6, 240 steps +17.6 / +19.6. On the former
# period-4 grating set the check needed --no-blur (the blur erased the grating at 16 px).


@pytest.mark.slow
def test_tcr_short_run_beats_random_init(tmp_path, monkeypatch):
    """BagSSL's fixed-scale patch pairs (14 px, two per image, resized to 16 px: the CIFAR recipe's views at half
    their side) under its TCR loss with the recipe's augmentation (BYOL's, blur included; App. C.1: lambda 30,
    eps^2 0.2, LARS, warm-up + cosine over the run) lift the backbone's k-NN accuracy above its random init by
    learn_util.MARGIN, seed 0. Changed from the recipe: sizes (240 steps of 32 images, 16 px views) and the
    learning rate for the batch of 32 (0.1; App. C.1's 0.3 is for 1,024). About 6 minutes at one thread."""
    acc = learning_margins(bag_ssl.main, ["--arch", "resnet18", "--out-size", "16", "--loss", "tcr", "--lr", "0.1",
                                          "--subset", "960", "--batch-size", "32", "--epochs", "8",
                                          "--log-every", "60"],
                           tmp_path, monkeypatch, seeds=(0,))
    assert_learns(acc)


@pytest.mark.parametrize("dataset,flags,blur", [("cifar10", [], True), ("stl10", [], True),
                                               ("cifar10", ["--no-blur"], False)])
def test_byol_views_are_the_papers_recipe(dataset, flags, blur, tmp_path):
    """BYOL's asymmetric views (Grill et al. 2020, Table 6; BagSSL App. C.1 takes them as they are): flip
    0.5, ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8, grayscale 0.2 on both; blur 1.0 / 0.1 and solarization
    0 / 0.2 on views 1 / 2, on 32 px images too; --no-blur drops the blur."""
    from recipe_util import assert_recipe
    v1, v2 = bag_ssl.byol_augs(bag_ssl.resolve_args(["--dataset", dataset, "--out", str(tmp_path / "run"), *flags]))
    assert_recipe(v1, 0.5, (0.4, 0.4, 0.2, 0.1), 0.8, 0.2, 1.0 if blur else 0.0, 0.0)
    assert_recipe(v2, 0.5, (0.4, 0.4, 0.2, 0.1), 0.8, 0.2, 0.1 if blur else 0.0, 0.2)
