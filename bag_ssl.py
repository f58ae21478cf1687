"""BagSSL: Bag of Image Patch Embedding Behind the Success of SSL (Chen, Bardes, Li, LeCun 2023).

Joint-embedding SSL models the co-occurrence of image patches (Sec. 3, Prop. 3.1). BagSSL trains
a standard two-view SSL method (VICReg, SimCLR, TCR or BYOL) on two fixed-scale patches of each
image (14 px of a 32 px CIFAR image) instead of multi-scale crops; the image representation is
the mean embedding of its patches (bag of local features). `--multiscale` gives the baselines of
Tables 1-3 (two RandomResizedCrop(0.08, 1) views).

Paper: Chen, Bardes, Li, LeCun 2022, arXiv:2206.08954. CIFAR-10, BagSSL-VICReg (Table 1: 90.9 % linear,
16-patch bag; the paper samples evaluation patches like training patches: --positions random):
    python bag_ssl.py --loss vicreg --out runs/bag-vicreg
    python eval_linear.py --ckpt runs/bag-vicreg --mode bag --patches 16 --positions random
Baseline column (multi-scale training, central evaluation):
    python bag_ssl.py --loss vicreg --multiscale --out runs/ms-vicreg
    python eval_linear.py --ckpt runs/ms-vicreg/checkpoint.pt --mode central
Multi-GPU (batch is global): torchrun --nproc_per_node=8 bag_ssl.py --dataset in100 --loss byol
"""
import argparse
import copy
import itertools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

METHOD = "bag_ssl"
# per data set: (patch side, network input side). Tables 1-3: 14 -> 32 on CIFAR, 100 -> 224 on
# in100; STL-10 and Tiny ImageNet are not in the paper: the CIFAR ratio 14/32.
PATCH = {"cifar10": (14, 32), "cifar100": (14, 32), "synthetic": (14, 32), "tinyimagenet": (28, 64),
         "stl10": (42, 96), "in100": (100, 224)}
LOSSES = ("vicreg", "simclr", "tcr", "byol")


def parse_args(argv=None):
    p = common.base_parser(__doc__, epochs=None, batch_size=1024, lr=None, weight_decay=1e-4, arch=None,
                           epochs_help="training epochs (App. C.1: 600 on CIFAR; C.2: 400 on in100)",
                           batch_help="GLOBAL batch of images (App. C: 1024)",
                           lr_help="LARS base learning rate (App. C.1: 0.3 on CIFAR; C.2: 0.1 on in100)",
                           wd_help="weight decay (App. C: 1e-4)",
                           arch_help="backbone (App. C.1: resnet34 on CIFAR; C.2: resnet50 on in100)")
    a = p.add_argument
    a("--loss", default="vicreg", choices=LOSSES, help="joint-embedding objective (Sec. 4: all four; App. C.1)")
    a("--patches", type=common.Number(int, 2, 10 ** 9, says="at least 2"), default=2,
      help="patches (views) per image (Sec. 4.1: two patches per image)")
    a("--patch-size", type=common.COUNT, default=None, help="patch side in px (Tables 1-3: 14 on CIFAR, 100 on in100)")
    a("--out-size", type=common.COUNT, default=None, help="side the views are resized to (Sec. 4.1: 32 on CIFAR; 224 on in100)")
    a("--multiscale", action="store_true", help="baseline: RandomResizedCrop(0.08-1) views, not patches (Tables 1-3)")
    a("--proj", default=None,
      help="projector dims (App. C.1: 4096-128 CIFAR-10, 4096-512 CIFAR-100; C.2: 8192-8192-8192 in100)")
    a("--warmup-epochs", type=common.COUNT0, default=10,
      help="linear warm-up epochs before the cosine decay to 0 (App. C: 10; capped at half of a short run)")
    a("--eta", type=common.POSITIVE, default=0.005,
      help="LARS trust coefficient (not in the paper; 0.005 as the same group's official EMP-SSL code)")
    a("--sim-coeff", type=common.NONNEG, default=25.0, help="vicreg: invariance weight (App. C.1: 25)")
    a("--std-coeff", type=common.NONNEG, default=25.0, help="vicreg: variance weight (App. C.1: 25)")
    a("--cov-coeff", type=common.NONNEG, default=1.0, help="vicreg: covariance weight (App. C.1: 1)")
    a("--temperature", type=common.POSITIVE, default=0.1, help="simclr: NT-Xent temperature (App. C.1: 0.1)")
    a("--inv-weight", type=common.NONNEG, default=None, help="tcr: lambda (App. C.1: 30 on CIFAR; C.2: 1920 on in100)")
    a("--eps2", type=common.POSITIVE, default=0.2, help="tcr: epsilon^2 of the coding rate, d / (b eps2) (App. C.1's "
      "'epsilon is set to 0.2' read as the same group's EMP-SSL code reads its eps=0.2: eps^2 = 0.2)")
    a("--pred-hidden", type=common.COUNT, default=4096, help="byol: predictor hidden width (BYOL Sec. 3.3: 4096)")
    a("--tau-base", type=common.PROB, default=0.99,
      help="byol: EMA momentum at step 0, cosine to 1 (BYOL Sec. 3.2; 0.99 as solo-learn's CIFAR config)")
    a("--blur", action=argparse.BooleanOptionalAction, default=True,
      help="BYOL's Gaussian blur, p 1.0 / 0.1 on the two views (App. C.1: BYOL's augmentations, on every data "
           "set; --no-blur as solo-learn's CIFAR configs)")
    return p.parse_args(argv)


