"""emp_ssl.py: the loss of Eq. (1)-(2) against float64 re-computations written here from the
paper (both forms of the log-det, the closed form of orthonormal rows, the sign),
the global batch under 2-process gloo, --grad-checkpoint, float32 loss under bf16, the CLI
(logs, checkpoint read by eval_linear.py, beating the random-init probe, torchrun, resume,
user errors, non-finite loss) and the per-data-set defaults."""
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import emp_ssl
from dist_util import run_world
from check_util import assert_state_dicts_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the smallest CLI runs: 8 px patches, not upsampled (seconds per run on a loaded CPU)
TINY = ["--dataset", "synthetic", "--subset", "64", "--batch-size", "16", "--patches", "2",
        "--patch-size", "8", "--out-size", "8", "--log-every", "1"]


# --- float64 references, written from Eq. (1)-(2) (numpy, no code shared with emp_ssl) -------


def ref_R(Zi, eps2, form):
    """Eq. (1) for one view Zi [b, d], float64: 1/2 logdet(I_d + d/(b eps2) Zi^T Zi) ('d') or
    the b x b form 1/2 logdet(I_b + d/(b eps2) Zi Zi^T) ('b')."""
    Zi = np.asarray(Zi, dtype=np.float64)
    b, d = Zi.shape
    c = d / (b * eps2)
    M = np.eye(d) + c * Zi.T @ Zi if form == "d" else np.eye(b) + c * Zi @ Zi.T
    sign, logdet = np.linalg.slogdet(M)
    assert sign > 0
    return 0.5 * logdet


def ref_emp(Z, eps2, lam):
    """Eq. (2), float64: -(1/n) sum_i [R(Z_i) + lam * D(Z_i, Z_bar)], D = batch mean of the
    cosine similarity of row j of Z_i with row j of Z_bar. Returns (loss, mean R, mean D)."""
    Z = np.asarray(Z, dtype=np.float64)
    n, b, d = Z.shape
    Z_bar = Z.sum(0) / n
    Rs, Ds = [], []
    for i in range(n):
        Rs.append(ref_R(Z[i], eps2, "d"))
        cos = [Z[i, j] @ Z_bar[j] / (np.linalg.norm(Z[i, j]) * np.linalg.norm(Z_bar[j])) for j in range(b)]
        Ds.append(sum(cos) / b)
    loss = -sum(r + lam * dd for r, dd in zip(Rs, Ds)) / n
    return loss, sum(Rs) / n, sum(Ds) / n


def ref_emp_torch64(Z, eps2, lam):
    """The same loss in float64 torch (for gradients): explicit identity, explicit norms."""
    n, b, d = Z.shape
    c = d / (b * eps2)
    Z_bar = Z.sum(0) / n
    total = 0.0
    for i in range(n):
        R = 0.5 * torch.logdet(torch.eye(d, dtype=torch.float64) + c * Z[i].T @ Z[i])
        D = ((Z[i] * Z_bar).sum(1) / (Z[i].norm(dim=1) * Z_bar.norm(dim=1))).mean()
        total = total + R + lam * D
    return -total / n


def unit_rows(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g) + 0.5, dim=-1)


# --- Eq. (1)-(2) -------------------------------------------------------------------------------


