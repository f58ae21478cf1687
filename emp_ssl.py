"""EMP-SSL: Extreme-Multi-Patch Self-Supervised Learning (Tong, Chen, Ma, LeCun 2023).

Every image is cut into n fixed-size patches (n = 200 in the paper). All patches go through one
network; the loss keeps the projections of each patch spread out (Total Coding Rate, Eq. 1) and
pulls each patch towards the mean projection of its image (cosine invariance, Eq. 2). The image
representation is the mean embedding of its patches (bag of features).

Paper: Tong, Chen, Ma, LeCun, "EMP-SSL: Towards Self-Supervised Learning in One Training Epoch",
2023, arXiv:2304.03977. Its one-epoch CIFAR-10 numbers come from two protocols:
  Table 1 (85.1 % linear, 200 patches; the learning rate decays within the one epoch):
    python emp_ssl.py --epochs 1 --patches 200 --out runs/emp-t1
  Table 2, one-epoch column (80.6 % with 20 patches, 82.6 % with 200): epoch 1 of a 30-epoch cosine:
    python emp_ssl.py --epochs 1 --schedule-epochs 30 --patches 20 --out runs/emp-t2
  then the paper's probe, a 128-patch bag of backbone embeddings (Sec. 3):
    python eval_linear.py --ckpt runs/emp-t2 --mode bag --patches 128
The paper recipe holds 200 x 100 = 20,000 patches a step: a GPU's work (README, "What the paper
recipes cost"; measured speeds: docs/results.md).
Multi-GPU (batch is global): torchrun --nproc_per_node=4 emp_ssl.py --dataset in100
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

METHOD = "emp_ssl"
# per data set: (patch side, network input side), Sec. 3 "settings"
PATCH = {"cifar10": (16, 32), "cifar100": (16, 32), "synthetic": (16, 32), "tinyimagenet": (32, 64),
         "stl10": (48, 96), "in100": (112, 224)}


def parse_args(argv=None):
    p = common.base_parser(__doc__, epochs=10, batch_size=100, lr=0.3, weight_decay=1e-4,
                           epochs_help="training epochs (Sec. 3: 1 to 30; Table 1: 1, Table 2: 1/10/20/30)",
                           batch_help="GLOBAL batch of images (Sec. 3: 100; Fig. 6 sweeps it)",
                           lr_help="LARS base learning rate (Sec. 3: 0.3)", wd_help="weight decay (Sec. 3: 1e-4)")
    a = p.add_argument
    a("--patches", type=common.COUNT, default=200, help="patches per image n (Sec. 3: 200; Table 2 also 20; Fig. 5 sweeps it)")
    a("--patch-size", type=common.COUNT, default=None, help="patch side in px (Sec. 3: 16 on CIFAR, 32 on Tiny, 112 on in100)")
    a("--out-size", type=common.COUNT, default=None, help="side the patches are resized to (Sec. 3: 32 on CIFAR, 224 on in100)")
    a("--inv-weight", type=common.NONNEG, default=200.0, help="lambda, weight of the invariance term (Eq. 2: 200)")
    a("--eps2", type=common.POSITIVE, default=0.2, help="epsilon^2 of the coding rate (Eq. 1: 0.2)")
    a("--proj", default="4096-512", help="projector dims, Linear-BN-ReLU between Linears (Sec. 3: 4096-512; official code: 4096-4096-1024)")
    a("--eta", type=common.POSITIVE, default=0.005, help="LARS trust coefficient (official code: 0.005)")
    a("--grad-checkpoint", action="store_true", help="recompute backbone activations in backward (CIFAR: 200 patches x batch 100 on one GPU; in100 needs several)")
    a("--patch-sampler", default="paper", choices=["paper", "official"],
      help="paper: n patch-size crops of the resized, centre-cropped image (Sec. 2); official: as the authors' "
           "CIFAR code, n RandomResizedCrop(out-size, scale 0.25, ratio 1) of the image, bilinear on the device")
    return p.parse_args(argv)


# --- loss, Eq. (1)-(2) ----------------------------------------------------------------------


def total_coding_rate(Z, eps2):
    """R(Z) = 1/2 logdet(I + d/(b eps2) Z^T Z) of each of the n views in Z [n, b, d] (Eq. 1).
    Float32, and the smaller of the d x d and b x b forms (Sylvester's identity)."""
    n, b, d = Z.shape
    c = d / (b * eps2)
    with torch.autocast(Z.device.type, enabled=False):  # autocast would run the Gram matmul in bf16
        Z = Z.float()
        gram = Z.transpose(1, 2) @ Z if d <= b else Z @ Z.transpose(1, 2)  # [n, d, d] or [n, b, b]
        I = torch.eye(gram.shape[-1], device=Z.device)
        return 0.5 * torch.logdet(I + c * gram)


def invariance(Z, Z_bar):
    """D(Z_i, Z_bar): batch mean of the cosine similarity of each patch to its image's mean (Eq. 2)."""
    return F.cosine_similarity(Z.float(), Z_bar.float().unsqueeze(0), dim=-1).mean(1)


def emp_loss(Z, eps2=0.2, lam=200.0):
    """Eq. (2): loss = -(1/n) sum_i [ R(Z_i) + lam * D(Z_i, Z_bar) ], Z [n, b, d] view-major
    projections of the global batch. Returns (loss, mean R, mean D)."""
    Z_bar = Z.mean(0)
    R = total_coding_rate(Z, eps2)
    D = invariance(Z, Z_bar)
    loss = -(R + lam * D).mean()
    return loss, R.mean(), D.mean()


# --- augmentation, A.1 ----------------------------------------------------------------------------


def augmentation(args):
    """The patches' augmentation (A.1, VICReg's): horizontal flip 0.5, ColorJitter(0.4, 0.4, 0.4, 0.2)
    with p 0.8, grayscale 0.2, Gaussian blur 0.1 (sigma 0.1 to 2), solarization 0.1; normalised with
    mean = std = 0.5 as the authors' code."""
    return common.AugConfig(flip=0.5, jitter=(0.4, 0.4, 0.4, 0.2), p_jitter=0.8, p_gray=0.2, p_blur=0.1,
                            blur_sigma=(0.1, 2.0), p_solarize=0.1, mean=args.norm_mean, std=args.norm_std)


# --- model ----------------------------------------------------------------------------------


def forward_checkpointed(net, x):
    """net(x) of any common.backbone keeping only each block's input, recomputing the rest in backward
    (--grad-checkpoint): the same outputs and gradients (BatchNorm's running statistics move twice)."""
    from torch.utils.checkpoint import checkpoint
    if isinstance(net, common.PooledFeatures):
        blocks, head = list(net.features), lambda y: y.mean((2, 3))
    else:
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        blocks, head = [*net.layer1, *net.layer2, *net.layer3, *net.layer4], lambda y: torch.flatten(net.avgpool(y), 1)
    for block in blocks:
        x = checkpoint(block, x, use_reentrant=False)
    return head(x)


class EMPNet(nn.Module):
    """ResNet backbone -> projector -> L2-normalised z (Sec. 2, "Architecture")."""

    def __init__(self, arch, stem, proj, grad_checkpoint=False):
        super().__init__()
        self.backbone = common.backbone(arch, stem)
        self.projector = common.projector(self.backbone.dim, proj)
        self.grad_checkpoint = grad_checkpoint

    def forward(self, x):
        h = forward_checkpointed(self.backbone, x) if self.grad_checkpoint else self.backbone(x)
        return F.normalize(self.projector(h), dim=1)


# --- training -------------------------------------------------------------------------------


def resolve_args(args):
    """Data-set dependent defaults (Sec. 3 settings): patch and input sides, stem, normalisation."""
    args = common.resolve_common(args, METHOD)
    ps, os_ = PATCH.get(args.dataset, (None, None))
    args.patch_size = args.patch_size or ps or (args.image_size or 64) // 2
    args.out_size = args.out_size or os_ or 2 * args.patch_size
    args.stem = common.default_stem(args.out_size)
    args.norm_mean = args.norm_std = [0.5, 0.5, 0.5]  # the official EMP-SSL normalisation
    return args


def main(argv=None):
    args = resolve_args(parse_args(argv))
    rank, world, device = common.init_distributed()
    torch.manual_seed(args.seed)

    train = common.load_train_set(args, patch_size=args.patch_size)
    model = EMPNet(args.arch, args.stem, args.proj, args.grad_checkpoint).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = common.LARS(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, eta=args.eta)
    gen = common.make_generator(args.seed, rank, device)
    n, B = args.patches, args.batch_size
    aug = augmentation(args)
    probe = common.probe_info(args.arch, args.stem, args.out_size, args.norm_mean, args.norm_std, "bag",  # Sec. 2
                              patch_size=args.patch_size, proj=args.proj, aug=vars(aug))
    run = common.Run(args, model, optimizer, gen, train, probe, inputs=n * B)
    net = common.wrap_ddp(model, device, not args.no_sync_bn)
    if args.compile:
        net = torch.compile(net)

    for imgs, _, _ in run.batches():
        lr = common.cosine_lr(run.steps, run.horizon, args.lr)  # cosine to 0, no warm-up (Sec. 3)
        common.set_lr(optimizer, lr)
        if args.patch_sampler == "official":  # the authors' RandomResizedCrop(scale 0.25, ratio 1) per patch
            b, _, h, w = imgs.shape
            crop = common.random_resized_boxes(n * b, h, w, (0.25, 0.25), (1.0, 1.0), gen, device)
            x = common.resized_crops(imgs.to(device).repeat(n, 1, 1, 1), crop, args.out_size).div_(255)
        else:  # Sec. 2: n fixed-size patches of every image
            x, _ = common.sample_patches(imgs.to(device, non_blocking=True), n, args.patch_size, args.out_size, gen)
        x = common.augment(x, aug, gen)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with common.autocast(args, device):
            z = net(x)
        Z = common.gather_views(z.float(), n).reshape(n, -1, z.shape[1])  # [n, B, d], global batch
        loss, R, D = emp_loss(Z, args.eps2, args.inv_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        run.step({"loss": loss.detach(), "R": R.detach(), "D": D.detach()}, lr)


if __name__ == "__main__":
    common.run_cli(main)
