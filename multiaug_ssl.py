"""Multi-view Barlow Twins / VICReg with a small projector (Ghosh, Agrawal, Sodhani, Oberman,
Richards, "Harnessing small projectors and multiple views for efficient vision pretraining",
NeurIPS 2024, arXiv:2312.10725).

Every image gets M augmented views (M = 2, 4, 8). Instead of comparing all M(M-1)/2 view pairs,
each view is pulled towards the mean over views (Eq. 10: invariance to the sample estimate of the
view-averaging operator), which costs O(M). A 256-d projector suffices when the redundancy
weight lam is raised (Sec. 3.3, 4.1). With more views, a fraction of the data set reaches the
accuracy of 2 views on all of it (Sec. 4.3).

The loss follows the authors' public code (github.com/kumarkrishna/fastssl), which writes Eq. (10)
out for Barlow Twins and VICReg. No flags: CIFAR-10, 4 views, Barlow Twins, pdim 256, batch 256,
100 epochs (Sec. 4.2, Fig. 3; App. E.3: 91.73 %):
    python multiaug_ssl.py --out runs/ma4
    python eval_linear.py --ckpt runs/ma4 --mode views --views 16 --linear-opt adam
The 2-view baseline: --views 2 (E.3: 86.43 %; D.1 gives 83.4 for the same setting). Sample
efficiency (Sec. 4.3): --views 8 --train-fraction 0.25 against --views 2 on all images.
Multi-GPU (batch is global): torchrun --nproc_per_node=2 multiaug_ssl.py --dataset in100

Barlow Twins lambda by default (--lam): the authors' run scripts' values for the data set, views, data
fraction and pdim, with the rules for other settings: docs/recipes.md ("Barlow Twins lambda").
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

METHOD = "multiaug_ssl"

def parse_args(argv=None):
    p = common.base_parser(__doc__, epochs=100, batch_size=None, lr=1e-3, weight_decay=1e-6, arch=None,
                           epochs_help="training epochs (Sec. 4 / App. D: 100)",
                           batch_help="GLOBAL batch of images (App. D, Table 4: 256 on CIFAR and STL-10, 128 on "
                                      "ImageNet-100; the authors' multi-view scripts ran 128 on CIFAR, 100 on STL-10)",
                           lr_help="Adam learning rate, constant (App. D: 1e-3)",
                           wd_help="Adam weight decay (App. D: 1e-6)",
                           arch_help="backbone (App. D: resnet50 on CIFAR/STL, resnet18 on in100)")
    a = p.add_argument
    a("--views", type=common.COUNT, default=4,
      help="augmented views per image M (Sec. 4.2: the multi-augmentation runs use 4, Fig. 3; 2 is the "
           "baseline, 8 in Sec. 4.3 and App. E.3)")
    a("--loss", default="barlow", choices=["barlow", "vicreg"], help="Barlow Twins or VICReg form of Eq. (10) (Sec. 4)")
    a("--pdim", type=common.COUNT, default=256, help="projector width and output dim (Sec. 4.1-4.2: 256; Fig. 2 sweeps 64-8192)")
    a("--lam", type=common.NONNEG, default=None,
      help="Barlow Twins off-diagonal weight lambda (Sec. 4.1). Default: the authors' scripts' value for "
           "--dataset, --views, --train-fraction and --pdim: CIFAR-10 pdim 256: 0.02 for 2 views, "
           "0.01 for 4 and 8, 0.01 for 4 views on 50 %%, 0.006 for 8 views on 25 %%; pdim 8192: 8e-4 / 4e-4; "
           "the whole table: docs/recipes.md)")
    a("--sim-coeff", type=common.NONNEG, default=25.0, help="VICReg invariance weight (App. D Eq. 49: 25)")
    a("--std-coeff", type=common.NONNEG, default=25.0, help="VICReg variance weight (App. D Eq. 49: 25)")
    a("--cov-coeff", type=common.NONNEG, default=1.0, help="VICReg covariance weight (App. D Eq. 49: 1)")
    a("--train-fraction", type=common.Number(float, 0, 1, open_lo=True, says="in (0, 1]"), default=1.0,
      help="train on a fixed seeded fraction of the training set (Sec. 4.3: 1.0 / 0.5 / 0.25 for 2 / 4 / 8 views)")
    a("--out-size", type=common.COUNT, default=None,
      help="side the random resized crops are resized to (default: 64 with --dataset stl10 as the authors' "
           "STL-10 pipeline, else the image side)")
    a("--scale", type=common.Number(float, 0, 1, open_lo=True, says="in (0, 1]"), nargs=2, default=None,
      help="random resized crop area range (default: the authors' pipelines, (0.2, 1) with --dataset stl10, "
           "else (0.08, 1))")
    a("--p-gray", type=common.PROB, default=None,
      help="grayscale probability of each view (default: the authors' pipelines, 0.1 with --dataset stl10, "
           "else 0.2; not in the paper)")
    return resolve_defaults(p.parse_args(argv))


def augmentation(args):
    """Each view's augmentation, the authors' CIFAR / STL-10 pipelines (fastssl CifarTransformFFCV,
    STLTransformFFCV): after the random resized crop (--scale), horizontal flip 0.5, ColorJitter(0.4,
    0.4, 0.4, 0) with p 0.8, grayscale --p-gray; no blur, no solarization."""
    return common.AugConfig(flip=0.5, jitter=(0.4, 0.4, 0.4, 0.0), p_jitter=0.8, p_gray=args.p_gray, p_blur=0.0,
                            p_solarize=0.0, mean=args.norm_mean, std=args.norm_std)


# batch: App. D, Table 4. The views: the authors' pipelines, of which the paper says nothing (STL-10:
# fastssl/data/cifar_transforms.py STLTransformFFCV, 64 px random resized crops of scale (0.2, 1),
# grayscale 0.1; CIFAR-10: CifarTransformFFCV)
RECIPES = {"stl10": dict(batch_size=256, out_size=64, scale=(0.2, 1.0), p_gray=0.1),
           "in100": dict(batch_size=128, out_size=None, scale=(0.08, 1.0), p_gray=0.2),
           None: dict(batch_size=256, out_size=None, scale=(0.08, 1.0), p_gray=0.2)}


def resolve_defaults(args):
    """Check the method's flags (before the run folder is made), fill the flags left unset from
    --dataset's recipe (RECIPES) and lambda from default_lam."""
    if args.views < 2:
        common.fail("--views must be at least 2")
    if args.schedule_epochs is not None:
        common.fail("--schedule-epochs: multiaug_ssl trains at a constant learning rate (App. D), it has no schedule")
    if args.pdim <= 1:
        common.fail("--pdim must be at least 2")
    recipe = RECIPES.get(args.dataset, RECIPES[None])
    for k, v in recipe.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.scale[0] > args.scale[1]:
        common.fail("--scale takes two numbers 0 < lo <= hi <= 1")
    if args.lam is None:
        args.lam = default_lam(args.views, args.train_fraction, args.pdim, args.dataset)
    return args


