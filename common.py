"""What the effssl methods are made of, then how they run; a method file and this file are a whole
method. First the science: patches and augmentations batched on the training device, backbones and
projector, LARS and the cosine schedule, gathering over ranks, bag of features and k-NN. Below the
fence, the harness: data sets and loaders, the command line, processes and `Run` (the run folder)."""
import argparse
import functools
import hashlib
import json
import math
import os
import re
import signal
import sys
import threading
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision

# --- patches and augmentation (batched, every parameter drawn per sample, on the training device) ---


def resized_crops(images, boxes, out_size):
    """Crop boxes [N,4] = (top, left, height, width) from images [N,C,H,W], each resized to out_size
    as F.interpolate(crop, bilinear, align_corners=False) would; one batched gather."""
    n, c, h, w = images.shape
    x = images.float()
    dev = x.device
    i = torch.arange(out_size, device=dev, dtype=torch.float32)

    def src(start, length):  # source coordinates of one axis, clamped as interpolate does
        pos = ((i[None] + 0.5) * (length[:, None].float() / out_size) - 0.5).clamp(min=0)
        lo = torch.minimum(pos.floor().long(), length[:, None] - 1)
        hi = torch.minimum(lo + 1, length[:, None] - 1)
        frac = (pos - lo.float()).clamp(0, 1)
        return lo + start[:, None], hi + start[:, None], frac

    top, left, hh, ww = boxes.unbind(1)
    y0, y1, fy = src(top, hh)
    x0, x1, fx = src(left, ww)
    ar = torch.arange(n, device=dev)[:, None, None]
    ch = torch.arange(c, device=dev)[None, :, None]
    rows = x[ar, ch, y0[:, None, :]] * (1 - fy)[:, None, :, None] + x[ar, ch, y1[:, None, :]] * fy[:, None, :, None]
    rows = rows.permute(0, 1, 3, 2)  # [N, C, W, out]: now the columns
    cols = rows[ar, ch, x0[:, None, :]] * (1 - fx)[:, None, :, None] + rows[ar, ch, x1[:, None, :]] * fx[:, None, :, None]
    return cols.permute(0, 1, 3, 2).contiguous()


def patch_boxes(n, size, h, w, generator=None, device="cpu"):
    """n size x size boxes (top, left, height, width) placed uniformly in an h x w image."""
    top = torch.randint(0, h - size + 1, (n,), device=device, generator=generator)
    left = torch.randint(0, w - size + 1, (n,), device=device, generator=generator)
    s = torch.full_like(top, size)
    return torch.stack([top, left, s, s], 1)


def sample_patches(images, n, size, out_size, generator=None):
    """EMP-SSL's patches: n uniformly placed size x size crops of each image, resized to out_size: (patches
    [n*B,C,out,out] in [0,1], boxes [n*B,4]), view-major: patches[i*B + b] is patch i of image b."""
    b, _, h, w = images.shape
    dev = images.device
    boxes = patch_boxes(n * b, size, h, w, generator, dev)
    top, left = boxes[:, 0], boxes[:, 1]
    # equal-size crops: gather their pixels, then one F.interpolate (no n-fold copy of the images)
    src = torch.arange(b, device=dev).repeat(n)[:, None, None, None]  # patch i*B + b is from image b
    r = torch.arange(size, device=dev)
    ch = torch.arange(images.shape[1], device=dev)[None, :, None, None]
    x = images[src, ch, (top[:, None] + r)[:, None, :, None], (left[:, None] + r)[:, None, None, :]].float().div_(255)
    if size != out_size:
        x = F.interpolate(x, size=(out_size, out_size), mode="bilinear", align_corners=False)
    return x, boxes


def random_resized_boxes(n, h, w, scale, ratio, generator=None, device="cpu"):
    """Boxes (top, left, height, width) as torchvision's RandomResizedCrop.get_params draws them,
    vectorised: 10 tries per sample, then the same central-crop fallback."""
    area = h * w
    tries = 10
    log_r = torch.log(torch.tensor(ratio)).tolist()  # on the host, in float32 as torchvision's get_params
    a = torch.empty(n, tries, device=device).uniform_(scale[0], scale[1], generator=generator) * area
    r = torch.exp(torch.empty(n, tries, device=device).uniform_(log_r[0], log_r[1], generator=generator))
    cw = torch.sqrt(a * r).round().long()
    chh = torch.sqrt(a / r).round().long()
    ok = (cw > 0) & (chh > 0) & (cw <= w) & (chh <= h)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1, device=device))
    fw, fh = w, h  # the fallback: a central crop, the image's ratio clamped into range
    if w / h < min(ratio):
        fh = int(round(w / min(ratio)))
    elif w / h > max(ratio):
        fw = int(round(h * max(ratio)))
    sel = first.clamp(min=0)[:, None]
    cw = torch.where(first >= 0, cw.gather(1, sel)[:, 0], torch.full_like(first, fw))
    chh = torch.where(first >= 0, chh.gather(1, sel)[:, 0], torch.full_like(first, fh))
    u = torch.rand(n, 2, device=device, generator=generator)
    top = torch.where(first >= 0, (u[:, 0] * (h - chh + 1)).floor().long(), (h - chh) // 2)
    left = torch.where(first >= 0, (u[:, 1] * (w - cw + 1)).floor().long(), (w - cw) // 2)
    return torch.stack([top, left, chh, cw], 1)


def sample_views(images, m, out_size, scale, ratio=(3 / 4, 4 / 3), generator=None):
    """m random resized crops of each image, view-major like sample_patches, in [0,1]."""
    b, _, h, w = images.shape
    boxes = random_resized_boxes(m * b, h, w, scale, ratio, generator, images.device)
    return resized_crops(images.repeat(m, 1, 1, 1), boxes, out_size).div_(255), boxes


def grayscale(x):
    """ITU-R 601-2 luma as torchvision's rgb_to_grayscale, [N,1,H,W]."""
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def rgb_to_hsv(x):
    """Batched RGB -> HSV in [0,1], the same arithmetic as torchvision's tensor adjust_hue."""
    r, g, b = x.unbind(1)
    maxc, minc = torch.maximum(torch.maximum(r, g), b), torch.minimum(torch.minimum(r, g), b)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    crd = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / crd, (maxc - g) / crd, (maxc - b) / crd
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), 1)


def hsv_to_rgb(x):
    """Batched HSV -> RGB, inverse of rgb_to_hsv (torchvision's formulas)."""
    # channel = v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6, n = 5, 3, 1: torchvision's six sectors
    h, s, v = x.unbind(1)
    h6, vs = h * 6.0, v * s
    out = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(h6 + n, 6.0)
        out.append(v - vs * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))
    return torch.stack(out, 1)


def adjust_hue(x, f):
    hsv = rgb_to_hsv(x)
    h = torch.remainder(hsv[:, 0] + f.view(-1, 1, 1), 1.0)
    return hsv_to_rgb(torch.stack((h, hsv[:, 1], hsv[:, 2]), 1))


def _blend(a, b, f):
    return (f.view(-1, 1, 1, 1) * a + (1 - f.view(-1, 1, 1, 1)) * b).clamp(0, 1)


