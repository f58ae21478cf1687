"""NPID + SqrtKL: efficient single-branch instance discrimination (Cao & Wu, "On Improving the
Algorithm-, Model-, and Data- Efficiency of Self-Supervised Learning", 2024, arXiv:2404.19289).

One augmented crop of each image per step goes through one network; every training image is its own
class, a row of a memory bank W (NPID, Wu et al. 2018, arXiv:1805.01978). Three changes to NPID: the
bank starts from the untrained network's features (Feature Calibrate, Sec. 3.2), bank rows move along
the negative gradient of the batch's loss (Grad Update, Eq. 5-6), and a self-distillation term
KL(p || sqrt(p)/sum sqrt(p)) spreads the gradient over many rows (SqrtKL, Eq. 7 and 13).

CIFAR-10, ResNet-18, 400 epochs (91.1 % linear, Table 1; the paper's linear probe follows SSQL):
    python npid_sqrtkl.py --out runs/npid
    python eval_linear.py --ckpt runs/npid --mode central --linear-aug
Table 6 rows: --no-calibrate, --no-grad-update, --lam 0. Multi-GPU (batch is global):
    torchrun --nproc_per_node=4 npid_sqrtkl.py --dataset in100
Short runs: see --lam. The softmax's memory, and --bank-chunk: README, "NPID memory bank: what fits".
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

METHOD = "npid_sqrtkl"

def parse_args(argv=None):
    p = common.base_parser(__doc__, epochs=None, batch_size=512, lr=0.1, weight_decay=1e-4,
                           epochs_help="training epochs (default, Sec. 4.1: 400 on CIFAR and Tiny-ImageNet, 200 on "
                                       "ImageNet and its subsets: images above 64 px, e.g. --dataset in100)",
                           batch_help="GLOBAL batch of images (Sec. 4.1: 512)",
                           lr_help="SGD base learning rate, cosine decay (Sec. 4.1: 0.1)",
                           wd_help="weight decay (Sec. 4.1: 1e-4)")
    a = p.add_argument
    a("--out-size", type=common.COUNT, default=None, help="network input side (default: the data set's image side)")
    a("--proj", default="128", help="head after the backbone: one linear layer to 128-d, as NPID (Sec. 3.1)")
    a("--temperature", type=common.POSITIVE, default=0.1,
      help="tau in s = W z / tau (NPID's CIFAR value 0.1; the paper's Eq. 1 omits it)")
    a("--lam", type=common.NONNEG, default=20.0,
      help="lambda, weight of L_SqrtKL (Eq. 13, Sec. 4.1: 20; 0 = Table 6 without SqrtKL). Expect lambda 20 to hold the "
           "bank softmax flat in the first epochs (CE at log N, instance accuracy 0 on 10,000 CIFAR-10 images; "
           "docs/results.md#npid-readings): --lam 0 is the one that learns in short runs")
    a("--sqrtkl-part", default="full", choices=["full", "l1", "l2"],
      help="which part of L_SqrtKL = L1 + L2 to use (Eq. 12; Table 8 ablation)")
    a("--bank-momentum", type=common.Number(float, 0, 1, open_hi=True, says="in [0, 1)"), default=0.5,
      help="m of the bank update, Eq. (3)/(6) (Sec. 4.1: 0.5; Fig. 4)")
    a("--no-calibrate", action="store_true", help="random bank as NPID instead of Feature Calibrate (Table 6)")
    a("--calibrate-bn", default="eval", choices=["train", "eval"], help="BatchNorm in Feature Calibrate (Sec. 3.2 does not "
      "say): eval = running statistics, as NPID's code extracts bank features (test.py); train = batch statistics")
    a("--no-grad-update", action="store_true", help="NPID's update Eq. (3) instead of Grad Update Eq. (6) (Table 6)")
    a("--bank-grad", default="ce", choices=["ce", "full"],
      help="Grad Update's direction: the negative gradient with respect to the batch's bank rows of the batch's "
           "CE (ce: Eq. 4-5, as Sec. 3.2 derives it) or of the whole loss L = CE + lambda SqrtKL (full: Eq. 13)")
    a("--bank-chunk", type=common.COUNT0, default=0,
      help="softmax over the bank in chunks of this many rows (0 = all at once; README: NPID memory bank)")
    # The paper names no augmentation: NPID's (Wu et al. 2018, arXiv:1805.01978, lemniscate.pytorch cifar.py)
    a("--jitter", type=common.NONNEG, nargs=4, default=(0.4, 0.4, 0.4, 0.4), metavar=("B", "C", "S", "H"),
      help="colour-jitter strength: brightness, contrast, saturation, hue (NPID's code: 0.4 0.4 0.4 0.4)")
    a("--p-jitter", type=common.PROB, default=1.0, help="colour-jitter probability (NPID's code: 1, always)")
    a("--p-gray", type=common.PROB, default=0.2, help="grayscale probability (NPID's code: 0.2)")
    a("--flip", type=common.PROB, default=None, help="horizontal-flip probability (default, NPID's code: 0 up to 64 px, "
      "its CIFAR code has the flip commented out; 0.5 on ImageNet-sized data, as its main.py)")
    args = p.parse_args(argv)
    imagenet = (args.image_size or common.IMAGE_SIZE.get(args.dataset, 224)) > 64  # the ImageNet stem's data
    args.epochs = args.epochs or (200 if imagenet else 400)
    args.flip = (0.5 if imagenet else 0.0) if args.flip is None else args.flip
    if args.jitter[3] > 0.5:
        common.fail("--jitter takes brightness, contrast, saturation >= 0 and a hue in [0, 0.5]")
    return args


# --- loss, Eq. (1), (2), (7), (12), (13) --------------------------------------------------------------


def sqrt_distribution(logp):
    """u = sqrt(p) / sum sqrt(p) (Sec. 3.3), as log u; a target without gradient (self-distillation)."""
    return F.log_softmax(0.5 * logp.detach(), dim=-1)  # sqrt(p) = exp(log p / 2)


def sqrtkl(logp, part="full"):
    """L_SqrtKL = KL(p || u) = L1 + L2 per row (Eq. 7, 12): L1 = sum p log p, L2 = -sum p log u."""
    p, log_u = logp.exp(), sqrt_distribution(logp)
    L1 = (p * logp).sum(-1)
    L2 = -(p * log_u).sum(-1)
    return {"full": L1 + L2, "l1": L1, "l2": L2}[part]


# d L_SqrtKL / d s_n = coef * p_n (log p_n + H), H the entropy of p, u fixed (App. A.1)
SQRTKL_GRAD = {"full": 0.5, "l1": 1.0, "l2": -0.5}


class ChunkedInstanceLoss(torch.autograd.Function):
    """The per-row (CE, SqrtKL, logsumexp, entropy, hit) of s = z W^T / tau without a b x N tensor:
    forward streams the log-sum-exps over chunks of the bank; backward recomputes each chunk's logits
    and uses the closed-form gradients dCE/ds_n = p_n - [n = i] (Eq. 4) and dSqrtKL/ds_n =
    coef * p_n (log p_n + H)."""

    @staticmethod
    def forward(ctx, z, bank, target, tau, chunk, part):
        b = z.shape[0]
        M = z.new_full((b,), -math.inf)  # running max of s
        arg = torch.zeros(b, dtype=torch.long, device=z.device)  # and where it is
        S0, S1 = z.new_zeros(b), z.new_zeros(b)  # sum exp(s - M), sum exp(s - M) s
        half = z.new_full((b,), -math.inf)  # logsumexp(s / 2)
        for c in range(0, bank.shape[0], chunk):
            s = z @ bank[c:c + chunk].T / tau
            top, where = s.max(1)
            arg = torch.where(top > M, where + c, arg)
            M_new = torch.maximum(M, top)
            e, shrink = torch.exp(s - M_new[:, None]), torch.exp(M - M_new)
            S0, S1, M = S0 * shrink + e.sum(1), S1 * shrink + (e * s).sum(1), M_new
            half = torch.logaddexp(half, torch.logsumexp(0.5 * s, 1))
        lse = M + S0.log()
        H = lse - S1 / S0  # entropy: -sum p log p = lse - sum p s
        log_c = half - 0.5 * lse  # log sum sqrt(p)
        kl = {"full": log_c - 0.5 * H, "l1": -H, "l2": 0.5 * H + log_c}[part]  # L1 = -H, L2 = H/2 + log c
        ce = lse - (z * bank[target]).sum(1) / tau
        ctx.save_for_backward(z, bank, target, lse, H)
        ctx.tau, ctx.chunk, ctx.coef = tau, chunk, SQRTKL_GRAD[part]
        hit = arg == target
        ctx.mark_non_differentiable(lse, H, hit)
        return ce, kl, lse, H, hit

    @staticmethod
    def backward(ctx, g_ce, g_kl, *_):
        z, bank, target, lse, H = ctx.saved_tensors
        grad = torch.zeros_like(z)
        for c in range(0, bank.shape[0], ctx.chunk):
            W = bank[c:c + ctx.chunk]
            logp = z @ W.T / ctx.tau - lse[:, None]
            p = logp.exp()
            grad += (g_ce[:, None] * p + g_kl[:, None] * ctx.coef * p * (logp + H[:, None])) @ W
        grad -= g_ce[:, None] * bank[target]  # the -[n = i] of dCE/ds_n
        return grad / ctx.tau, None, None, None, None, None


def instance_loss(z, bank, target, tau=0.1, part="full", chunk=0):
    """Per row of the batch: CE(p, i) (Eq. 2) and L_SqrtKL (Eq. 7) of p = softmax(W z / tau)
    over all N bank rows (Eq. 1, with NPID's temperature), and, without gradient, logsumexp(s) and
    the entropy H of p (for the bank update) and whether the row's own bank row has the largest
    logit (instance accuracy, Fig. 3b). Run it in float32. chunk > 0 computes the same over chunks
    of the bank (memory: see the top)."""
    if chunk and chunk < bank.shape[0]:
        return ChunkedInstanceLoss.apply(z, bank, target, tau, chunk, part)
    s = z @ bank.T / tau  # Eq. (1): s_n = w_n^T z / tau
    logp = F.log_softmax(s, dim=1)
    ce = -logp.gather(1, target[:, None]).squeeze(1)  # Eq. (2)
    with torch.no_grad():
        lse, H, hit = torch.logsumexp(s, 1), -(logp.exp() * logp).sum(1), s.argmax(1) == target
    return ce, sqrtkl(logp, part), lse, H, hit


# --- memory bank, Sec. 3.2 ----------------------------------------------------------------------------


@torch.no_grad()
def update_bank(bank, Z, G, I, m=0.5, grad_update=True):
    """Grad Update, Eq. (5)-(6), for the global batch: z_hat_k = z_k - sum_j G[j, k] z_j, i.e. tau
    times the negative gradient of the batch's summed loss with respect to w_{I_k}: the loss of
    sample j reaches w_n through s_jn = w_n^T z_j / tau only, so dL/dw_n = sum_j (dL_j/ds_jn) z_j / tau,
    and G[j, k] = dL_j/ds_{j, I_k} without CE's -[j = k] (which gives the z_k). For CE, G = P_b,
    P_b[j, k] = P[j, I_k] (Eq. 4, 5); global_batch_update also offers the whole loss of Eq. 13.
    grad_update=False is NPID's Eq. (3), z_hat_k = z_k. Then w <- m w + (1 - m) z_hat,
    re-normalised: rows stay on the unit sphere with the features they are compared to."""
    # |z_hat| is not 1: where one row takes much of the batch's softmax mass (B comparable to N, or
    # near-identical features) the sum term dominates the mix and can flip the row
    z_hat = Z - G.T @ Z if grad_update else Z
    bank[I] = F.normalize(m * bank[I] + (1 - m) * z_hat, dim=1)


@torch.no_grad()
def global_batch_update(bank, z, idx, lse, H, tau, m=0.5, grad_update=True, kl_coef=0.0):
    """Update the bank from the whole global batch, given this rank's rows (z, bank rows idx, the
    logsumexp and entropy of their softmax): the rows, indices and this rank's G at the batch's
    columns are gathered, so every rank applies the same update and the banks stay equal.
    kl_coef = lambda * coef adds SqrtKL's share of the gradient (--bank-grad full):
    dL_SqrtKL/ds_n = coef p_n (log p_n + H) (App. A.1: Eq. 8 through ds; coef 0.5 for L1 + L2)."""
    I = common.all_gather_nograd(idx)
    logP = z @ bank[I].T / tau - lse[:, None]  # [b, B]: log P[j, I_k] for this rank's rows j
    P = logP.exp()
    G = P + kl_coef * P * (logP + H[:, None]) if kl_coef else P
    update_bank(bank, common.all_gather_nograd(z), common.all_gather_nograd(G), I, m, grad_update)


@torch.no_grad()
def calibrate(model, train, out_size, mean, std, device, chunk=512, workers=0, bn="eval"):
    """Feature Calibrate (Sec. 3.2): w_i = z_i^(0), the untrained network's output for every training image
    (the paper names no view: the whole unaugmented image) with BatchNorm's running statistics (bn="eval")
    or each block's batch statistics (bn="train"; the paper does not say). Fixed blocks of about `chunk`
    images in index order, taken by the ranks in turn and summed: every rank holds the same bank, whatever
    the number of ranks. The network's statistics and mode are restored: it stays untrained."""
    if bn not in ("train", "eval"):
        raise ValueError(f"bn must be 'train' or 'eval', not {bn!r}")
    n, world = len(train), common.world_size()
    rank = torch.distributed.get_rank() if world > 1 else 0
    blocks = -(-n // chunk)
    bounds = [k * n // blocks for k in range(blocks + 1)]  # near-equal blocks, none much smaller than chunk
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    was_training = model.training
    model.train(bn == "train")
    bank = torch.zeros(n, model.projector[-1].out_features, device=device)
    for b in range(rank, blocks, world):
        imgs = train.get(torch.arange(bounds[b], bounds[b + 1]), workers).to(device)
        bank[bounds[b]:bounds[b + 1]] = model(common.central_view(imgs, out_size, mean, std)).float()
    for k, v in model.named_buffers():
        v.copy_(buffers[k])
    model.train(was_training)
    if world > 1:
        torch.distributed.all_reduce(bank)
    return bank


def random_bank(n, dim, seed):
    """NPID's initial bank: uniform in +-1/sqrt(dim/3), rows of norm about 1 (--no-calibrate).
    Drawn from its own seeded generator, so every rank holds the same bank."""
    stdv = 1.0 / math.sqrt(dim / 3)
    return torch.rand(n, dim, generator=torch.Generator().manual_seed(seed)) * 2 * stdv - stdv


def augmentation(args):
    """The crop's augmentation: --flip, ColorJitter(--jitter) with --p-jitter, grayscale --p-gray after it,
    no blur, no solarization (NPID's CIFAR code: crop scale (0.2, 1), jitter 0.4 x 4 always, grey 0.2)."""
    return common.AugConfig(flip=args.flip, jitter=tuple(args.jitter), p_jitter=args.p_jitter, p_gray=args.p_gray,
                            p_blur=0.0, p_solarize=0.0, mean=args.norm_mean, std=args.norm_std)


# --- model --------------------------------------------------------------------------------------------


class NPIDNet(nn.Module):
    """ResNet backbone -> linear head to 128-d -> L2-normalised z (Sec. 3.1, as NPID)."""

    def __init__(self, arch, stem, proj):
        super().__init__()
        self.backbone = common.backbone(arch, stem)
        self.projector = common.projector(self.backbone.dim, proj)

    def forward(self, x):
        return F.normalize(self.projector(self.backbone(x)), dim=1)


# --- training -----------------------------------------------------------------------------------------


def main(argv=None):
    args = common.resolve_common(parse_args(argv), METHOD)
    rank, world, device = common.init_distributed()
    torch.manual_seed(args.seed)

    train = common.load_train_set(args)
    args.out_size = args.out_size or train.size
    args.stem = common.default_stem(args.out_size)
    args.norm_mean, args.norm_std = (list(v) for v in common.data_stats(args.dataset))
    model = NPIDNet(args.arch, args.stem, args.proj).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    gen = common.make_generator(args.seed, rank, device)
    B, tau = args.batch_size, args.temperature
    state = {}  # the memory bank W; checkpointed, restored by --resume
    probe = common.probe_info(args.arch, args.stem, args.out_size, args.norm_mean, args.norm_std, "image", proj=args.proj)
    run = common.Run(args, model, optimizer, gen, train, probe, inputs=B, state=state)
    if "bank" not in state:  # a fresh run: Feature Calibrate (Sec. 3.2), or NPID's random bank
        state["bank"] = random_bank(len(train), model.projector[-1].out_features, args.seed) if args.no_calibrate \
            else calibrate(model, train, args.out_size, args.norm_mean, args.norm_std, device, workers=args.workers,
                           bn=args.calibrate_bn)
    bank = state["bank"] = state["bank"].to(device).float()
    net = common.wrap_ddp(model, device, not args.no_sync_bn)
    if args.compile:
        net = torch.compile(net)
    aug = augmentation(args)  # after the crop of scale (0.2, 1)

    for imgs, _, idx in run.batches():
        lr = common.cosine_lr(run.steps, run.horizon, args.lr)  # cosine decay (Sec. 4.1)
        common.set_lr(optimizer, lr)
        x, _ = common.sample_views(imgs.to(device, non_blocking=True), 1, args.out_size, scale=(0.2, 1.0), generator=gen)
        x = common.augment(x, aug, gen)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with common.autocast(args, device):
            z = net(x)
        z, idx = z.float(), idx.to(device)
        # the loss of a row needs only its own z and the bank: each rank takes its rows, and DDP's
        # gradient average gives the global-batch gradient
        ce, kl, lse, H, hit = instance_loss(z, bank, idx, tau, args.sqrtkl_part, args.bank_chunk)
        loss = ce.mean() + args.lam * kl.mean()  # Eq. (13)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # Grad Update, Eq. (5)-(6) (or NPID's Eq. 3), from the global batch, the same on every rank
        kl_coef = args.lam * SQRTKL_GRAD[args.sqrtkl_part] if args.bank_grad == "full" else 0.0
        global_batch_update(bank, z.detach(), idx, lse, H, tau, args.bank_momentum, not args.no_grad_update, kl_coef)
        terms = torch.stack([loss, ce.mean(), kl.mean(), 100 * hit.float().mean()]).detach()
        terms = common.all_gather_nograd(terms[None]).mean(0)  # inst_acc: % of the batch whose own row wins (Fig. 3b)
        run.step(dict(zip(("loss", "ce", "sqrtkl", "inst_acc"), terms)), lr)


if __name__ == "__main__":
    common.run_cli(main)
