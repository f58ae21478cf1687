"""Every method script under two gloo processes, for real training steps, against one process.

Each script's own main() runs 3 steps in 2 processes (run_world; the four scripts one after the
other in the same two processes). Recorded on each rank: its slice of the global batch, the input
of the first training forward, the network at that moment, every step's logged loss and a digest
of the parameters after every step (NPID: the memory bank too). Checked here:
  - the two ranks hold bit-identical parameters after every step (DDP averaged the gradients),
    and the parameters moved;
  - the ranks' slices are the halves of the one-process global batch;
  - the first step's loss equals a one-process computation that reproduces the two ranks'
    BatchNorm batches: each rank's input through the network on its own in train mode, the
    outputs concatenated into the global batch by torch.cat (not gather_views), one loss;
  - NPID: the bank is Feature Calibrate's one-process bank before the step, and after it the
    Grad Update (Cao & Wu 2024, arXiv:2404.19289, Eq. 5-6) of the whole global batch, recomputed
    here from the concatenated projections; and on fixed float64 embeddings (plain and chunked
    softmax), the loss, the gradients and three bank updates equal one process.
"""
import argparse
import copy
import hashlib

import pytest
import torch
import torch.nn.functional as F

import bag_ssl
import common
import emp_ssl
import multiaug_ssl
import npid_sqrtkl
from dist_util import run_world

pytestmark = pytest.mark.slow  # the full run only (python -m pytest -q --full)

N_IMAGES, BATCH, STEPS = 32, 4, 3  # synthetic images; global batch (2 per rank)
BASE = ["--dataset", "synthetic", "--arch", "resnet18", "--batch-size", str(BATCH), "--epochs", "1",
        "--max-steps", str(STEPS), "--log-every", "1", "--workers", "0", "--seed", "0"]
METHODS = {  # each script's default loss, small views and heads
    "emp_ssl": (emp_ssl, ["--patches", "2", "--patch-size", "8", "--out-size", "16", "--proj", "64-32"]),
    "bag_ssl": (bag_ssl, ["--loss", "vicreg", "--patches", "2", "--patch-size", "8", "--out-size", "16",
                          "--proj", "64-32"]),
    "multiaug_ssl": (multiaug_ssl, ["--loss", "barlow", "--views", "2", "--pdim", "32", "--out-size", "16"]),
    "npid_sqrtkl": (npid_sqrtkl, ["--out-size", "16", "--proj", "32", "--bank-chunk", "0"]),
}


def _digest(model):
    h = hashlib.sha1()
    for p in model.parameters():
        h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def _npid_fixed_embedding_steps(rank, world, chunk, bank_grad="ce"):
    """npid_sqrtkl: three steps of loss + backward + bank update on fixed float64 embeddings of a
    global batch of 8, each rank taking its slice (chunk > 0: the chunked softmax; bank_grad "full":
    Grad Update from CE + lambda SqrtKL). Returns the bank, the global-batch losses and the local
    gradients."""
    g = torch.Generator().manual_seed(0)
    N, B, d, tau, lam = 40, 8, 16, 0.1, 20.0
    bank = F.normalize(torch.randn(N, d, generator=g, dtype=torch.float64), dim=1)
    b = B // world
    losses, grads = [], []
    for _ in range(3):
        Z = F.normalize(torch.randn(B, d, generator=g, dtype=torch.float64), dim=1)
        I = torch.randperm(N, generator=g)[:B]
        z, idx = Z[rank * b:(rank + 1) * b].clone().requires_grad_(), I[rank * b:(rank + 1) * b]
        ce, kl, lse, H, _ = npid_sqrtkl.instance_loss(z, bank, idx, tau, "full", chunk)
        loss = ce.mean() + lam * kl.mean()
        loss.backward()
        kl_coef = lam * npid_sqrtkl.SQRTKL_GRAD["full"] if bank_grad == "full" else 0.0
        npid_sqrtkl.global_batch_update(bank, z.detach(), idx, lse, H, tau, kl_coef=kl_coef)
        losses.append(common.all_gather_nograd(loss.detach()[None]).mean())
        grads.append(z.grad)
    return {"bank": bank, "losses": torch.stack(losses), "grads": torch.stack(grads)}