JITTER_OPS = (  # ColorJitter's brightness, contrast, saturation, hue in torchvision's fn_idx order, per-sample f
    lambda x, f: _blend(x, torch.zeros_like(x), f),
    lambda x, f: _blend(x, grayscale(x).mean(dim=(1, 2, 3), keepdim=True), f),
    lambda x, f: _blend(x, grayscale(x), f),
    adjust_hue)


def matched_sigma(sigma, kernel_size, iters=30):
    """The width s of a Gaussian sampled at integer offsets (torchvision's gaussian_blur) whose discrete
    variance is sigma^2, as PIL's GaussianBlur(sigma) has: sampling shrinks small blurs (sigma 0.5
    gives std 0.46, 0.1 none). Bisection per sample, sigma [N] -> s [N]."""
    sigma = sigma.double()
    half = (kernel_size - 1) // 2
    t2 = torch.arange(-half, half + 1, device=sigma.device, dtype=torch.float64)[None] ** 2
    target = sigma.clamp(max=half / math.sqrt(3)) ** 2  # a K-tap kernel holds a variance below half^2 / 3
    lo, hi = torch.full_like(sigma, 1e-3), sigma + 1.0 + 2 * half
    for _ in range(iters):
        mid = (lo + hi) / 2
        w = torch.exp(-0.5 * t2 / mid[:, None] ** 2)
        var = (w * t2).sum(1) / w.sum(1)
        low = var < target
        lo, hi = torch.where(low, mid, lo), torch.where(low, hi, mid)
    return (lo + hi) / 2


def gaussian_blur(x, sigma, kernel_size):
    """Per-sample Gaussian blur, reflect padding: torchvision's gaussian_blur at matched_sigma, so that the
    blur's variance is sigma^2 as with PIL's GaussianBlur (the official VICReg / EMP-SSL pipelines)."""
    n, c, h, w = x.shape
    half = (kernel_size - 1) * 0.5
    t = torch.linspace(-half, half, kernel_size, device=x.device, dtype=x.dtype)
    s = matched_sigma(sigma, kernel_size).to(x.dtype)
    k = torch.exp(-0.5 * (t[None] / s[:, None]) ** 2)
    k = k / k.sum(1, keepdim=True)  # [N,K]
    pad = kernel_size // 2
    y = F.pad(x, [pad, pad, pad, pad], mode="reflect").reshape(1, n * c, h + 2 * pad, w + 2 * pad)
    kc = k.repeat_interleave(c, 0)  # one kernel per (sample, channel) group
    y = F.conv2d(y, kc[:, None, :, None], groups=n * c)  # vertical
    y = F.conv2d(y, kc[:, None, None, :], groups=n * c)  # horizontal
    return y.reshape(n, c, h, w)


class AugConfig:
    """Probabilities and ranges of the VICReg-style augmentation (EMP-SSL A.1 defaults)."""

    def __init__(self, flip=0.5, jitter=(0.4, 0.4, 0.4, 0.2), p_jitter=0.8, p_gray=0.2, p_blur=0.1,
                 blur_sigma=(0.1, 2.0), p_solarize=0.1, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
        self.flip, self.jitter, self.p_jitter, self.p_gray = flip, jitter, p_jitter, p_gray
        self.p_blur, self.blur_sigma, self.p_solarize = p_blur, blur_sigma, p_solarize
        self.mean, self.std = mean, std


def draw_aug_params(n, cfg, generator=None, device="cpu"):
    """Draw every augmentation parameter per sample (never per batch)."""
    def u(lo, hi):
        return torch.empty(n, device=device).uniform_(lo, hi, generator=generator)

    def coin(p):
        return torch.rand(n, device=device, generator=generator) < p

    b, c, s, h = cfg.jitter
    return {
        "flip": coin(cfg.flip),
        "jitter": coin(cfg.p_jitter),
        "order": torch.rand(n, 4, device=device, generator=generator).argsort(1),  # random order per sample
        "brightness": u(max(0, 1 - b), 1 + b), "contrast": u(max(0, 1 - c), 1 + c),
        "saturation": u(max(0, 1 - s), 1 + s), "hue": u(-h, h),
        "gray": coin(cfg.p_gray),
        "blur": coin(cfg.p_blur), "sigma": u(*cfg.blur_sigma),
        "solarize": coin(cfg.p_solarize),
    }


def blur_kernel_size(sigma, size):
    """2 ceil(3 sigma) + 1 taps (99.7 % of the mass) for the recipe's largest sigma, one size for every
    sample, capped at the largest odd number <= the image side (reflect padding needs pad < side)."""
    k = 2 * math.ceil(3 * float(sigma)) + 1
    return max(1, min(k, size - 1 + size % 2))


def apply_augment(x, p, kernel_size):
    """Apply drawn parameters to x [N,3,H,W] in [0,1]: flip, jitter in each sample's order, grayscale, blur,
    solarize. Each op runs on the whole batch, each sample keeps its own result: nothing waits for the device."""
    x = torch.where(p["flip"].view(-1, 1, 1, 1), x.flip(-1), x)
    factors = (p["brightness"], p["contrast"], p["saturation"], p["hue"])
    ops = [(p["jitter"] & (p["order"][:, k] == j), op, factors[j]) for k in range(4) for j, op in enumerate(JITTER_OPS)]
    ops += [(p["gray"], lambda y, _: grayscale(y).expand(-1, 3, -1, -1), None),
            (p["blur"], lambda y, s: gaussian_blur(y, s, kernel_size), p["sigma"]),
            (p["solarize"], lambda y, _: torch.where(y >= 0.5, 1.0 - y, y), None)]
    for take, op, f in ops:
        x = torch.where(take.view(-1, 1, 1, 1), op(x, f), x)
    return x


def normalize(x, mean, std):
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def augment(x, cfg, generator=None):
    """The per-sample augmentation, then normalisation, in x's dtype (not an enclosing autocast's)."""
    with torch.autocast(x.device.type, enabled=False):
        p = draw_aug_params(len(x), cfg, generator, x.device)
        return normalize(apply_augment(x, p, blur_kernel_size(cfg.blur_sigma[1], x.shape[-1])), cfg.mean, cfg.std)


def central_view(images, out_size, mean, std):
    """The whole uint8 image [B,3,H,W] resized to out_size (bilinear, antialiased), normalised."""
    x = images.float().div(255)
    if x.shape[-1] != out_size:
        x = F.interpolate(x, size=(out_size, out_size), mode="bilinear", align_corners=False, antialias=True)
    return normalize(x, mean, std)


# --- model ---


class PooledFeatures(nn.Module):
    """A torchvision MobileNet / EfficientNet without its classifier: features, global average pooling."""

    def __init__(self, net):
        super().__init__()
        self.features = net.features
        self.dim = net.features[-1].out_channels

    def forward(self, x):
        return self.features(x).mean((2, 3))


def backbone(arch="resnet18", stem="cifar"):
    """torchvision backbone without its classifier; .dim is the embedding size. The "cifar" stem (32-64
    px inputs): ResNets get a 3x3 stride-1 conv1 and no max-pool; the small nets of Cao & Wu 2024
    (arXiv:2404.19289, Tables 1, 3) run their first two stride-2 convs at stride 1 (kuangliu/pytorch-cifar).
    EfficientNet's stochastic depth is off, so that a run resumes bit for bit."""
    if arch.startswith("resnet"):
        net = getattr(torchvision.models, arch)(weights=None)
        if stem == "cifar":
            net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            net.maxpool = nn.Identity()
        net.dim = net.fc.in_features
        net.fc = nn.Identity()
        return net
    extra = {"stochastic_depth_prob": 0.0} if arch.startswith("efficientnet") else {}
    net = PooledFeatures(getattr(torchvision.models, arch)(weights=None, **extra))
    if stem == "cifar":
        strided = [m for m in net.features.modules() if isinstance(m, nn.Conv2d) and m.stride == (2, 2)]
        for conv in strided[:2]:  # the stem and the first downsampling block
            conv.stride = (1, 1)
    return net


def projector(in_dim, spec, bias=True):
    """Linear-BN-ReLU blocks then a Linear, dims from a string like '4096-512'. bias: one bool
    for every Linear, or a pair (hidden, last): the Linears before a BatchNorm, the last Linear."""
    hidden_bias, last_bias = (bool(b) for b in bias) if isinstance(bias, (list, tuple)) else (bool(bias),) * 2
    dims = [in_dim] + [int(d) for d in spec.split("-")]
    layers = []
    for a, b in zip(dims[:-2], dims[1:-1]):
        layers += [nn.Linear(a, b, bias=hidden_bias), nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(dims[-2], dims[-1], bias=last_bias))
    return nn.Sequential(*layers)


# --- optimiser and schedule ---


class LARS(torch.optim.SGD):
    """LARS as the official EMP-SSL code applies it, then SGD with Nesterov momentum. For every
    parameter with ndim > 1: g <- (g + wd * w) * min(eta * |w| / (|g| + wd * |w| + 1e-8) / lr, 1)
    (skipped when |w| or |g| is 0); biases and norm weights get neither weight decay nor the ratio."""

    def __init__(self, params, lr, weight_decay=0.0, momentum=0.9, eta=0.005, nesterov=True, eps=1e-8):
        super().__init__(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=0.0)
        for group in self.param_groups:
            group.update(lars_weight_decay=weight_decay, eta=eta, eps=eps)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            wd, eta, lr = group["lars_weight_decay"], group["eta"], group["lr"]
            for p in group["params"]:
                if p.grad is None or p.ndim <= 1:
                    continue
                w_norm, g_norm = torch.norm(p), torch.norm(p.grad)
                ratio = eta * w_norm / (g_norm + wd * w_norm + group["eps"]) / max(lr, 1e-12)
                ratio = torch.where((w_norm > 0) & (g_norm > 0), ratio.clamp(max=1.0), torch.ones_like(ratio))
                wd_eff = torch.where((w_norm > 0) & (g_norm > 0), wd, 0.0)
                p.grad.add_(wd_eff * p).mul_(ratio)
        return super().step(closure)


def cosine_lr(step, total, base_lr, warmup=0, final=0.0):
    """Linear warm-up over `warmup` steps, then cosine from base_lr to `final` at `total`."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return final + (base_lr - final) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def set_lr(optimizer, lr):
    for g in optimizer.param_groups:
        g["lr"] = lr

# --- gathering over ranks (torchrun): the loss of the global batch ---


class GatherLayer(torch.autograd.Function):
    """all_gather that keeps gradients (official VICReg code): backward sums every rank's gradient,
    so that DDP's averaging gives exactly the gradient of the global-batch loss."""

    @staticmethod
    def forward(ctx, x):
        out = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        g = torch.stack(grads)
        dist.all_reduce(g)
        return g[dist.get_rank()]


def gather_views(z, n):
    """Gather view-major rows [n*b, d] over ranks into the view-major global batch [n*B, d]."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return z
    b = z.shape[0] // n
    parts = GatherLayer.apply(z.reshape(n, b, -1))  # world x [n, b, d]
    return torch.cat(parts, 1).reshape(n * b * len(parts), -1)


def all_gather_nograd(x):
    """Concatenate x over ranks without gradient (indices, labels, bank updates)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    out = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, 0)