def resolve_args(argv=None):
    """Parse and fill the data-set-dependent defaults (App. C.1 CIFAR, C.2 in100)."""
    args = parse_args(argv)
    in100 = args.dataset == "in100"
    args.epochs = args.epochs if args.epochs is not None else (400 if in100 else 600)
    args.lr = args.lr if args.lr is not None else (0.1 if in100 else 0.3)
    args.arch = args.arch or ("resnet50" if in100 else "resnet34")
    args.proj = args.proj or {"in100": "8192-8192-8192", "cifar100": "4096-512"}.get(args.dataset, "4096-128")
    args.inv_weight = args.inv_weight if args.inv_weight is not None else (1920.0 if in100 else 30.0)
    args = common.resolve_common(args, METHOD)
    image = args.image_size or common.IMAGE_SIZE.get(args.dataset) or 64
    ps, os_ = PATCH.get(args.dataset, (None, None))
    if args.multiscale:  # random resized crops of the whole image, resized to the image side
        args.patch_size = None
        args.out_size = args.out_size or image
    else:
        args.patch_size = args.patch_size or ps or round(image * 14 / 32)
        args.out_size = args.out_size or os_ or image
    args.stem = common.default_stem(args.out_size)
    args.norm_mean, args.norm_std = (list(v) for v in common.data_stats(args.dataset))
    return args


# --- views: fixed-scale patches (BagSSL) or multi-scale crops (baseline), BYOL augmentations ---


def sample(imgs, args, generator=None):
    """The n views of every image, view-major [n*b, 3, out, out] in [0, 1], and their boxes."""
    if args.multiscale:  # Tables 1-3 baselines: RandomResizedCrop(0.08, 1.0)
        return common.sample_views(imgs, args.patches, args.out_size, scale=(0.08, 1.0), generator=generator)
    return common.sample_patches(imgs, args.patches, args.patch_size, args.out_size, generator)  # Sec. 3


def byol_augs(args):
    """BYOL's asymmetric augmentations (App. C.1 -> Grill et al. Table 6): flip, jitter 0.4/0.4/0.2/0.1 p 0.8,
    grayscale 0.2; blur p 1.0 / 0.1 (sigma 0.1-2 px; --no-blur: none), solarize p 0.0 / 0.2 on views 1 / 2."""
    common_kw = dict(flip=0.5, jitter=(0.4, 0.4, 0.2, 0.1), p_jitter=0.8, p_gray=0.2, blur_sigma=(0.1, 2.0),
                     mean=args.norm_mean, std=args.norm_std)
    return (common.AugConfig(p_blur=1.0 if args.blur else 0.0, p_solarize=0.0, **common_kw),
            common.AugConfig(p_blur=0.1 if args.blur else 0.0, p_solarize=0.2, **common_kw))


def augment_views(x, n, augs, generator=None):
    """Augment each view slice X_i (view-major) with its own config: view i gets augs[i % 2]."""
    b = len(x) // n
    return torch.cat([common.augment(x[i * b:(i + 1) * b], augs[i % 2], generator) for i in range(n)])


# --- the four losses, on projections Z [n, B, d] of the GLOBAL batch ------------------------