def _train_every_method(rank, world, out_root):
    """In each of the 2 processes: every method's main() for STEPS steps, recording what the test
    checks; first npid_sqrtkl's steps on fixed embeddings."""
    import torch.distributed as dist
    real_synthetic = common.synthetic_set
    saved = {k: getattr(common.Run, k) for k in ("__init__", "batches", "step")}
    destroy = dist.destroy_process_group
    rec = {}

    def init(run, *a, **k):
        saved["__init__"](run, *a, **k)
        rec["args"] = dict(vars(run.args))

        def first_forward(module, inputs):  # the training forward (Feature Calibrate runs without grad)
            if torch.is_grad_enabled() and "x" not in rec:
                rec["x"] = inputs[0].detach().clone()
                net = copy.deepcopy(module)
                net._forward_pre_hooks.clear()
                rec["net"] = net  # the network of the first step, buffers included
                if "bank" in run.state:
                    rec["bank"] = [run.state["bank"].clone()]
        run.model.register_forward_pre_hook(first_forward)

    def batches(run):
        for imgs, labels, idx in saved["batches"](run):
            rec["idx"].append(idx.clone())
            yield imgs, labels, idx

    def step(run, terms, lr):
        rec["loss"].append(float(terms["loss"]))
        rec["digest"].append(_digest(common.unwrap(run.model)))
        if "bank" in run.state:
            rec["bank"].append(run.state["bank"].clone())
        return saved["step"](run, terms, lr)

    common.synthetic_set = lambda split, seed=0, n=None: real_synthetic(split, seed, n or N_IMAGES)
    common.Run.__init__, common.Run.batches, common.Run.step = init, batches, step
    dist.destroy_process_group = lambda *a, **k: None  # Run closes the group at the end of each main()
    out = {"npid_fixed": {(chunk, g): _npid_fixed_embedding_steps(rank, world, chunk, g)
                          for chunk in (0, 7) for g in ("ce", "full")}}
    try:
        for name, (module, flags) in METHODS.items():
            rec.clear()
            rec.update(idx=[], loss=[], digest=[])
            module.main(BASE + flags + ["--out", f"{out_root}/{name}"])
            out[name] = dict(rec, net=rec["net"] if rank == 0 else None)
    finally:
        common.synthetic_set, dist.destroy_process_group = real_synthetic, destroy
        for k, v in saved.items():
            setattr(common.Run, k, v)
    return out