# --- bag of features, probes and k-NN (eval_linear.py and the --eval-every probe) ---


def fixed_patch_boxes(n, size, image_size, seed=0):
    """n patch positions drawn once from a fixed seed: identical for every image and run."""
    return patch_boxes(n, size, image_size, image_size, torch.Generator().manual_seed(seed))


@torch.no_grad()
def bag_of_features(backbone, images, boxes, out_size, mean, std, chunk=2048, aug=None, generator=None):
    """Bag-of-features (EMP-SSL Sec. 2): the mean backbone embedding of the patches at `boxes` of each uint8
    image [B,3,H,W]: boxes [n,4] the same n positions in every image, [n,B,4] each image its own."""
    b, n = images.shape[0], boxes.shape[0]
    x = images.float().div(255).repeat(n, 1, 1, 1)
    bx = boxes.to(images.device)  # view-major: patch i of every image
    bx = bx.repeat_interleave(b, 0) if bx.dim() == 2 else bx.reshape(n * b, 4)
    feats = []
    for s in range(0, n * b, chunk):
        p = resized_crops(x[s:s + chunk], bx[s:s + chunk], out_size)
        p = augment(p, aug, generator) if aug is not None else normalize(p, mean, std)
        feats.append(backbone(p).float())
    return torch.cat(feats).reshape(n, b, -1).mean(0)


@torch.no_grad()
def knn_predict(train_f, train_y, test_f, num_classes, k=20, t=0.07, chunk=512):
    """Weighted k-NN (NPID protocol): cosine similarity, vote weight exp(s/T); the labels of test_f."""
    train_f, test_f = F.normalize(train_f.float(), dim=1), F.normalize(test_f.float(), dim=1)
    k = min(k, len(train_f))
    preds = []
    for s in range(0, len(test_f), chunk):
        sim, idx = (test_f[s:s + chunk] @ train_f.T).topk(k, dim=1)
        votes = torch.zeros(len(sim), num_classes, device=sim.device)
        votes.scatter_add_(1, train_y.to(sim.device)[idx], (sim / t).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds)


# ======== harness: data, command line, processes, run folder (nothing above uses a name below) ========
class UserError(Exception):
    """A mistake in the command line or the inputs: one line on stderr, exit 2 (run_cli)."""


def fail(msg):
    raise UserError(msg)


# --- data sets and loaders ---


STATS = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
         "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
         "synthetic": ((0.5005, 0.4998, 0.5009), (0.1728, 0.1726, 0.1726))}  # measured, as CIFAR's
IMAGE_SIZE = {"cifar10": 32, "cifar100": 32, "stl10": 96, "tinyimagenet": 64, "in100": 224, "synthetic": 32}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "stl10": 10, "tinyimagenet": 200, "in100": 100, "synthetic": 10}
DATASETS = ("cifar10", "cifar100", "stl10", "tinyimagenet", "in100", "folder", "synthetic")
TORCHVISION = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python", "stl10": "stl10_binary"}
FOLDER = "an ImageFolder tree train/<class>/*.jpg, test/<class>/*.jpg (or val/)"