# --- loss, Eq. (10) -------------------------------------------------------------------------


def off_diagonal(C):
    """The off-diagonal entries of the square matrices C [..., D, D], flattened per matrix."""
    d = C.shape[-1]
    return C.flatten(-2)[..., 1:].reshape(*C.shape[:-2], d - 1, d + 1)[..., :-1].flatten(-2)


def barlow_loss(Z, lam):
    """Barlow Twins form of Eq. (10), as the authors' code computes it. Z [M, B, D] view-major
    projections of the global batch. Returns (loss, invariance term, redundancy term).

    Rows are L2-normalised, then standardised per dimension with ONE mean and std over all M*B
    rows (unbiased std, as torch's z.std(0) in the authors' code); Z_bar = mean_a Z_a.
      M > 2: sum_a sum_k (C_a[k,k] - 1)^2 / M + lam * sum_{k!=l} C_bar[k,l]^2,
             C_a = Z_a^T Z_bar / B (only its diagonal is needed: O(M B D)), C_bar = Z_bar^T Z_bar / B.
      M = 2: the usual Barlow Twins cross-correlation C = Z_1^T Z_2 / B; averaging both
             pairings (1 vs 2, 2 vs 1) as the authors' code does equals one pairing, C_21 = C_12^T."""
    M, B, D = Z.shape
    Z = F.normalize(Z.float(), dim=-1)
    flat = Z.reshape(M * B, D)
    Z = ((flat - flat.mean(0)) / flat.std(0)).reshape(M, B, D)
    if M == 2:
        C = Z[0].T @ Z[1] / B
        inv = (torch.diagonal(C) - 1).pow(2).sum()
        red = off_diagonal(C).pow(2).sum()
        return inv + lam * red, inv, red
    Z_bar = Z.mean(0)
    diag_C = (Z * Z_bar).sum(1) / B  # [M, D]: diagonal of every C_a
    inv = (diag_C - 1).pow(2).sum() / M
    C_bar = Z_bar.T @ Z_bar / B
    red = off_diagonal(C_bar).pow(2).sum()  # no 1/M on the redundancy term (authors' code)
    return inv + lam * red, inv, red