def vicreg(z1, z2, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0):
    """VICReg (Bardes et al. 2021, Eq. 1-6, as main_vicreg.py): invariance MSE, variance hinge on
    sqrt(Var + 1e-4) averaged over the two branches, off-diagonal covariance^2 / d summed over them."""
    B, d = z1.shape
    repr_loss = F.mse_loss(z1, z2)  # s(Z, Z'), Eq. 5 (mean over dimensions too, as the official code)
    x, y = z1 - z1.mean(0), z2 - z2.mean(0)
    std_x, std_y = torch.sqrt(x.var(0) + 1e-4), torch.sqrt(y.var(0) + 1e-4)  # S(z^j, eps), Eq. 2
    std_loss = F.relu(1 - std_x).mean() / 2 + F.relu(1 - std_y).mean() / 2  # v(Z), Eq. 1, branches averaged
    cov_x, cov_y = x.T @ x / (B - 1), y.T @ y / (B - 1)  # C(Z), Eq. 3
    off = ~torch.eye(d, dtype=torch.bool, device=z1.device)
    cov_loss = cov_x[off].pow(2).sum() / d + cov_y[off].pow(2).sum() / d  # c(Z) + c(Z'), Eq. 4
    loss = sim_coeff * repr_loss + std_coeff * std_loss + cov_coeff * cov_loss  # Eq. 6
    return {"loss": loss, "inv": repr_loss, "var": std_loss, "cov": cov_loss}


def simclr(z1, z2, temperature=0.1):
    """NT-Xent (Chen et al. 2020, Eq. 1): each of the 2B projections picks its other view by cosine / T."""
    B = len(z1)
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    s = (z @ z.T / temperature).masked_fill(torch.eye(2 * B, dtype=torch.bool, device=z.device), float("-inf"))
    positive = torch.cat([torch.arange(B, 2 * B), torch.arange(B)]).to(z.device)
    return {"loss": F.cross_entropy(s, positive)}


def total_coding_rate(Z, eps2):
    """R(Z) = 1/2 logdet(I + d/(b eps2) Z^T Z) of each view in Z [n, b, d] (EMP-SSL Eq. 1), smaller Gram form."""
    n, b, d = Z.shape
    gram = Z.transpose(1, 2) @ Z if d <= b else Z @ Z.transpose(1, 2)
    I = torch.eye(gram.shape[-1], device=Z.device, dtype=Z.dtype)
    return 0.5 * torch.logdet(I + d / (b * eps2) * gram)


def tcr(Z, eps2=0.2, lam=30.0):
    """TCR as EMP-SSL Eq. (2) with n views (App. C.1: lam 30, eps 0.2), on L2-normalised projections."""
    Z = F.normalize(Z, dim=-1)
    Z_bar = Z.mean(0)
    R = total_coding_rate(Z, eps2)
    D = F.cosine_similarity(Z, Z_bar.unsqueeze(0), dim=-1).mean(1)
    return {"loss": -(R + lam * D).mean(), "R": R.mean(), "D": D.mean()}


def byol(p1, p2, t1, t2):
    """BYOL (Grill et al. 2020, Eq. 2): normalised MSE of each view's online prediction to the other view's
    target projection, symmetrised (L + L~); targets carry no gradient."""
    nmse = [(2 - 2 * F.cosine_similarity(p, t.detach(), dim=-1)).mean() for p, t in ((p1, t2), (p2, t1))]
    return {"loss": nmse[0] + nmse[1]}


def bag_loss(Z, T, args):
    """The --loss objective on view-major global projections Z [n, B, d] (BYOL: online predictions, with
    target projections T); two-view losses average over the n(n-1)/2 pairs (n = 2 in the paper)."""
    with torch.autocast(Z.device.type, enabled=False):  # covariance, softmax, log-det in float32 under bf16
        Z = Z.float()
        if args.loss == "tcr":
            return tcr(Z, args.eps2, args.inv_weight)
        terms = []
        for i, j in itertools.combinations(range(len(Z)), 2):
            if args.loss == "vicreg":
                terms.append(vicreg(Z[i], Z[j], args.sim_coeff, args.std_coeff, args.cov_coeff))
            elif args.loss == "simclr":
                terms.append(simclr(Z[i], Z[j], args.temperature))
            else:
                terms.append(byol(Z[i], Z[j], T[i].float(), T[j].float()))
        return {k: torch.stack([t[k] for t in terms]).mean() for k in terms[0]}


def global_loss(z, t, args):
    """This rank's view-major rows z [n*b, d] (and BYOL targets t) gathered into the global batch, then the loss."""
    n = args.patches
    Z = common.gather_views(z, n).reshape(n, -1, z.shape[1])
    T = common.gather_views(t, n).reshape(n, -1, t.shape[1]) if t is not None else None
    return bag_loss(Z, T, args)