def data_stats(name):
    """(mean, std) per channel for normalisation: the data set's own, else ImageNet's."""
    return STATS.get(name, ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))


def default_stem(size):
    """The backbone stem for an input side: the CIFAR stem up to 64 px, the ImageNet stem above."""
    return "cifar" if size <= 64 else "imagenet"


class ImageSet:
    """A labelled image set: uint8 `images` [N,3,S,S] in memory, or image `files` decoded on the fly."""

    def __init__(self, labels, num_classes, size, images=None, files=None):
        self.labels, self.num_classes, self.size, self.images, self.files = labels, num_classes, size, images, files

    def __len__(self):
        return len(self.labels)

    def subset(self, idx):
        """The images at positions idx (a LongTensor) as a new ImageSet."""
        files = [self.files[i] for i in idx.tolist()] if self.files is not None else None
        return ImageSet(self.labels[idx], self.num_classes, self.size,
                        self.images[idx] if self.images is not None else None, files)

    def get(self, idx, workers=0):
        """uint8 images [len(idx),3,S,S] on the CPU."""
        return self.images[idx] if self.images is not None else \
            load_files([self.files[i] for i in idx.tolist()], self.size, workers)


_BAD_FILES = set()  # per process: one warning per unreadable file


def decode_image(path, size):
    """One image file as uint8 [3,size,size] (PIL, as torchvision's ImageFolder): the short side resized
    (to size * 8/7 above 96 px: 256 for 224, the ImageNet protocol), then centre-cropped; size None keeps
    it whole. An unreadable file is said once and replaced by a grey image: it must not end a long run."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            img = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
    except Exception as e:
        if path not in _BAD_FILES:
            _BAD_FILES.add(path)
            print(f"warning: cannot decode {path} ({' '.join(f'{type(e).__name__}: {e}'.split())[:200]}); "
                  f"using a grey image instead", file=sys.stderr, flush=True)
        return torch.full((3, size or 256, size or 256), 128, dtype=torch.uint8)
    if size is not None and tuple(img.shape[-2:]) != (size, size):
        tf = torchvision.transforms.functional
        img = tf.center_crop(tf.resize(img, size if size <= 96 else round(size * 8 / 7), antialias=True), size)
    return img


def load_files(files, size, workers=0):
    """Decode image files to one uint8 tensor [N,3,size,size], in `workers` threads."""
    if workers > 0 and len(files) > 256:
        from concurrent.futures import ThreadPoolExecutor  # PIL releases the GIL while it decodes
        with ThreadPoolExecutor(workers) as pool:
            return torch.stack(list(pool.map(lambda f: decode_image(f, size), files, chunksize=64)))
    return torch.stack([decode_image(f, size) for f in files])


def _folder_set(root, size, in_memory, workers):
    """An ImageFolder tree (torchvision's scan) as an ImageSet. In memory (small images): decoded once
    into a cache file, used again while every file keeps its path, size and modification time."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
    try:
        samples = make_dataset(root, find_classes(root)[1], IMG_EXTENSIONS, allow_empty=True)
    except OSError as e:
        fail(f"cannot scan {root} ({e}): expected {FOLDER}")
    if not samples:
        fail(f"no images found under {root}: expected {FOLDER}")
    files, labels = [f for f, _ in samples], torch.tensor([c for _, c in samples])
    ds = ImageSet(labels, int(labels.max()) + 1, size, files=files)
    if not in_memory:
        return ds
    key = hashlib.sha1(f"{os.path.realpath(root)}:{size}".encode()).hexdigest()[:16]
    cache = os.path.join(os.environ.get("EFFSSL_CACHE", os.path.expanduser("~/.cache/effssl")), f"images-{key}.pt")
    stamp = hashlib.sha1("".join(f"{f}\t{s.st_size}\t{s.st_mtime_ns}\n" for f, s in zip(files, map(os.stat, files)))
                         .encode()).hexdigest()
    try:
        blob = torch.load(cache, weights_only=True)
        if blob["stamp"] == stamp and torch.equal(blob["labels"], labels):
            return ImageSet(labels, ds.num_classes, size, images=blob["images"])
        print(f"the decoded cache {cache} of {root} is stale: decoding the images again", file=sys.stderr, flush=True)
    except Exception:  # none yet, torn or foreign: decoded below
        pass
    images = load_files(files, size, workers=max(workers, 2))
    try:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        atomic_save({"labels": labels, "stamp": stamp, "images": images}, cache)
    except (OSError, UserError):
        pass  # a read-only or full cache only costs the decode next time
    return ImageSet(labels, ds.num_classes, size, images=images)


def synthetic_set(split, seed=0, n=None):
    """Procedural 32x32 images, 10 classes: a coarse texture's kind (stripes or checks) and orientation (5
    angles), at periods P and 2P (P 10-16 px), so that the class survives crops of 8 % of the image, blur and
    grayscale; period, phase, flip, contrast, noise and a smooth colour field are nuisances."""
    n = n or (10000 if split == "train" else 2000)
    g = torch.Generator().manual_seed(seed * 7919 + (0 if split == "train" else 1))
    labels = torch.arange(n) % 10
    labels = labels[torch.randperm(n, generator=g)]
    theta = (labels % 5).float() * (math.pi / 10) + math.pi / 20  # 5 orientations in (0, pi/2)
    theta = theta * (torch.randint(0, 2, (n,), generator=g) * 2 - 1)  # sign is a nuisance (flip)
    period = (10 + 6 * torch.rand(n, generator=g))[:, None, None]
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    c, s = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    ph = torch.rand(n, 4, 1, 1, generator=g) * 2 * math.pi
    wave = lambda u, a, b: torch.sin(2 * math.pi * u / period + a) + 0.7 * torch.sin(math.pi * u / period + b)  # noqa: E731
    stripes = wave(xx * c + yy * s, ph[:, 0], ph[:, 1])
    checks = stripes * wave(yy * c - xx * s, ph[:, 2], ph[:, 3]) / 1.2
    tex = torch.where((labels >= 5)[:, None, None], checks, stripes) / 1.7
    amp = 0.25 + 0.15 * torch.rand(n, 1, 1, 1, generator=g)
    ctrl = 0.3 + 0.4 * torch.rand(n, 3, 2, 2, generator=g)  # nuisance colour field
    base = F.interpolate(ctrl, size=(32, 32), mode="bicubic", align_corners=True)
    img = base + amp * tex[:, None] + 0.05 * torch.randn(n, 3, 32, 32, generator=g)
    images = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    return ImageSet(labels, 10, 32, images=images)


def _torchvision_set(name, root, split, download):
    """CIFAR-10 / 100 or STL-10 in torchvision's layout (what --download gives), read by torchvision.datasets,
    whose md5 check refuses a torn or foreign file before it is unpickled; None where it is not there."""
    if not download and not os.path.isdir(os.path.join(root, TORCHVISION[name])):
        return None
    try:
        if name == "stl10":  # labels 0..9, -1 for the unlabeled images
            ds = torchvision.datasets.STL10(root, split={"ssl": "train+unlabeled"}.get(split, split), download=download)
            images, labels = torch.from_numpy(ds.data), torch.from_numpy(ds.labels).long()
        else:
            ds = getattr(torchvision.datasets, name.upper())(root, train=split != "test", download=download)
            images, labels = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets)
    except Exception as e:  # corrupted, foreign, or a failed download: one line, never a traceback
        fail(f"cannot read {name} in {os.path.join(root, TORCHVISION[name])} ({type(e).__name__}: "
             f"{' '.join(str(e).split())[:120]}); remove it and rerun with --download")
    return ImageSet(labels, NUM_CLASSES[name], IMAGE_SIZE[name], images=images)