def vicreg_loss(Z, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0):
    """VICReg form of Eq. (10), as the authors' code computes it, on raw projections Z [M, B, D].
    Each view Z_a is compared with the leave-one-out mean Y_a of the other M-1 views:
        sim * MSE(Z_a, Y_a) + std * (mean relu(1 - std Z_a) + mean relu(1 - std Y_a)) / 2
        + cov * (|offdiag cov Z_a|^2 + |offdiag cov Y_a|^2) / D,
    summed over a and divided by M (for M = 2 that is plain VICReg). std = sqrt(Var + 1e-4) as in
    VICReg; the authors' code drops the 1e-4 (departure, kept for stability).
    Returns (loss, invariance, variance, covariance terms, each averaged over views)."""
    M, B, D = Z.shape
    Z = Z.float()
    Y = (Z.sum(0, keepdim=True) - Z) / (M - 1)  # leave-one-out means, [M, B, D]

    def std_term(X):
        return F.relu(1 - torch.sqrt(X.var(1) + 1e-4)).mean(-1)  # [M]

    def cov_term(X):
        Xc = X - X.mean(1, keepdim=True)
        C = Xc.transpose(1, 2) @ Xc / (B - 1)  # [M, D, D]
        return off_diagonal(C).pow(2).sum(-1) / D

    inv = (Z - Y).pow(2).mean((1, 2))
    var = (std_term(Z) + std_term(Y)) / 2
    cov = cov_term(Z) + cov_term(Y)
    loss = (sim_coeff * inv + std_coeff * var + cov_coeff * cov).mean()
    return loss, inv.mean(), var.mean(), cov.mean()


# --- model ----------------------------------------------------------------------------------


# projector Linear biases (first, last), as the authors' BackBone.build_projector (fastssl
# fastssl/models/backbone.py): Linear(bias=False), BN, ReLU, Linear(bias=True)
PROJ_BIAS = [False, True]


class MultiViewNet(nn.Module):
    """ResNet backbone -> projector pdim-pdim (Linear without bias, BN, ReLU, Linear with bias;
    the authors' code). The output stays raw: barlow_loss L2-normalises it, VICReg uses it as is
    (authors' code)."""

    def __init__(self, arch, stem, pdim):
        super().__init__()
        self.backbone = common.backbone(arch, stem)
        self.projector = common.projector(self.backbone.dim, f"{pdim}-{pdim}", bias=PROJ_BIAS)

    def forward(self, x):
        return self.projector(self.backbone(x))


# (data set, views, train fraction) -> {pdim: lambda}: the authors' run scripts (docs/recipes.md)
LAM = {("cifar10", 2, 1.0): {256: 0.02, 8192: 8e-4},
       ("cifar10", 4, 1.0): {256: 0.01, 8192: 4e-4},
       ("cifar10", 8, 1.0): {256: 0.01, 8192: 4e-4},
       ("cifar10", 4, 0.5): {256: 0.01, 8192: 8e-4},
       ("cifar10", 8, 0.25): {256: 0.006, 8192: 4e-4},
       ("stl10", 2, 1.0): {256: 0.008, 8192: 4e-4},
       ("stl10", 4, 1.0): {256: 0.001},
       ("stl10", 4, 0.5): {256: 0.002},
       ("stl10", 8, 0.25): {256: 0.006}}