# --- model ----------------------------------------------------------------------------------


class BagNet(nn.Module):
    """ResNet backbone f -> projector g (App. C.1: Linear-BN-ReLU, Linear); BYOL adds the predictor q
    (Linear-BN-ReLU-Linear, 4096 hidden). forward returns what the loss compares: z, or BYOL's q(z)."""

    def __init__(self, arch, stem, proj, pred_hidden=None):
        super().__init__()
        self.backbone = common.backbone(arch, stem)
        self.projector = common.projector(self.backbone.dim, proj)
        d = int(proj.split("-")[-1])
        self.predictor = common.projector(d, f"{pred_hidden}-{d}") if pred_hidden else None

    def forward(self, x):
        z = self.projector(self.backbone(x))
        return self.predictor(z) if self.predictor is not None else z


class Target(nn.Module):
    """BYOL's target network xi: an EMA copy of the online backbone and projector, not optimised; method state."""

    def __init__(self, model):
        super().__init__()
        self.backbone = copy.deepcopy(model.backbone)
        self.projector = copy.deepcopy(model.projector)
        self.requires_grad_(False)

    def forward(self, x):
        return self.projector(self.backbone(x))


def byol_tau(k, K, tau_base):
    """BYOL Sec. 3.2: tau = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2 at step k of K."""
    return 1 - (1 - tau_base) * (math.cos(math.pi * min(k / K, 1.0)) + 1) / 2


@torch.no_grad()
def ema_update(target, model, tau):
    """xi <- tau xi + (1 - tau) theta (BYOL Eq. 1), over backbone and projector parameters."""
    for xi, theta in zip(target.parameters(), [*model.backbone.parameters(), *model.projector.parameters()]):
        xi.mul_(tau).add_(theta.detach(), alpha=1 - tau)


def make_optimizer(model, args):
    """LARS over the online model only (App. C); BYOL's target is never in it."""
    return common.LARS(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, eta=args.eta)


# --- training -------------------------------------------------------------------------------


def main(argv=None):
    args = resolve_args(argv)
    rank, world, device = common.init_distributed()
    torch.manual_seed(args.seed)

    train = common.load_train_set(args, patch_size=args.patch_size)
    model = BagNet(args.arch, args.stem, args.proj, args.pred_hidden if args.loss == "byol" else None).to(device)
    target = Target(model).to(device) if args.loss == "byol" else None
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        target = target.to(memory_format=torch.channels_last) if target is not None else None
    optimizer = make_optimizer(model, args)
    gen = common.make_generator(args.seed, rank, device)
    n, B = args.patches, args.batch_size
    state = {"target": target.state_dict()} if target is not None else {}
    # the bag of patch embeddings (Sec. 3), or the whole image for the --multiscale baseline
    probe = common.probe_info(args.arch, args.stem, args.out_size, args.norm_mean, args.norm_std,
                              "image" if args.multiscale else "bag", patch_size=args.patch_size, proj=args.proj)
    run = common.Run(args, model, optimizer, gen, train, probe, inputs=n * B, state=state)
    if target is not None:
        target.load_state_dict(state["target"])  # the EMA target of the checkpoint on resume
        state["target"] = target.state_dict()  # live references: in-place EMA updates show in it
    net = common.wrap_ddp(model, device, not args.no_sync_bn)
    if args.compile:
        net = torch.compile(net)
    augs = byol_augs(args)
    warmup = min(args.warmup_epochs * run.steps_per_epoch, run.horizon // 2)  # App. C: 10 epochs; short runs decay too

    for imgs, _, _ in run.batches():
        lr = common.cosine_lr(run.steps, run.horizon, args.lr, warmup)  # warm-up, then cosine to 0 (App. C)
        common.set_lr(optimizer, lr)
        x, _ = sample(imgs.to(device, non_blocking=True), args, gen)
        x = augment_views(x, n, augs, gen)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with common.autocast(args, device):
            z = net(x)
            with torch.no_grad():
                t = target(x) if target is not None else None
        terms = global_loss(z.float(), t.float() if t is not None else None, args)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()
        if target is not None:
            terms["tau"] = byol_tau(run.steps, run.horizon, args.tau_base)
            ema_update(target, model, terms["tau"])
        run.step({k: (v.detach() if torch.is_tensor(v) else v) for k, v in terms.items()}, lr)


if __name__ == "__main__":
    common.run_cli(main)