@pytest.mark.parametrize("n,b,d", [(3, 12, 5), (3, 5, 12), (2, 7, 7)])  # d < b, d > b, d = b
def test_emp_loss_equals_float64_recomputation_of_eq1_eq2(n, b, d):
    Z = unit_rows(n, b, d, seed=b * 31 + d)
    loss, R, D = emp_ssl.emp_loss(Z, eps2=0.2, lam=200.0)
    ref_loss, ref_R_mean, ref_D_mean = ref_emp(Z.numpy(), 0.2, 200.0)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref_loss, rel=1e-5, abs=1e-4)
    assert R.item() == pytest.approx(ref_R_mean, rel=1e-5)
    assert D.item() == pytest.approx(ref_D_mean, rel=1e-5)
    # other weights: lam and eps2 enter where Eq. (1)-(2) put them
    loss2, _, _ = emp_ssl.emp_loss(Z, eps2=0.5, lam=3.0)
    assert loss2.item() == pytest.approx(ref_emp(Z.numpy(), 0.5, 3.0)[0], rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("b,d", [(12, 5), (5, 12)])
def test_total_coding_rate_equals_both_logdet_forms(b, d):
    """R per view vs float64 logdet of I_d + c Z^T Z AND of I_b + c Z Z^T (Sylvester), for rows
    of any norm (not only unit rows), whichever form the code picks."""
    g = torch.Generator().manual_seed(b + d)
    Z = torch.randn(4, b, d, generator=g) * torch.rand(4, b, 1, generator=g)
    R = emp_ssl.total_coding_rate(Z, 0.2)
    assert R.shape == (4,) and R.dtype == torch.float32
    for i in range(4):
        rd, rb = ref_R(Z[i].numpy(), 0.2, "d"), ref_R(Z[i].numpy(), 0.2, "b")
        assert rd == pytest.approx(rb, rel=1e-10)  # the reference itself: Sylvester's identity
        assert R[i].item() == pytest.approx(rd, rel=1e-5)


@pytest.mark.parametrize("b,d", [(6, 16), (16, 6), (8, 8)])
def test_tcr_equals_closed_form_for_orthonormal_rows(b, d):
    """Orthonormal rows (b <= d) or columns (b > d): R = 1/2 * k * log(1 + d/(b eps2)), k = rank."""
    q, _ = torch.linalg.qr(torch.randn(max(b, d), min(b, d), generator=torch.Generator().manual_seed(1),
                                       dtype=torch.float64))
    Z = (q.T if b <= d else q).float()  # [b, d]
    eps2 = 0.2
    k = min(b, d)
    expected = 0.5 * k * math.log(1 + d / (b * eps2))
    R = emp_ssl.total_coding_rate(Z[None], eps2)
    assert R.item() == pytest.approx(expected, rel=1e-5)


def test_coding_rate_rises_and_loss_falls_as_rows_spread():
    """Sign check (a peer library ships this loss sign-flipped): rows r_j = normalize(u + t e_j)
    spread out as t grows; R must rise and the loss (with D = 1, views identical) must fall."""
    b, d, n = 8, 16, 2
    u = F.normalize(torch.ones(d), dim=0)
    Rs, losses = [], []
    for t in [0.0, 0.1, 0.3, 1.0, 3.0, 100.0]:
        rows = F.normalize(u[None] + t * torch.eye(d)[:b], dim=1)
        Z = rows[None].expand(n, b, d).contiguous()
        loss, R, D = emp_ssl.emp_loss(Z)
        assert D.item() == pytest.approx(1.0, abs=1e-6)
        Rs.append(R.item())
        losses.append(loss.item())
    assert all(r2 > r1 for r1, r2 in zip(Rs, Rs[1:])), Rs
    assert all(l2 < l1 for l1, l2 in zip(losses, losses[1:])), losses
    c = d / (b * 0.2)
    assert Rs[0] == pytest.approx(0.5 * math.log(1 + c * b), rel=1e-5)  # collapsed: rank 1, eigenvalue b
    assert Rs[-1] == pytest.approx(0.5 * b * math.log(1 + c), rel=1e-3)  # nearly orthonormal rows


def test_gradient_step_on_the_loss_spreads_rows_and_pulls_views_together():
    """A gradient-descent step on the loss with lam = 0 must raise R (rows spread); with the
    paper's lam = 200 it must raise D (patches move to their image's mean). A flipped sign
    lowers both."""
    Z0 = F.normalize(torch.ones(3, 8, 16) + 0.3 * torch.randn(3, 8, 16, generator=torch.Generator().manual_seed(0)),
                     dim=-1)
    for lam in (0.0, 200.0):
        Z = Z0.clone().requires_grad_(True)
        loss, R, D = emp_ssl.emp_loss(Z, lam=lam)
        loss.backward()
        with torch.no_grad():
            _, R1, D1 = emp_ssl.emp_loss(F.normalize(Z0 - 1e-3 / (1 + lam) * Z.grad, dim=-1), lam=lam)
        assert (R1 > R) if lam == 0 else (D1 > D), (lam, R, R1, D, D1)


@pytest.mark.parametrize("n,b,d", [(3, 10, 4), (2, 4, 10)])
def test_emp_loss_gradient_equals_float64_autograd(n, b, d):
    Z = unit_rows(n, b, d, seed=7).requires_grad_(True)
    emp_ssl.emp_loss(Z)[0].backward()
    Z64 = Z.detach().double().requires_grad_(True)
    ref_emp_torch64(Z64, 0.2, 200.0).backward()
    torch.testing.assert_close(Z.grad.double(), Z64.grad, rtol=1e-4, atol=1e-4)


def test_loss_terms_stay_float32_under_bf16():
    """bf16 projections are upcast; under bf16 autocast the Gram matrix and log-det still run in
    float32 (the reference is computed from the same values in float64)."""
    Z = unit_rows(3, 16, 32, seed=3)
    Zb = Z.bfloat16()
    loss, R, D = emp_ssl.emp_loss(Zb)
    assert loss.dtype == R.dtype == D.dtype == torch.float32
    ref = ref_emp(Zb.float().numpy(), 0.2, 200.0)
    assert R.item() == pytest.approx(ref[1], rel=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, R, D = emp_ssl.emp_loss(Z)
    assert loss.dtype == R.dtype == D.dtype == torch.float32
    ref = ref_emp(Z.numpy(), 0.2, 200.0)
    assert R.item() == pytest.approx(ref[1], rel=1e-5)  # a bf16 Gram matrix is off by ~1e-3
    assert loss.item() == pytest.approx(ref[0], rel=1e-5)


# --- 2-process gloo: the global batch ----------------------------------------------------------


def _dist_emp_loss(rank, world, Zs, eps2, lam):
    """Rank r holds its view-major slice [n*b_local, d] of each global batch Z [n, B, d]."""
    outs = []
    for Z in Zs:
        n, B, d = Z.shape
        b = B // world
        z = Z[:, rank * b:(rank + 1) * b].reshape(n * b, d).clone().requires_grad_(True)
        Zg = common.gather_views(z, n).reshape(n, -1, d)
        loss, R, D = emp_ssl.emp_loss(Zg, eps2, lam)
        loss.backward()
        outs.append({"loss": loss.detach(), "R": R.detach(), "D": D.detach(), "grad": z.grad, "Zg": Zg.detach()})
    return outs


@pytest.mark.slow
def test_two_process_loss_and_gradients_equal_one_process_on_global_batch():
    """Global B = 8 over 2 ranks of 4, with d = 3 (the d x d form) and d = 12 (the b x b form)."""
    n, B, world = 3, 8, 2
    b = B // world
    Zs = [unit_rows(n, B, d, seed=d) for d in (3, 12)]
    res = run_world(_dist_emp_loss, world, (Zs, 0.2, 200.0))
    for i, Z in enumerate(Zs):
        d = Z.shape[-1]
        Z1 = Z.clone().requires_grad_(True)
        loss1, R1, D1 = emp_ssl.emp_loss(Z1, 0.2, 200.0)
        loss1.backward()
        for r in range(world):
            out = res[r][i]
            torch.testing.assert_close(out["Zg"], Z)  # gather_views rebuilt the view-major global batch
            torch.testing.assert_close(out["loss"], loss1.detach(), rtol=1e-6, atol=1e-5)
            torch.testing.assert_close(out["R"], R1.detach(), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(out["D"], D1.detach(), rtol=1e-6, atol=1e-6)
            # VICReg gather convention: backward sums over ranks, DDP then averages -> divide by world
            expected = Z1.grad[:, r * b:(r + 1) * b].reshape(n * b, d)
            torch.testing.assert_close(out["grad"] / world, expected, rtol=1e-4, atol=1e-5)
        # a local-only loss (no gather) differs: the comparison can tell
        assert abs(emp_ssl.emp_loss(Z[:, :b], 0.2, 200.0)[0].item() - loss1.item()) > 1e-3


# --- model -------------------------------------------------------------------------------------


def test_grad_checkpoint_gives_the_same_gradients(monkeypatch):
    import torch.utils.checkpoint as tuc
    calls = []
    real = tuc.checkpoint
    monkeypatch.setattr(tuc, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    plain = emp_ssl.EMPNet("resnet18", "cifar", "64-16", grad_checkpoint=False)
    ckpt = emp_ssl.EMPNet("resnet18", "cifar", "64-16", grad_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2 * 6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    grads, outs = [], []
    for net in (plain, ckpt):
        net.train()
        z = net(x)
        emp_ssl.emp_loss(z.reshape(2, 6, -1))[0].backward()
        outs.append(z.detach())
        grads.append({k: p.grad.clone() for k, p in net.named_parameters()})
    assert len(calls) == 8  # the 8 basic blocks of ResNet-18 were recomputed, not run plainly
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-4, atol=1e-6, msg=k)
    assert torch.allclose(outs[0].norm(dim=1), torch.ones(len(x)))  # z is L2-normalised (Sec. 2)


@pytest.mark.parametrize("arch,blocks", [("resnet18", 8), ("mobilenet_v3_small", 13)])
def test_forward_checkpointed_equals_the_plain_forward_of_every_backbone(arch, blocks, monkeypatch):
    """forward_checkpointed(net, x) is net(x) for a ResNet and a common.PooledFeatures net alike: the same
    outputs and the same parameter gradients (train mode, fresh copies of one net, one input)."""
    import copy
    import torch.utils.checkpoint as tuc
    calls = []
    real = tuc.checkpoint
    monkeypatch.setattr(tuc, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    net = common.backbone(arch, "cifar")
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    w = torch.randn(net.dim, generator=torch.Generator().manual_seed(2))  # a loss that weighs every output
    outs, grads = [], []
    for fwd in (lambda m: m(x), lambda m: emp_ssl.forward_checkpointed(m, x)):
        m = copy.deepcopy(net).train()
        h = fwd(m)
        (h @ w).square().sum().backward()
        outs.append(h.detach())
        grads.append({k: p.grad.clone() for k, p in m.named_parameters()})
    assert len(calls) == blocks  # every block (ResNet's basic blocks, the features' stages) was recomputed
    assert outs[0].shape == (6, net.dim)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    assert grads[0].keys() == grads[1].keys()
    assert all(g.abs().sum() > 0 for g in grads[0].values())  # every parameter took part
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-5, msg=k)


def test_grad_checkpoint_trains_a_step_of_a_non_resnet_arch(tmp_path, capsys, fast_synthetic, monkeypatch):
    """--grad-checkpoint is generic: a MobileNetV3 run takes a step through forward_checkpointed."""
    calls = []
    real = emp_ssl.forward_checkpointed
    monkeypatch.setattr(emp_ssl, "forward_checkpointed", lambda net, x: calls.append(type(net)) or real(net, x))
    out = tmp_path / "run"
    emp_ssl.main(TINY + ["--arch", "mobilenet_v3_small", "--grad-checkpoint", "--max-steps", "1", "--workers", "0",
                         "--out", str(out)])
    assert calls == [common.PooledFeatures]
    ckpt = common.load_checkpoint(str(out / "checkpoint.pt"), "emp_ssl")
    assert ckpt["step"] == 1 and ckpt["args"]["grad_checkpoint"] and ckpt["probe"]["arch"] == "mobilenet_v3_small"
    torch.manual_seed(0)
    init = emp_ssl.EMPNet("mobilenet_v3_small", "cifar", ckpt["args"]["proj"]).state_dict()
    assert all(torch.isfinite(v.float()).all() for v in ckpt["model"].values())
    assert not torch.equal(init["projector.0.weight"], ckpt["model"]["projector.0.weight"])  # the step trained


# --- per-data-set defaults (Sec. 3 settings) -----------------------------------------------


@pytest.mark.parametrize("dataset,patch,out,stem", [("in100", 112, 224, "imagenet"), ("cifar10", 16, 32, "cifar"),
                                                    ("tinyimagenet", 32, 64, "cifar")])
def test_dataset_picks_patch_size_and_stem(dataset, patch, out, stem, tmp_path):
    args = emp_ssl.resolve_args(emp_ssl.parse_args(["--dataset", dataset, "--out", str(tmp_path)]))
    assert (args.patch_size, args.out_size, args.stem) == (patch, out, stem)
    assert args.norm_mean == args.norm_std == [0.5, 0.5, 0.5]  # the official EMP-SSL normalisation
    # the paper recipe is the default (Sec. 3)
    assert (args.patches, args.batch_size, args.lr, args.weight_decay, args.inv_weight, args.eps2, args.eta,
            args.proj, args.arch) == (200, 100, 0.3, 1e-4, 200.0, 0.2, 0.005, "4096-512", "resnet18")
    # flags override the data-set defaults
    args = emp_ssl.resolve_args(emp_ssl.parse_args(["--dataset", dataset, "--patch-size", "8", "--out-size", "24",
                                                    "--out", str(tmp_path)]))
    assert (args.patch_size, args.out_size) == (8, 24)


def test_in100_model_has_imagenet_stem(tmp_path):
    args = emp_ssl.resolve_args(emp_ssl.parse_args(["--dataset", "in100", "--out", str(tmp_path)]))
    net = emp_ssl.EMPNet(args.arch, args.stem, "32-8")
    assert net.backbone.conv1.kernel_size == (7, 7) and not isinstance(net.backbone.maxpool, torch.nn.Identity)


# --- command line ------------------------------------------------------------------------------


@pytest.fixture
def fast_synthetic(cached_synthetic):  # tests/conftest.py
    pass


def start_cli(args, env=None, module=("emp_ssl.py",)):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.Popen([sys.executable, *module, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=e)


def finish(proc, timeout=400):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_cli(args, env=None, timeout=400, module=("emp_ssl.py",)):
    return finish(start_cli(args, env, module), timeout)


def user_error(argv, capsys):
    """Run emp_ssl.main in-process under common.run_cli: return (exit code, stderr lines)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        common.run_cli(lambda: emp_ssl.main(argv))
    return e.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("bad,needle", [
    (["--dataset", "cifar10", "--data-dir", "/nonexistent"], "/nonexistent"),
    (["--dataset", "synthetic", "--patch-size", "40"], "40"),
    (["--dataset", "synthetic", "--patches", "0"], "--patches"),
    (["--dataset", "synthetic", "--eps2", "0"], "--eps2"),
])
def test_bad_input_is_one_line_exit_2_and_no_checkpoint(bad, needle, tmp_path, capsys, fast_synthetic):
    out = tmp_path / "run"
    code, err = user_error(bad + ["--out", str(out), "--subset", "64", "--batch-size", "16", "--max-steps", "1"], capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err
    assert not (out / "checkpoint.pt").exists()


@pytest.mark.parametrize("content,needle", [("garbage", "cannot read checkpoint"), ("foreign", "belongs to bag_ssl"),
                                            ("not_effssl", "not written by an effssl"),
                                            ("old_format", "not written by an effssl")])
def test_resume_from_garbage_or_foreign_checkpoint_is_a_user_error(content, needle, tmp_path, capsys, fast_synthetic):
    out = tmp_path / "run"
    out.mkdir()
    path = out / "checkpoint.pt"
    if content == "garbage":
        path.write_bytes(b"this is not a checkpoint\x00\x01")
    elif content == "foreign":  # another method's checkpoint
        torch.save({"method": "bag_ssl", "args": {}, "backbone": {}, "model": {}, "probe": {}}, path)
    elif content == "old_format":  # this method's checkpoint of the format before `probe` was saved in it
        torch.save({"method": "emp_ssl", "args": {}, "backbone": {}, "model": {}}, path)
    else:  # a torch file that no effssl script wrote
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    before = path.read_bytes()
    code, err = user_error(TINY + ["--resume", "--out", str(out), "--max-steps", "1"], capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error:") and "checkpoint" in err[0] and needle in err[0], err
    assert path.read_bytes() == before  # left as it was, nothing written over it


def test_batch_not_divisible_over_ranks_is_one_line_exit_2(tmp_path):
    """What each torchrun worker sees (WORLD_SIZE=2): the check runs before any process group."""
    r = run_cli(TINY + ["--batch-size", "7", "--out", str(tmp_path / "run")],
                env={"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--batch-size 7" in lines[0] and "2 ranks" in lines[0], r.stderr
    assert not (tmp_path / "run").exists()


def test_non_finite_loss_stops_with_the_step_number(tmp_path, capsys, fast_synthetic):
    """A huge learning rate: LARS bounds the matrices' steps, but BatchNorm weights and biases
    (plain SGD, as the official LARS wrapper) overflow and the next loss is NaN. The last good checkpoint stays."""
    out = tmp_path / "run"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        emp_ssl.main(TINY + ["--lr", "1e30", "--save-every", "1", "--max-steps", "4", "--out", str(out)])
    assert e.value.code not in (0, None)
    err = capsys.readouterr().err
    m = re.search(r"non-finite loss at step (\d+)", err)
    assert m, err
    step = int(m.group(1))
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == step - 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


@pytest.mark.slow
def test_torchrun_two_processes_gloo_end_to_end(tmp_path):
    out = tmp_path / "run"
    r = run_cli(TINY + ["--max-steps", "2", "--out", str(out)],
                module=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "emp_ssl.py"))
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = common.load_checkpoint(str(out / "checkpoint.pt"), "emp_ssl")
    assert ckpt["step"] == 2 and len(ckpt["rng"]) == 2  # both ranks' RNG states
    assert not any(k.startswith("module.") for k in ckpt["model"])  # saved unwrapped from DDP
    assert r.stdout.count("step 2/2") == 1  # rank 0 logs, once
    rec = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [x["step"] for x in rec] == [1, 2] and all(math.isfinite(x["loss"]) for x in rec)


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


@pytest.mark.slow
def test_resume_after_a_crash_mid_epoch_equals_the_uninterrupted_run(tmp_path):
    """64 images / batch 16 = 4 steps per epoch, 2 epochs. The crashed run dies after step 7
    (checkpoints at 3, 4 = epoch end, 6); the resumed run continues from step 6 (mid-epoch 2)."""
    env = {"OMP_NUM_THREADS": "1"}  # same thread count in every run: same float reductions
    common_args = TINY + ["--epochs", "2", "--save-every", "3"]
    crash_out = str(tmp_path / "crash")
    full = start_cli(common_args + ["--out", str(tmp_path / "full")], env=env)  # the two run side by side
    crashed = finish(start_cli(["7", "emp_ssl.py", *common_args, "--out", crash_out], env=env,
                               module=("tests/crash_at.py",)))  # dies after step 7
    full = finish(full)
    assert full.returncode == 0, full.stderr[-2000:]
    assert crashed.returncode != 0
    assert torch.load(os.path.join(crash_out, "checkpoint.pt"), weights_only=True)["step"] == 6
    resumed = run_cli(common_args + ["--out", crash_out, "--resume"], env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout and "at step 6" in resumed.stdout
    assert torch.load(os.path.join(crash_out, "checkpoint.pt"), weights_only=True)["step"] == 8
    a, b = _weights(tmp_path / "full" / "checkpoint.pt"), _weights(os.path.join(crash_out, "checkpoint.pt"))
    assert_state_dicts_close(a, b)
    # and the run did move the weights (the comparison is not between two untouched inits)
    torch.manual_seed(0)
    init = emp_ssl.EMPNet("resnet18", "cifar", "4096-512").state_dict()
    assert not torch.allclose(init["backbone.conv1.weight"], a["backbone.conv1.weight"])


# --- the README's quick start: a short run learns, beating the random-init probe ---------------

# The quick start (EMP-SSL's recipe, A.1's augmentation, Eq. 2's coefficients and LARS 0.3 included; changed: sizes
# only, 32 steps of 32 images, 4 patches of 16 px each (Sec. 3: 200) left at 16 px (Sec. 3 resizes them to 32)) on
# the coarse-texture synthetic set, probed by k-NN on 4-patch bags of 1,000 / 500
# images: 65.00 trained vs 34.80 random init (+30.2; 2-core AMD EPYC, README). On the former grating set:
# 96.8 / 87.6 / 88.4 vs 48.4 (seeds 0 / 1 / 2, a 500 / 250 probe).
LEARN_STEPS = 32
MARGIN = 10.0  # points of k20, a third of the gain measured


def readme_quick_start():
    """The commands of README.md's first code block between the quickstart markers, without the install."""
    text = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"<!-- quickstart -->\n```\n(.*?)```\n<!-- /quickstart -->", text, re.S)
    assert block, "README.md has no quickstart block"
    return [line for line in block.group(1).splitlines() if line.strip() and "pip install" not in line]


@pytest.fixture(scope="module")
def quick_start(tmp_path_factory):
    """The README's quick start as a newcomer pastes it (after the install), in an empty folder beside the
    repository's scripts: (folder, the run's stdout)."""
    d = tmp_path_factory.mktemp("quick_start")
    for f in ("common.py", "emp_ssl.py", "eval_linear.py"):
        os.symlink(os.path.join(ROOT, f), d / f)
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    outs = []
    for cmd in readme_quick_start():
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", cmd], cwd=d, env=env, capture_output=True, text=True,
                           timeout=900)
        assert r.returncode == 0, (cmd, r.stderr[-3000:])
        outs.append(r.stdout)
    return d / "runs" / "demo", outs[0]


@pytest.mark.slow
def test_quick_start_logs_R_and_D_and_saves_a_checkpoint(quick_start):
    out, stdout = quick_start
    lines = [line for line in stdout.splitlines() if line.startswith("epoch")]
    steps = [1] + list(range(8, LEARN_STEPS + 1, 8))  # the first step is always logged
    assert len(lines) == len(steps) and all(" R " in x and " D " in x and "loss" in x for x in lines), stdout
    rec = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [x["step"] for x in rec] == steps
    for x in rec:
        assert {"loss", "R", "D", "lr", "patches_per_s"} <= x.keys()
        assert x["loss"] == pytest.approx(-(x["R"] + 200.0 * x["D"]), rel=1e-4)  # Eq. (2) from the logged terms
        assert 0 < x["R"] and -1 <= x["D"] <= 1
    ckpt = common.load_checkpoint(str(out / "checkpoint.pt"), "emp_ssl")
    a = ckpt["args"]
    assert (a["arch"], a["stem"], a["patch_size"], a["out_size"], a["proj"]) == ("resnet18", "cifar", 16, 16, "4096-512")
    assert a["norm_mean"] == a["norm_std"] == [0.5, 0.5, 0.5]
    assert ckpt["step"] == LEARN_STEPS
    assert {k.split(".")[0] for k in ckpt["model"]} == {"backbone", "projector"}
    assert ckpt["model"]["projector.0.weight"].shape == (4096, 512)  # projector[:3] is Linear-BN-ReLU
    assert ckpt["backbone"].keys() == {k[len("backbone."):] for k in ckpt["model"] if k.startswith("backbone.")}


@pytest.mark.slow
def test_quick_start_beats_random_init_knn(quick_start):
    """The trained backbone's k-NN beats the random-init one's (--compare-random: the same probe, side by side)
    by MARGIN."""
    out, _ = quick_start
    files = list(out.glob("eval-*.json"))
    assert len(files) == 1, files
    r = json.loads(files[0].read_text())
    trained, random = r["knn"]["k20"], r["random"]["knn"]["k20"]
    assert trained > random + MARGIN, (trained, random)


def test_augmentation_is_the_papers_a1_recipe(tmp_path):
    """EMP-SSL A.1 (VICReg's): flip 0.5, ColorJitter(0.4, 0.4, 0.4, 0.2) p 0.8, grayscale 0.2, blur 0.1
    (sigma 0.1-2), solarization 0.1; normalisation 0.5 / 0.5 (the authors' code)."""
    from recipe_util import assert_recipe
    args = emp_ssl.resolve_args(emp_ssl.parse_args(["--out", str(tmp_path / "run")]))
    cfg = emp_ssl.augmentation(args)
    assert_recipe(cfg, 0.5, (0.4, 0.4, 0.4, 0.2), 0.8, 0.2, 0.1, 0.1)
    assert list(cfg.mean) == list(cfg.std) == [0.5, 0.5, 0.5]