def default_lam(views, train_fraction=1.0, pdim=256, dataset="cifar10"):
    """Barlow Twins lambda for a run, from LAM (the rules: docs/recipes.md): the row of
    (dataset, views, train_fraction), else the full-data row of the nearest tuned view count; the
    row's value at pdim, else a power law between its two tuned pdim, else lambda * p / pdim from
    the nearest tuned p."""
    ds = "stl10" if dataset == "stl10" else "cifar10"
    row = LAM.get((ds, views, float(train_fraction)))
    if row is None:
        tuned = sorted(v for d, v, f in LAM if d == ds and f == 1.0)
        v = min(tuned, key=lambda t: (abs(math.log(max(views, 1) / t)), t))
        row = LAM[(ds, v, 1.0)]
    pdim = max(int(pdim), 1)
    if pdim in row:
        return row[pdim]
    lo, hi = min(row), max(row)
    if lo < pdim < hi:  # log-log interpolation between the tuned pdim
        t = math.log(pdim / lo) / math.log(hi / lo)
        return math.exp((1 - t) * math.log(row[lo]) + t * math.log(row[hi]))
    p = lo if pdim < lo else hi
    return row[p] * p / pdim


def train_fraction_indices(n, fraction, seed=0):
    """--train-fraction: the first round(fraction * n) images of a fixed seeded permutation, so
    smaller fractions are nested in larger ones and every run sees the same images (Sec. 4.3)."""
    return common.subset_indices(n, max(1, round(fraction * n)), seed)


# --- training -------------------------------------------------------------------------------


def main(argv=None):
    args = common.resolve_common(parse_args(argv), METHOD)  # parse_args checks the method's flags
    args.arch = args.arch or ("resnet18" if args.dataset == "in100" else "resnet50")
    rank, world, device = common.init_distributed()
    torch.manual_seed(args.seed)

    train = common.load_train_set(args, subset=(lambda n: train_fraction_indices(n, args.train_fraction))
                                  if args.train_fraction < 1 else None)
    args.train_images = len(train)
    args.out_size = args.out_size or train.size
    args.stem = common.default_stem(args.out_size)
    args.norm_mean, args.norm_std = (list(s) for s in common.data_stats(args.dataset))
    model = MultiViewNet(args.arch, args.stem, args.pdim).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)  # App. D
    gen = common.make_generator(args.seed, rank, device)
    M, B = args.views, args.batch_size
    aug = augmentation(args)
    views = {"scale": list(args.scale), "ratio": [3 / 4, 4 / 3], "aug": vars(aug)}  # eval_linear --mode views
    probe = common.probe_info(args.arch, args.stem, args.out_size, args.norm_mean, args.norm_std, "image",
                              proj=f"{args.pdim}-{args.pdim}", proj_bias=PROJ_BIAS, views=views)
    run = common.Run(args, model, optimizer, gen, train, probe, inputs=M * B)
    net = common.wrap_ddp(model, device, not args.no_sync_bn)
    if args.compile:
        net = torch.compile(net)

    for imgs, _, _ in run.batches():
        lr = args.lr  # constant learning rate (App. D)
        x, _ = common.sample_views(imgs.to(device, non_blocking=True), M, args.out_size, tuple(args.scale),
                                   generator=gen)  # uint8 in, float in [0, 1] out
        x = common.augment(x, aug, gen)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with common.autocast(args, device):
            z = net(x)
        Z = common.gather_views(z.float(), M).reshape(M, -1, z.shape[1])  # [M, B, D], global batch
        if args.loss == "barlow":
            loss, inv, red = barlow_loss(Z, args.lam)
            terms = {"loss": loss.detach(), "inv": inv.detach(), "redundancy": red.detach()}
        else:
            loss, inv, var, cov = vicreg_loss(Z, args.sim_coeff, args.std_coeff, args.cov_coeff)
            terms = {"loss": loss.detach(), "inv": inv.detach(), "var": var.detach(), "cov": cov.detach()}
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        run.step(terms, lr)


if __name__ == "__main__":
    common.run_cli(main)