def load_dataset(name, data_dir, split, image_size=None, workers=0, download=False, seed=0):
    """Split 'train', 'test' or 'ssl' (the SSL training set) of a data set as an ImageSet of uint8 images
    of the data set's size. Missing data: one clear error (exit 2)."""
    if name == "synthetic":
        return synthetic_set("train" if split in ("train", "ssl") else "test", seed)
    size = image_size or IMAGE_SIZE.get(name) or fail("--dataset folder needs --image-size")
    hint = f"torchvision's {TORCHVISION[name]}/ (--download) or {FOLDER}" if name in TORCHVISION else FOLDER
    if name in TORCHVISION and download:
        os.makedirs(data_dir, exist_ok=True)
    if not os.path.isdir(data_dir):
        fail(f"data directory '{data_dir}' not found: expected {hint}")
    ds = _torchvision_set(name, data_dir, split, download) if name in TORCHVISION else None
    subs = {"test": ["val"] if name == "tinyimagenet" else ["test", "val"],  # Tiny ImageNet's test/ has no labels
            "ssl": ["unlabeled", "train"] if name == "stl10" else ["train"]}
    subs = subs.get(split, [split])
    root = next((os.path.join(data_dir, s) for s in subs if os.path.isdir(os.path.join(data_dir, s))), None)
    if ds is None and root is None:
        fail(f"data directory '{data_dir}' does not hold {name}: expected {hint}")
    return ds if ds is not None else _folder_set(root, size, in_memory=size <= 96, workers=workers)


def subset_indices(n, k, seed=0):
    """The first k of a fixed seeded permutation of range(n), in order (--subset, --train-fraction)."""
    return torch.arange(n) if k >= n else torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort()[0]


def steps_per_epoch(n, batch_size):
    return n // batch_size  # the last incomplete global batch is dropped


def epoch_batches(ds, batch_size, epoch, seed, rank=0, world=1, start=0, workers=0):
    """Yield (uint8 images, labels, indices) of this rank's slice of each global batch of an epoch, from
    batch `start` on. The order is a permutation seeded by (seed, epoch): the ranks together see the
    batches one process would. Image files are decoded in `workers` loader processes."""
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    local, steps = batch_size // world, steps_per_epoch(len(ds), batch_size)
    chunks = [perm[s * batch_size + rank * local: s * batch_size + (rank + 1) * local] for s in range(start, steps)]
    if ds.images is not None:
        yield from ((ds.images[idx], ds.labels[idx], idx) for idx in chunks)
        return
    decode = functools.partial(_decode_batch, ds.files, ds.size)
    for imgs, idx in torch.utils.data.DataLoader(chunks, batch_size=None, collate_fn=decode, num_workers=workers,
                                                 prefetch_factor=4 if workers else None,
                                                 pin_memory=torch.cuda.is_available()):
        yield imgs, ds.labels[idx], idx


def _decode_batch(files, size, idx):
    return load_files([files[j] for j in idx.tolist()], size), idx


# --- command line ---


class ArgParser(argparse.ArgumentParser):
    """argparse that takes no abbreviated flags (--epoch is not --epochs) and reports a bad command
    line as one 'error:' line, exit 2 (a UserError, under run_cli)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)

    def error(self, message):
        message = re.sub(r"^argument (--[\w-]+)(/[^:]*)?: ", r"\1 ", message)  # "--lr must be positive, ..."
        raise UserError(f"{message} (see {self.prog} --help)")


class Number:
    """argparse type of a numeric flag: an int or a finite float from lo to hi (ends open where asked);
    any other value is one error line naming the flag and the range."""

    def __init__(self, kind, lo, hi=None, open_lo=False, open_hi=False, says=None):
        self.kind, self.lo, self.hi, self.open_lo, self.open_hi = kind, lo, hi, open_lo, open_hi
        self.__name__ = kind.__name__
        self.says = says or ("positive" if open_lo or (kind is int and lo == 1) else "0 or more" if lo == 0 else "")

    def __call__(self, text):
        try:
            v = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"takes {'a whole number' if self.kind is int else 'a number'}, "
                                             f"not '{text}'") from None
        if not math.isfinite(v) or v < self.lo or (self.open_lo and v == self.lo):
            says = self.says if math.isfinite(v) else "a finite number"
            raise argparse.ArgumentTypeError(f"must be {says}, not {text}")
        if self.hi is not None and (v > self.hi or (self.open_hi and v == self.hi)):
            says = self.says if self.says.startswith("in ") else f"at most {self.hi}"
            raise argparse.ArgumentTypeError(f"must be {says}, not {text}")
        return v


ARCHS = ("resnet18", "resnet34", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
         "efficientnet_b0")
COUNT, COUNT0 = Number(int, 1, 10 ** 9), Number(int, 0, 10 ** 9)  # at least 1; at least 0 (0 = off or none)
SEED = Number(int, 0, 2 ** 31 - 1)
POSITIVE, NONNEG = Number(float, 0, open_lo=True), Number(float, 0)  # rates, temperatures; weights
PROB = Number(float, 0, 1, says="in [0, 1]")
# flags that change how a run is executed or reported, not what it computes: --resume may change them
RUNTIME_FLAGS = {"out", "resume", "max_steps", "log_every", "save_every", "eval_every", "workers", "data_dir",
                 "download", "amp", "channels_last", "compile", "no_sync_bn"}


def base_parser(description, **defaults):
    """The flags every method script shares; `defaults` gives the method's paper values, e.g.
    base_parser(__doc__, epochs=10, batch_size=100, lr=0.3). Flags are never abbreviated."""
    d = dict(dataset="cifar10", epochs=10, batch_size=256, lr=0.1, weight_decay=1e-4, arch="resnet18")
    d.update(defaults)
    p = ArgParser(description=description)
    a = p.add_argument
    a("--dataset", default=d["dataset"], choices=DATASETS, help="data set (layouts: README 'Data layouts')")
    a("--data-dir", default=None, help="data root (default ./data/<dataset>)")
    a("--image-size", type=COUNT, default=None, help="image side for --dataset folder")
    a("--download", action="store_true", help="let torchvision download CIFAR / STL-10 into --data-dir")
    a("--epochs", type=COUNT, default=d["epochs"], help=d.get("epochs_help", "training epochs"))
    a("--schedule-epochs", type=COUNT, default=None,
      help="length of the learning-rate schedule in epochs (default: --epochs); --epochs 1 --schedule-epochs 30 "
           "runs the first epoch of a 30-epoch cosine")
    a("--batch-size", type=COUNT, default=d["batch_size"],
      help=d.get("batch_help", "GLOBAL batch size (split over ranks)"))
    a("--lr", type=POSITIVE, default=d["lr"], help=d.get("lr_help", "base learning rate"))
    a("--weight-decay", type=NONNEG, default=d["weight_decay"], help=d.get("wd_help", "weight decay"))
    a("--arch", default=d["arch"], choices=ARCHS, help=d.get("arch_help", "backbone"))
    a("--out", default=None, help="run folder, one run each (default runs/<method>-<dataset>-<time>)")
    a("--resume", action="store_true",
      help="continue the run in --out from its checkpoint.pt (starts fresh when there is none yet)")
    a("--seed", type=SEED, default=0)
    a("--workers", type=COUNT0, default=4, help="data loading workers (file-based data sets)")
    a("--amp", default="bf16", choices=["bf16", "off"], help="bf16 autocast on CUDA, or off (the CPU runs float32)")
    a("--channels-last", action=argparse.BooleanOptionalAction, default=None,
      help="channels_last memory format (default: on with CUDA, where it is the faster layout; --no-channels-last)")
    a("--compile", action="store_true", help="torch.compile the backbone")
    a("--subset", type=COUNT, default=None, help="train on the first N images of a fixed seeded permutation")
    a("--max-steps", type=COUNT, default=None, help="stop after K optimizer steps (schedules still span the run)")
    a("--log-every", type=COUNT, default=20, help="progress line every K steps (and at the first and last)")
    a("--save-every", type=COUNT, default=1000, help="checkpoint every K steps (and at every epoch end)")
    a("--eval-every", type=COUNT0, default=0, help="quick k-NN probe every E epochs and at the end (0 = off)")
    a("--no-sync-bn", action="store_true", help="keep per-rank BatchNorm under DDP on CUDA")
    return p


def resolve_common(args, method):
    """Fill data-dependent defaults, check the shared flags and the run folder (--out). `method` is
    the method file's METHOD: it names the run folder and is saved in every checkpoint."""
    args.method = method
    args.data_dir = args.data_dir or os.path.join("data", args.dataset)
    if args.out is None:
        args.out = os.path.join("runs", f"{method}-{args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.channels_last is None:  # on by default where it helps: CUDA (README, "What the paper recipes cost")
        args.channels_last = torch.cuda.is_available()
    if args.batch_size % int(os.environ.get("WORLD_SIZE", "1")):  # each flag's range is its argparse type's
        fail(f"--batch-size {args.batch_size} does not split over {os.environ['WORLD_SIZE']} ranks")
    if args.schedule_epochs is not None and args.schedule_epochs < args.epochs:
        fail(f"--schedule-epochs {args.schedule_epochs} is shorter than --epochs {args.epochs}")
    out, parent = args.out, args.out  # a folder this process can write, holding no other run unless --resume
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent or "."):
        fail(f"cannot write to --out {out} ({'a file' if parent == out else parent + ' is a file'})")
    if not os.access(parent or ".", os.W_OK | os.X_OK):
        fail(f"cannot write to --out {out} (permission denied)")
    if os.path.exists(os.path.join(out, "checkpoint.pt")) and not args.resume:
        fail(f"{out} already holds a run (checkpoint.pt): pass --resume to continue it, or choose another --out")
    return args