@pytest.fixture(autouse=True)
def one_thread():
    """The one-process reference with one thread, as each rank: the same float reductions (and no
    two-thread stall when other jobs load the 2 cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return run_world(_train_every_method, 2, (str(tmp_path_factory.mktemp("dist_steps")),))


def _reference_loss(name, net, xs, a, idx, bank):
    """The first step in one process: each rank's input through net on its own (its BatchNorm
    batch), the outputs concatenated view-major into the global batch, the script's loss."""
    net.train()
    with torch.no_grad():
        zs = [net(x).float() for x in xs]
    if name == "npid_sqrtkl":
        Z = torch.cat(zs)  # one view: rows of rank 0, then rank 1, the global batch order
        ce, kl, *_ = npid_sqrtkl.instance_loss(Z, bank, idx, a.temperature, a.sqrtkl_part)
        return ce.mean() + a.lam * kl.mean(), Z
    n = a.views if name == "multiaug_ssl" else a.patches
    Z = torch.cat([z.reshape(n, len(z) // n, -1) for z in zs], 1)  # [n, B, d]: view i of every image
    if name == "emp_ssl":
        return emp_ssl.emp_loss(Z, a.eps2, a.inv_weight)[0], Z
    if name == "bag_ssl":
        return bag_ssl.bag_loss(Z, None, a)["loss"], Z
    return multiaug_ssl.barlow_loss(Z, a.lam)[0], Z


def _grad_update(bank, Z, I, tau, m):
    """Eq. (5)-(6) on the global batch, written out: z_hat_k = z_k - sum_j P[j, I_k] z_j, then
    w_{I_k} <- normalize(m w_{I_k} + (1 - m) z_hat_k)."""
    P = torch.softmax(Z.double() @ bank.double().T / tau, 1)
    z_hat = Z.double() - P[:, I].T @ Z.double()
    new = bank.clone().double()
    new[I] = F.normalize(m * new[I] + (1 - m) * z_hat, dim=1)
    return new.float()


@pytest.mark.parametrize("name", list(METHODS))
def test_two_ranks_keep_identical_weights_and_the_first_loss_is_the_one_process_loss(name, two_ranks):
    r0, r1 = (r[name] for r in two_ranks)
    a = argparse.Namespace(**r0["args"])
    # bit-identical parameters on both ranks after every step, and they moved
    assert len(r0["digest"]) == len(r1["digest"]) == STEPS
    assert r0["digest"] == r1["digest"]
    assert len(set(r0["digest"])) == STEPS
    # the ranks' slices are the halves of the one-process global batches
    ds = common.synthetic_set("train", a.seed, N_IMAGES)
    one = [idx for _, _, idx in common.epoch_batches(ds, BATCH, 0, a.seed)][:STEPS]
    b = BATCH // 2
    assert all(torch.equal(i0, g[:b]) and torch.equal(i1, g[b:]) for i0, i1, g in zip(r0["idx"], r1["idx"], one))
    # the first step's loss, logged on each rank, against one process over the two BatchNorm batches
    bank = None
    if name == "npid_sqrtkl":  # Feature Calibrate's bank in one process, from the same network
        bank = npid_sqrtkl.calibrate(copy.deepcopy(r0["net"]), ds, a.out_size, a.norm_mean, a.norm_std,
                                     torch.device("cpu"), bn=a.calibrate_bn)
        torch.testing.assert_close(r0["bank"][0], bank, rtol=1e-5, atol=1e-5)
        assert torch.equal(r0["bank"][0], r1["bank"][0])
    ref, Z = _reference_loss(name, r0["net"], [r0["x"], r1["x"]], a, one[0], bank)
    for r in (r0, r1):
        assert r["loss"][0] == pytest.approx(float(ref), rel=1e-4, abs=1e-4), (r["loss"][0], float(ref))
    assert r0["loss"] == r1["loss"]
    if name == "npid_sqrtkl":  # the bank after step 1: the global batch's Grad Update, on both ranks
        after = _grad_update(bank, Z, one[0], a.temperature, a.bank_momentum)
        assert not torch.allclose(after, bank)
        torch.testing.assert_close(r0["bank"][1], after, rtol=1e-4, atol=1e-4)
        assert all(torch.equal(b0, b1) for b0, b1 in zip(r0["bank"], r1["bank"]))


@pytest.mark.parametrize("chunk", [0, 7])
@pytest.mark.parametrize("bank_grad", ["ce", "full"])
def test_npid_loss_gradients_and_bank_update_on_fixed_embeddings_equal_one_process(chunk, bank_grad, two_ranks):
    """Each rank takes its rows of the global batch: the losses (gathered), the local gradients
    (each rank's loss is the mean over its rows: its gradient / world is the global-batch gradient)
    and the bank after 3 Grad Updates equal one process on the whole batch."""
    one = _npid_fixed_embedding_steps(0, 1, chunk, bank_grad)
    f0, f1 = (r["npid_fixed"][chunk, bank_grad] for r in two_ranks)
    assert torch.equal(f0["bank"], f1["bank"])
    assert torch.allclose(f0["bank"], one["bank"], atol=1e-12)
    assert torch.allclose(f0["losses"], one["losses"], atol=1e-12) and torch.equal(f0["losses"], f1["losses"])
    assert torch.allclose(torch.cat([f0["grads"], f1["grads"]], 1) / 2, one["grads"], atol=1e-12)