def check_recipe(saved, args):
    """--resume goes on with the run's recipe: a recipe flag that differs from the checkpoint's is one line."""
    now = vars(args)
    changed = sorted(k for k in saved if k in now and k not in RUNTIME_FLAGS and saved[k] != now[k]
                     and not (isinstance(saved[k], (list, tuple)) and list(saved[k]) == list(now[k] or [])))
    if changed:
        was = ", ".join(f"--{k.replace('_', '-')} {saved[k]} (now {now[k]})" for k in changed)
        fail(f"--resume with other recipe flags than the run in {args.out}: {was}; use the run's flags or "
             f"another --out")


def check_patch(size, side):
    """A patch must fit the image."""
    if size > side:
        fail(f"--patch-size {size} is larger than the {side}px images")


def load_train_set(args, patch_size=None, subset=None):
    """The SSL training set, cut to --subset (and to the indices `subset` of it, e.g. --train-fraction);
    patch_size, where the method cuts patches, must fit its images."""
    ds = load_dataset(args.dataset, args.data_dir, "ssl", args.image_size, args.workers, args.download, args.seed)
    if args.subset:
        ds = ds.subset(subset_indices(len(ds), args.subset))
    if subset is not None:
        ds = ds.subset(subset(len(ds)))
    if patch_size:
        check_patch(patch_size, ds.size)
    if len(ds) < args.batch_size:
        fail(f"--batch-size {args.batch_size} is larger than the {len(ds)} training images")
    return ds


def autocast(args, device):
    """bf16 autocast on CUDA (--amp); a no-op context on the CPU."""
    if device.type != "cuda" or args.amp == "off":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast("cuda", dtype=torch.bfloat16)


# --- processes, checkpoints and the run ---


def init_distributed():
    """Set up torchrun's process group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU): (rank, world, device)."""
    world, rank, local = (int(os.environ.get(k, d)) for k, d in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(local)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        if attempt != "0" and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # a torchrun --max-restarts restart: the agent's store still holds the failed attempt's keys,
            # and a group built on them waits for peers that are gone (seen with gloo): a prefix per attempt
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False)
            dist.init_process_group(backend, store=dist.PrefixStore(f"attempt{attempt}", store), rank=rank,
                                    world_size=world)
        else:
            dist.init_process_group(backend)
    return rank, world, device


def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def wrap_ddp(model, device, sync_bn=True):
    """SyncBatchNorm (CUDA only) and DistributedDataParallel when running under torchrun."""
    if not dist.is_initialized():
        return model
    if sync_bn and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model):
    """The module under DDP and torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def make_generator(seed, rank, device):
    """The per-rank generator of patches and augmentations (seeded, saved in checkpoints)."""
    return torch.Generator(device=device).manual_seed(seed * 1000 + rank)


def rng_state(generator):
    """Every random state a resumed run draws from: torch's (CPU and CUDA) and the run's generator."""
    cuda = {"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {}
    return {"torch": torch.get_rng_state(), "gen": generator.get_state(), **cuda}


def set_rng_state(state, generator):
    torch.set_rng_state(state["torch"])
    generator.set_state(state["gen"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def atomic_save(obj, path):
    """torch.save to a temporary file, then os.replace: never a half-written file. A failed write (full
    disk, no permission) keeps the old file and is a user error; Ctrl-C leaves no temporary file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if not isinstance(e, (OSError, RuntimeError)):  # torch.save reports a full disk as RuntimeError
            raise
        kept = "; the previous file is kept" if os.path.exists(path) else ""
        fail(f"cannot write {path} ({getattr(e, 'strerror', None) or str(e).splitlines()[0][:120]}){kept}")


def load_checkpoint(path, method=None):
    """torch.load(weights_only=True); an unreadable or foreign file is a user error."""
    if not os.path.isfile(path):
        fail(f"checkpoint '{path}' not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"cannot read checkpoint '{path}' ({type(e).__name__}): not a torch checkpoint or not safe to load")
    if not isinstance(ckpt, dict) or not {"method", "backbone", "probe"} <= ckpt.keys():
        fail(f"checkpoint '{path}' was not written by an effssl method script")
    if method is not None and ckpt["method"] != method:
        fail(f"checkpoint '{path}' belongs to {ckpt['method']}, not {method}")
    return ckpt


def probe_info(arch, stem, out_size, mean, std, represent, patch_size=None, proj=None, proj_bias=True, views=None,
               aug=None):
    """What eval_linear.py needs to know of a run, saved in its checkpoint: backbone (arch, stem), input
    (side, normalisation), the representation probed by default (represent "bag": the mean embedding
    of patch_size patches; "image": the whole image), the projector (--feature head1), the method's
    own views (--mode views) and patch augmentation (--bag-augment)."""
    if represent not in ("bag", "image") or (represent == "bag") != bool(patch_size):
        raise ValueError(f"represent is 'bag' (with a patch_size) or 'image', not {represent!r} ({patch_size=})")
    bias = [bool(b) for b in proj_bias] if isinstance(proj_bias, (list, tuple)) else bool(proj_bias)
    return {"arch": arch, "stem": stem, "out_size": out_size, "mean": list(mean), "std": list(std),
            "represent": represent, "patch_size": patch_size, "proj": proj, "proj_bias": bias, "views": views,
            "aug": aug}


@torch.no_grad()
def probe_features(backbone, images, probe, patches=16):
    """A run's default representation (probe_info) of uint8 images: the mean embedding of `patches`
    patches at fixed positions (EMP-SSL Sec. 2), or the embedding of the whole image."""
    if probe["represent"] == "bag":
        boxes = fixed_patch_boxes(patches, probe["patch_size"], images.shape[-1])
        return bag_of_features(backbone, images, boxes, probe["out_size"], probe["mean"], probe["std"])
    return backbone(central_view(images, probe["out_size"], probe["mean"], probe["std"])).float()


@torch.no_grad()
def quick_knn(features_fn, train_set, test_set, device, n_train=5000, n_test=1000, batch=250):
    """The --eval-every probe: k-NN (k 20, T 0.07) top-1 on fixed subsets of 5,000 train / 1,000 test
    images; the torch RNG state is restored, so that it changes nothing of the training run."""
    state = torch.get_rng_state()
    tr = train_set.subset(subset_indices(len(train_set), n_train, seed=1))
    te = test_set.subset(subset_indices(len(test_set), n_test, seed=2))
    f = [torch.cat([features_fn(ds.get(torch.arange(s, min(s + batch, len(ds)))).to(device))
                    for s in range(0, len(ds), batch)]) for ds in (tr, te)]
    pred = knn_predict(f[0], tr.labels.to(device), f[1], train_set.num_classes)
    torch.set_rng_state(state)
    return (pred.cpu() == te.labels).float().mean().item() * 100


_HELD = {}  # the run folders' lock files this process holds, open for its life


def lock_run_folder(out):
    """One process trains in a run folder: rank 0 holds an flock on <out>/.lock for its life (the OS drops
    it when the process ends, killed or not); another process on the folder is one line naming the holder."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    import fcntl
    import socket
    os.makedirs(out, exist_ok=True)
    path = os.path.realpath(os.path.join(out, ".lock"))
    if path in _HELD:  # this process holds it already (main() called again in one process)
        return
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        fail(f"{out} is in use by another run ({f.read().strip() or 'a process'}): wait for it or choose another --out")
    f.truncate(0)
    f.write(f"host {socket.gethostname()}, pid {os.getpid()}\n")
    f.flush()
    _HELD[path] = f


def write_metrics(out, record):
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def start_metrics(args, steps):
    """A fresh run's args.json and empty metrics.jsonl; a resumed run's metrics.jsonl without the lines
    logged after its checkpoint at `steps` (a torn last line too), so that every step appears once."""
    os.makedirs(args.out, exist_ok=True)
    metrics, keep = os.path.join(args.out, "metrics.jsonl"), []
    if steps == 0:
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=1)
    elif os.path.exists(metrics):
        with open(metrics) as f:
            keep = [line for line in f if line.endswith("}\n") and json.loads(line).get("step", 0) <= steps]
    with open(metrics + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(metrics + ".tmp", metrics)


class Run:
    """One training run in its folder --out (README, "Forking a method"): checkpoints (every rank's RNG state,
    the method's `state`), resume, progress, the --eval-every probe, the non-finite and signal stops.
    `inputs`: the patches or views of a global step; the model's `.backbone` is what eval_linear.py probes."""

    active = None  # the run in progress, for run_cli's lines

    def __init__(self, args, model, optimizer, generator, train, probe, inputs, state=None):
        if not isinstance(getattr(model, "backbone", None), nn.Module):
            fail(f"{type(model).__name__} has no .backbone, the network eval_linear.py probes (README, 'Forking a "
                 f"method')")
        self.args, self.model, self.optimizer, self.gen, self.train = args, model, optimizer, generator, train
        self.probe, self.inputs, self.state = probe, inputs, state if state is not None else {}
        self.unit = "patches" if probe["represent"] == "bag" else "views"
        self.path, spe = os.path.join(args.out, "checkpoint.pt"), steps_per_epoch(len(train), args.batch_size)
        self.steps_per_epoch, self.total, self.horizon = spe, spe * args.epochs, spe * (args.schedule_epochs or args.epochs)
        self.last = min(self.total, args.max_steps or self.total)  # the step this run stops at
        self.steps, self.saved, self.epoch, self.signal, self.test = 0, None, 0, 0, None
        self.device = next(model.parameters()).device
        self.bad = torch.zeros((), dtype=torch.long, device=self.device)  # the first non-finite step, 0: none
        lock_run_folder(args.out)
        Run.active = self
        if args.resume and os.path.exists(self.path):
            self._resume()
        self.s0, self.n_line, self.t0 = self.steps, 0, time.time()
        self.t_line = self.t0
        if is_main():
            start_metrics(args, self.steps)
        if dist.is_initialized():  # the stop signal's vote goes over gloo: it needs nothing of the device
            self.host_group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        on_signal = lambda signum, frame: setattr(self, "signal", signum)  # noqa: E731  (step() saves and stops)
        self.handlers = {name: signal.signal(getattr(signal, name), on_signal) for name in ("SIGTERM", "SIGUSR1")
                         if threading.current_thread() is threading.main_thread()}

    def _resume(self):
        ckpt = load_checkpoint(self.path, self.args.method)
        check_recipe(ckpt["args"], self.args)
        if len(ckpt["rng"]) != world_size():
            fail(f"{self.path} was written by {len(ckpt['rng'])} ranks: resume it on {len(ckpt['rng'])}, not "
                 f"{world_size()} (each rank goes on with its own random state)")
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            fail(f"checkpoint '{self.path}' does not fit this model ({str(e).splitlines()[0][:100]})")
        self.state.update(ckpt["state"])
        self.steps = self.saved = ckpt["step"]
        set_rng_state(ckpt["rng"][dist.get_rank() if dist.is_initialized() else 0], self.gen)
        if is_main():
            print(f"resumed from {self.path} at step {self.steps}", flush=True)

    def batches(self):
        """This rank's (images, labels, indices) of each batch to the last step; checkpoint and probe each epoch."""
        a, rank = self.args, dist.get_rank() if dist.is_initialized() else 0
        for self.epoch in range(self.steps // self.steps_per_epoch, a.epochs):
            if self.steps >= self.last:  # a resumed run that already reached --max-steps
                break
            self.model.train()
            for batch in epoch_batches(self.train, a.batch_size, self.epoch, a.seed, rank, world_size(),
                                       self.steps - self.epoch * self.steps_per_epoch, a.workers):
                yield batch
                if self.steps >= self.last:
                    break
            self.save()
            if a.eval_every and ((self.epoch + 1) % a.eval_every == 0 or self.steps >= self.last):
                self._knn_probe()
        self._close()

    def step(self, terms, lr):
        """After each optimizer step: count, log, checkpoint, stop on a signal or a non-finite loss (exit 3)."""
        s, a, sig = self.steps + 1, self.args, self.signal
        self.bad = torch.where(torch.isfinite(terms["loss"].detach()).all() | (self.bad > 0), self.bad, s)
        if dist.is_initialized():
            flag = torch.tensor([sig])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.host_group)  # a peer gone: run_cli says so
            sig = int(flag)
        log = s % a.log_every == 0 or s == self.last or s == self.s0 + 1
        if log or sig or s % a.save_every == 0:
            self.stop_if_not_finite()
        self.steps, self.n_line = s, self.n_line + self.inputs
        if is_main() and log:
            now, terms = time.time(), {k: float(v) for k, v in terms.items()}
            rate, eta = self.n_line / max(now - self.t_line, 1e-9), (now - self.t0) / (s - self.s0) * (self.last - s)
            print(f"epoch {self.epoch} step {s}/{self.last} " + " ".join(f"{k} {v:.4f}" for k, v in terms.items())
                  + f" lr {lr:.4g} {self.unit}/s {rate:.0f} eta {eta / 60:.1f} min", flush=True)
            write_metrics(a.out, {"epoch": self.epoch, "step": s, **terms, "lr": lr, f"{self.unit}_per_s": rate,
                                  "elapsed_s": now - self.t0})
            self.t_line, self.n_line = now, 0
        if s % a.save_every == 0 or sig:
            self.save()
        if sig:
            if is_main():
                print(f"stopped by {signal.Signals(sig).name} at step {s}; checkpoint saved at step {s}: rerun with "
                      f"--resume", file=sys.stderr, flush=True)
            self._close(quiet=True)
            sys.exit(128 + sig)

    def stop_if_not_finite(self):
        """Exit 3 if a step's loss was not finite on any rank, naming the first; the last checkpoint stays."""
        bad = self.bad.clone()
        if dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():
            print(f"error: non-finite loss at step {bad.item()}; stopping, last good checkpoint kept in "
                  f"{self.args.out}", file=sys.stderr, flush=True)
            _close_group()
            sys.exit(3)

    def save(self):
        """checkpoint.pt, written atomically by rank 0 with every rank's RNG state; never after a non-finite loss."""
        self.stop_if_not_finite()
        states = [rng_state(self.gen)] * world_size()
        if world_size() > 1:
            dist.all_gather_object(states, rng_state(self.gen))
        if is_main():
            model = unwrap(self.model)
            atomic_save({"method": self.args.method, "args": vars(self.args), "step": self.steps,
                         "epoch": self.steps // self.steps_per_epoch, "backbone": model.backbone.state_dict(),
                         "model": model.state_dict(),
                         "optimizer": self.optimizer.state_dict(), "rng": states, "state": self.state,
                         "probe": self.probe}, self.path)
        self.saved = self.steps

    def _knn_probe(self):
        """--eval-every: quick_knn on the run's default representation, by rank 0, into metrics.jsonl."""
        if is_main():
            a, backbone = self.args, unwrap(self.model).backbone
            self.test = self.test or load_dataset(a.dataset, a.data_dir, "test", a.image_size, a.workers, seed=a.seed)
            self.model.eval()
            acc = quick_knn(lambda imgs: probe_features(backbone, imgs, self.probe), self.train, self.test, self.device)
            self.model.train()
            write_metrics(a.out, {"epoch": self.epoch + 1, "step": self.steps, "knn_top1": acc,
                                  "elapsed_s": time.time() - self.t0})
            print(f"epoch {self.epoch + 1} knn top-1 {acc:.2f}", flush=True)
        if dist.is_initialized():
            dist.barrier()

    def _close(self, quiet=False):
        """The closing line. Stopped by a signal (quiet), ignore more until exit: torchrun signals the ranks still closing."""
        for name, handler in self.handlers.items():
            signal.signal(getattr(signal, name), signal.SIG_IGN if quiet else handler)
        if is_main() and not quiet:
            left = f" of {self.total}" if self.steps < self.total else ""
            print(f"done: ran steps {self.s0 + 1}-{self.steps}{left} in {(time.time() - self.t0) / 60:.1f} min; "
                  f"checkpoint {self.path} (step {self.steps})", flush=True)
        Run.active = None
        _close_group()


def run_cli(main, training=True):
    """Call main(); a UserError becomes 'error: ...' on stderr and exit 2, as does a step that does not fit
    in memory; Ctrl-C is one line saying where the run stopped and exit 130."""
    try:
        main()
        return
    except UserError as e:
        code, msg = 2, f"error: {e}"
    except torch.cuda.OutOfMemoryError:
        run, code = Run.active, 2
        msg = "error: out of memory: use a smaller --batch-size" if run is None else (
            f"error: out of memory in step {run.steps + 1} ({run.inputs // world_size()} {run.unit} of "
            f"{run.probe['out_size']} px per rank): use a smaller --batch-size, fewer {run.unit} per image or a "
            f"smaller --out-size, more ranks{', --grad-checkpoint' * (getattr(run.args, 'grad_checkpoint', 1) is False)}"
            "; the last checkpoint is untouched")
    except RuntimeError:
        run = Run.active
        if run is None or not run.signal:
            raise
        code = 128 + run.signal  # a stop signal, and a collective failed: a peer is gone, nothing can be saved
        last = f"last checkpoint at step {run.saved}: rerun with --resume" if run.saved is not None else "no checkpoint yet"
        msg = f"stopped by {signal.Signals(run.signal).name} at step {run.steps}: another rank is gone, {last}"
        run._close(quiet=True)
    except KeyboardInterrupt:
        run, code = Run.active, 130
        msg = "interrupted" if not training else "interrupted before the first step" if run is None or (
            run.steps == 0 and run.saved is None) else f"interrupted at step {run.steps}, " + (
            f"last checkpoint at step {run.saved}: rerun with --resume" if run.saved is not None else "no checkpoint yet")
    print(msg, file=sys.stderr, flush=True)
    _close_group()
    sys.exit(code)


def _close_group():
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a peer already gone: nothing left to close
            pass
