"""Shared toolbox of the effssl method scripts: plain functions and small classes, no framework.

In the order a reader needs them: first what a method is made of (patches and augmentation, batched
on the training device; ResNet and projector; LARS and the cosine schedule; gathering over ranks;
bag of features and k-NN), then data sets and loaders, then the command line and the run (`Run`:
folder, resume, progress, checkpoints, probe). A method file and this file are a whole method.
"""
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

# ---------------------------------------------------------------------------------------------
# patches and augmentation (batched, every parameter drawn per sample, on the training device)
# ---------------------------------------------------------------------------------------------


def resized_crops(images, boxes, out_size):
    """Crop boxes [N,4] = (top, left, height, width) from images [N,C,H,W] and resize each to
    out_size x out_size, bilinear, exactly as F.interpolate(crop, align_corners=False) on every
    crop (no antialias). One batched gather: crops may differ in size."""
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
    # rows: [N, C, out, W]; now the columns
    rows = rows.permute(0, 1, 3, 2)  # [N, C, W, out]
    cols = rows[ar, ch, x0[:, None, :]] * (1 - fx)[:, None, :, None] + rows[ar, ch, x1[:, None, :]] * fx[:, None, :, None]
    return cols.permute(0, 1, 3, 2).contiguous()


def sample_patches(images, n, size, out_size, generator=None):
    """EMP-SSL's patches: n uniformly placed size x size crops of each image (overlap allowed),
    resized to out_size. Returns (patches [n*B,C,out,out] float in [0,1], boxes [n*B,4]),
    view-major: patches[i*B + b] is patch i of image b, so X_i = patches[i*B:(i+1)*B]."""
    b, _, h, w = images.shape
    if size > min(h, w):
        fail(f"patch size {size} is larger than the {h}x{w} images")
    dev = images.device
    top = torch.randint(0, h - size + 1, (n * b,), device=dev, generator=generator)
    left = torch.randint(0, w - size + 1, (n * b,), device=dev, generator=generator)
    s = torch.full_like(top, size)
    boxes = torch.stack([top, left, s, s], 1)
    # equal-size crops: gather their pixels, then one F.interpolate (no n-fold copy of the images)
    src = torch.arange(b, device=dev).repeat(n)[:, None, None, None]  # patch i*B + b is from image b
    r = torch.arange(size, device=dev)
    ch = torch.arange(images.shape[1], device=dev)[None, :, None, None]
    x = images[src, ch, (top[:, None] + r)[:, None, :, None], (left[:, None] + r)[:, None, None, :]].float().div_(255)
    if size != out_size:
        x = F.interpolate(x, size=(out_size, out_size), mode="bilinear", align_corners=False)
    return x, boxes


@functools.lru_cache(maxsize=None)
def _log_ratio(ratio):
    """log of the aspect-ratio range in float32, as torchvision's get_params takes it; once, on the host."""
    return tuple(torch.log(torch.tensor(ratio)).tolist())


def random_resized_boxes(n, h, w, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), generator=None, device="cpu"):
    """Boxes (top, left, height, width) as torchvision's RandomResizedCrop.get_params draws them,
    vectorised: 10 tries per sample, then the same central-crop fallback."""
    area = h * w
    tries = 10
    log_r = _log_ratio(tuple(ratio))
    a = torch.empty(n, tries, device=device).uniform_(scale[0], scale[1], generator=generator) * area
    r = torch.exp(torch.empty(n, tries, device=device).uniform_(log_r[0], log_r[1], generator=generator))
    cw = torch.sqrt(a * r).round().long()
    chh = torch.sqrt(a / r).round().long()
    ok = (cw > 0) & (chh > 0) & (cw <= w) & (chh <= h)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1, device=device))
    # fallback: central crop with the ratio clamped into range
    in_ratio = w / h
    if in_ratio < min(ratio):
        fw, fh = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        fh, fw = h, int(round(h * max(ratio)))
    else:
        fw, fh = w, h
    sel = first.clamp(min=0)[:, None]
    cw = torch.where(first >= 0, cw.gather(1, sel)[:, 0], torch.full_like(first, fw))
    chh = torch.where(first >= 0, chh.gather(1, sel)[:, 0], torch.full_like(first, fh))
    u = torch.rand(n, 2, device=device, generator=generator)
    top = torch.where(first >= 0, (u[:, 0] * (h - chh + 1)).floor().long(), (h - chh) // 2)
    left = torch.where(first >= 0, (u[:, 1] * (w - cw + 1)).floor().long(), (w - cw) // 2)
    return torch.stack([top, left, chh, cw], 1)


def sample_views(images, m, out_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), generator=None):
    """m random resized crops of each image (multi-view methods), view-major like sample_patches;
    float in [0,1]."""
    b, _, h, w = images.shape
    boxes = random_resized_boxes(m * b, h, w, scale, ratio, generator, images.device)
    return resized_crops(images.repeat(m, 1, 1, 1), boxes, out_size).div_(255), boxes


def grayscale(x):
    """ITU-R 601-2 luma as torchvision's rgb_to_grayscale, [N,1,H,W]."""
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _blend(a, b, f):
    return (f * a + (1 - f) * b).clamp(0, 1)


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
    # channel = v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6 with n = 5, 3, 1 for R, G, B:
    # the values of torchvision's six-sector table without building it (fewer kernels)
    h, s, v = x.unbind(1)
    h6, vs = h * 6.0, v * s
    out = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(h6 + n, 6.0)
        out.append(v - vs * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))
    return torch.stack(out, 1)


def adjust_brightness(x, f):
    return _blend(x, torch.zeros_like(x), f.view(-1, 1, 1, 1))


def adjust_contrast(x, f):
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(x, mean, f.view(-1, 1, 1, 1))


def adjust_saturation(x, f):
    return _blend(x, grayscale(x), f.view(-1, 1, 1, 1))


def adjust_hue(x, f):
    hsv = rgb_to_hsv(x)
    h = torch.remainder(hsv[:, 0] + f.view(-1, 1, 1), 1.0)
    return hsv_to_rgb(torch.stack((h, hsv[:, 1], hsv[:, 2]), 1))


def matched_sigma(sigma, kernel_size, iters=30):
    """The width s of a Gaussian sampled at the kernel's integer offsets (as torchvision's
    gaussian_blur samples it) whose discrete variance is sigma^2, as PIL's GaussianBlur(radius=
    sigma) has by construction. Sampling shrinks small blurs (sigma 0.5 gives std 0.46, 0.1 gives
    none); from sigma ~1 on, s = sigma to 0.3 %. Bisection per sample, sigma [N] -> s [N]."""
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
    """Per-sample Gaussian blur with reflect padding: torchvision's gaussian_blur with each
    sample's sigma replaced by matched_sigma, so that the blur's variance is sigma^2 as in PIL's
    GaussianBlur (the official VICReg / EMP-SSL pipelines)."""
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


def solarize(x, threshold=0.5):
    return torch.where(x >= threshold, 1.0 - x, x)


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)  # torchvision's fn_idx order


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
    """Odd Gaussian kernel covering +-ceil(3 sigma) px (99.7 % of the mass), 2 ceil(3 sigma) + 1
    taps, for the recipe's largest sigma (one size for every sample, known without looking at the
    draws); capped at the largest odd number <= the image side (reflect padding needs pad < side).
    A fixed ~10 % of the side (VICReg's 23 px at 224) gives 3 taps at 32 px, which blurs sigma 2
    like sigma 0.8."""
    k = 2 * math.ceil(3 * float(sigma)) + 1
    return max(1, min(k, size - 1 + size % 2))


def apply_augment(x, p, kernel_size, masked=None):
    """Apply drawn parameters to x [N,3,H,W] in [0,1]: flip, colour jitter in each sample's random
    order, grayscale, blur (kernel_size taps), solarize. masked (default: on CUDA): every op runs on
    the whole batch and each sample keeps its own result, so nothing waits for the device (no
    nonzero, no .item(), fixed shapes); else each op runs only on the samples that draw it (less
    arithmetic, the better choice on a CPU). Both give the same result."""
    masked = x.is_cuda if masked is None else masked
    x = torch.where(p["flip"].view(-1, 1, 1, 1), x.flip(-1), x)  # a new tensor: the ops below write into it
    factors = (p["brightness"], p["contrast"], p["saturation"], p["hue"])
    ops = [(p["jitter"] & (p["order"][:, k] == j), op, factors[j]) for k in range(4) for j, op in enumerate(JITTER_OPS)]
    ops += [(p["gray"], lambda y, _: grayscale(y).expand(-1, 3, -1, -1), None),
            (p["blur"], lambda y, s: gaussian_blur(y, s, kernel_size), p["sigma"]),
            (p["solarize"], lambda y, _: solarize(y), None)]
    for take, op, f in ops:
        if masked:
            x = torch.where(take.view(-1, 1, 1, 1), op(x, f), x)
        else:
            idx = take.nonzero().squeeze(1)
            if idx.numel():
                x.index_copy_(0, idx, op(x[idx], f[idx] if f is not None else None))
    return x


def normalize(x, mean, std):
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def augment(x, cfg, generator=None):
    """The whole per-sample augmentation then normalisation, on x's device, in x's dtype: an
    enclosing autocast (evaluation's --bag-augment) would run the blur convolution in bf16."""
    with torch.autocast(x.device.type, enabled=False):
        p = draw_aug_params(len(x), cfg, generator, x.device)
        return normalize(apply_augment(x, p, blur_kernel_size(cfg.blur_sigma[1], x.shape[-1])), cfg.mean, cfg.std)

# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------


ARCHS = ("resnet18", "resnet34", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
         "efficientnet_b0")


class PooledFeatures(nn.Module):
    """A torchvision MobileNet / EfficientNet without its classifier: features, then global average
    pooling. dim is the embedding size (1280, 576, 960, 1280)."""

    def __init__(self, net):
        super().__init__()
        self.features = net.features
        self.dim = net.features[-1].out_channels

    def forward(self, x):
        return self.features(x).mean((2, 3))


def backbone(arch="resnet18", stem="cifar"):
    """torchvision backbone without its classifier; backbone.dim is the embedding size.
    ResNets: the CIFAR stem (3x3 conv, stride 1, no max-pool) suits 32-64 px inputs.
    MobileNetV2, MobileNetV3 small / large, EfficientNet-b0 (the model-efficiency rows of Cao & Wu,
    2024, arXiv:2404.19289, Tables 1 and 3): the "cifar" stem takes the CIFAR adaptation of the lineage
    (kuangliu/pytorch-cifar's MobileNetV2 and EfficientNet): the stem conv and the first stride-2 block
    run at stride 1, so a 32 px image leaves the network as a 4 x 4 map, as with the CIFAR ResNet
    (downsampling 8 instead of 32); no block gains a shortcut it did not have. EfficientNet's stochastic
    depth (a regulariser of torchvision's supervised recipe) is off: every random draw of a run comes
    from its seeded generators, so a run resumes bit for bit."""
    if arch not in ARCHS:
        fail(f"unknown --arch {arch} ({', '.join(ARCHS)})")
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


def default_stem(dataset, image_size=None):
    """CIFAR stem up to 64 px images, ImageNet stem above."""
    size = image_size or IMAGE_SIZE.get(dataset, 224)
    return "cifar" if size <= 64 else "imagenet"


def projector(in_dim, spec, bias=True):
    """Linear-BN-ReLU blocks then a Linear, dims from a string like '4096-512'. bias: one bool
    for every Linear, or a pair (hidden, last): the Linears before a BatchNorm, the last Linear
    (a checkpoint's args["proj_bias"] may hold either, as a list after JSON)."""
    hidden_bias, last_bias = (bool(b) for b in bias) if isinstance(bias, (list, tuple)) else (bool(bias),) * 2
    dims = [in_dim] + [int(d) for d in spec.split("-")]
    layers = []
    for a, b in zip(dims[:-2], dims[1:-1]):
        layers += [nn.Linear(a, b, bias=hidden_bias), nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(dims[-2], dims[-1], bias=last_bias))
    return nn.Sequential(*layers)

# ---------------------------------------------------------------------------------------------
# optimiser and schedule
# ---------------------------------------------------------------------------------------------


class LARS(torch.optim.SGD):
    """LARS as the official EMP-SSL code applies it: a trust ratio on the gradient, then SGD
    with Nesterov momentum. For every parameter with ndim > 1:
        g <- (g + wd * w) * min(eta * |w| / (|g| + wd * |w| + 1e-8) / lr, 1)
    (skipped, weight decay included, when |w| or |g| is 0); ndim == 1 parameters (biases, norm
    weights) get neither weight decay nor the trust ratio."""

    def __init__(self, params, lr, weight_decay=0.0, momentum=0.9, eta=0.005, nesterov=True, eps=1e-8):
        super().__init__(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=0.0)
        for group in self.param_groups:
            group.setdefault("lars_weight_decay", weight_decay)
            group.setdefault("eta", eta)
            group.setdefault("eps", eps)

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

# ---------------------------------------------------------------------------------------------
# distributed (torchrun): global batches
# ---------------------------------------------------------------------------------------------


def init_distributed():
    """Set up torchrun's process group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU).
    Returns (rank, world_size, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
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


class GatherLayer(torch.autograd.Function):
    """all_gather that keeps gradients (as the official VICReg code): backward sums the
    gradients of every rank's copy of the loss, so that DDP's averaging of parameter gradients
    gives exactly the gradient of the global-batch loss."""

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


def wrap_ddp(model, device, sync_bn=True):
    """SyncBatchNorm (CUDA only) and DistributedDataParallel when running under torchrun."""
    if not dist.is_initialized():
        return model
    if sync_bn and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

# ---------------------------------------------------------------------------------------------
# bag of features, probes and k-NN (eval_linear.py and the --eval-every probe)
# ---------------------------------------------------------------------------------------------


def fixed_patch_boxes(n, size, image_size, seed=0):
    """n patch positions drawn once from a fixed seed: identical for every image and run."""
    g = torch.Generator().manual_seed(seed)
    top = torch.randint(0, image_size - size + 1, (n,), generator=g)
    left = torch.randint(0, image_size - size + 1, (n,), generator=g)
    return torch.stack([top, left, torch.full_like(top, size), torch.full_like(top, size)], 1)


@torch.no_grad()
def bag_of_features(backbone, images, boxes, out_size, mean, std, chunk=2048, aug=None, generator=None):
    """Bag-of-features (EMP-SSL Sec. 2): mean of the backbone embeddings of the patches at
    `boxes` of each uint8 image in `images` [B,3,H,W] (on the backbone's device). boxes [n,4]
    are the same n positions in every image; boxes [n,B,4] give each image its own."""
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
    """Weighted k-NN (NPID protocol): cosine similarity on L2-normalised features, vote
    weight exp(s/T). Returns predicted labels of test_f."""
    train_f, test_f = F.normalize(train_f.float(), dim=1), F.normalize(test_f.float(), dim=1)
    k = min(k, len(train_f))
    preds = []
    for s in range(0, len(test_f), chunk):
        sim, idx = (test_f[s:s + chunk] @ train_f.T).topk(k, dim=1)
        votes = torch.zeros(len(sim), num_classes, device=sim.device)
        votes.scatter_add_(1, train_y.to(sim.device)[idx], (sim / t).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds)

def central_view(images, out_size, mean, std, resize=True):
    """The whole uint8 image [B,3,H,W], resized to the network input (antialiased) when asked, normalised."""
    x = images.float().div(255)
    if resize and x.shape[-1] != out_size:
        x = F.interpolate(x, size=(out_size, out_size), mode="bilinear", align_corners=False, antialias=True)
    return normalize(x, mean, std)


def probe_info(arch, stem, out_size, mean, std, patch_size=None, proj=None, proj_bias=True, views=None, aug=None):
    """What eval_linear.py needs to know about a run, saved in its checkpoint: the backbone (arch,
    stem), the input (side, normalisation), the default representation (a bag of patch_size
    patches for a method that trains on patches, else the whole image), the projector (for
    --feature head1), the method's own views (for --mode views: crop scale, ratio, augmentation) and
    patch augmentation (for --bag-augment)."""
    bias = [bool(b) for b in proj_bias] if isinstance(proj_bias, (list, tuple)) else bool(proj_bias)
    return {"arch": arch, "stem": stem, "out_size": out_size, "mean": list(mean), "std": list(std),
            "mode": "bag" if patch_size else "central", "patch_size": patch_size, "proj": proj,
            "proj_bias": bias, "views": views, "aug": aug}


@torch.no_grad()
def probe_features(backbone, images, probe, patches=16):
    """A run's default representation (probe_info) of uint8 images: the mean embedding of
    `patches` patches at fixed positions (EMP-SSL Sec. 2), or of the whole image."""
    if probe["mode"] == "bag":
        boxes = fixed_patch_boxes(patches, probe["patch_size"], images.shape[-1])
        return bag_of_features(backbone, images, boxes, probe["out_size"], probe["mean"], probe["std"])
    return backbone(central_view(images, probe["out_size"], probe["mean"], probe["std"])).float()


@torch.no_grad()
def quick_knn(features_fn, train_set, test_set, device, n_train=5000, n_test=1000, batch=250):
    """--eval-every probe: k=20, T=0.07 on fixed subsets of 5,000 train / 1,000 test images.
    Uses no training randomness (the torch RNG state is restored)."""
    state = torch.get_rng_state()
    tr = train_set.subset(subset_indices(len(train_set), n_train, seed=1))
    te = test_set.subset(subset_indices(len(test_set), n_test, seed=2))

    def feats(ds):
        out = []
        for s in range(0, len(ds), batch):
            idx = torch.arange(s, min(s + batch, len(ds)))
            out.append(features_fn(ds.get(idx).to(device)))
        return torch.cat(out)

    pred = knn_predict(feats(tr), tr.labels.to(device), feats(te), train_set.num_classes)
    torch.set_rng_state(state)
    return (pred.cpu() == te.labels).float().mean().item() * 100

# ---------------------------------------------------------------------------------------------
# data sets and loaders
# ---------------------------------------------------------------------------------------------


STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "synthetic": ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
}
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
IMAGE_SIZE = {"cifar10": 32, "cifar100": 32, "stl10": 96, "tinyimagenet": 64, "in100": 224, "synthetic": 32}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "stl10": 10, "tinyimagenet": 200, "in100": 100, "synthetic": 10}
DATASETS = ("cifar10", "cifar100", "stl10", "tinyimagenet", "in100", "folder", "synthetic")
IMG_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")


class ImageSet:
    """A labelled image set: either uint8 `images` [N,3,S,S] held in memory, or image `files`
    decoded on the fly (large sets such as in100) by `load_files`."""

    def __init__(self, labels, num_classes, size, images=None, files=None):
        self.labels, self.num_classes, self.size = labels, num_classes, size
        self.images, self.files = images, files

    def __len__(self):
        return len(self.labels)

    def subset(self, idx):
        """The images at positions idx (a LongTensor) as a new ImageSet."""
        imgs = self.images[idx] if self.images is not None else None
        files = [self.files[i] for i in idx.tolist()] if self.files is not None else None
        return ImageSet(self.labels[idx], self.num_classes, self.size, imgs, files)

    def get(self, idx, workers=0):
        """uint8 images [len(idx),3,S,S] on the CPU."""
        if self.images is not None:
            return self.images[idx]
        return load_files([self.files[i] for i in idx.tolist()], self.size, workers)


def decode_image(path, size):
    """Decode one image file to uint8 [3,size,size]: resize the short side (size*8/7 for large
    images, i.e. 256 for 224, as the ImageNet protocol), then centre crop; size None keeps the
    full resolution. An unreadable file is reported once and replaced by a grey image."""
    import warnings
    from torchvision.io import ImageReadMode, decode_image, read_file
    try:
        with warnings.catch_warnings():  # deprecated in torchvision 0.29 for TorchCodec, still fine
            warnings.simplefilter("ignore", DeprecationWarning)
            img = decode_image(read_file(path), mode=ImageReadMode.RGB)
    except Exception:  # formats torchvision.io cannot read: fall back to PIL
        from PIL import Image
        try:
            with Image.open(path) as im:
                img = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
        except Exception as e:  # a truncated or corrupt file must not kill a days-long run
            _report_bad_file(path, e)
            return torch.full((3, size or 256, size or 256), 128, dtype=torch.uint8)
    if size is None:
        return img
    h, w = img.shape[-2:]
    if (h, w) != (size, size):
        short = size if size <= 96 else round(size * 8 / 7)
        img = torchvision.transforms.functional.resize(img, short, antialias=True)
        img = torchvision.transforms.functional.center_crop(img, size)
    return img


_BAD_FILES = set()  # per process (each DataLoader worker has its own): one warning per file


def _report_bad_file(path, err):
    """One stderr line per unreadable file and process; the run goes on with a grey image."""
    if path in _BAD_FILES:
        return
    _BAD_FILES.add(path)
    why = " ".join(f"{err.__class__.__name__}: {err}".split())[:200]  # one line, whatever the message
    print(f"warning: cannot decode {path} ({why}); using a grey image instead", file=sys.stderr, flush=True)


def load_files(files, size, workers=0):
    """Decode a list of image files to one uint8 tensor [N,3,size,size] (unreadable files grey)."""
    if workers > 0 and len(files) > 256:
        from concurrent.futures import ThreadPoolExecutor  # torchvision.io releases the GIL
        with ThreadPoolExecutor(workers) as pool:
            return torch.stack(list(pool.map(lambda f: decode_image(f, size), files, chunksize=64)))
    return torch.stack([decode_image(f, size) for f in files])


def _scan_folder(root):
    """ImageFolder layout: one sub-folder per class (sorted), images anywhere below it."""
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
    files, labels = [], []
    for c, name in enumerate(classes):
        for dirpath, _, names in sorted(os.walk(os.path.join(root, name), followlinks=True)):
            for n in sorted(names):
                if n.lower().endswith(IMG_EXT):
                    files.append(os.path.join(dirpath, n))
                    labels.append(c)
    return classes, files, labels


def _cache_path(root, size):
    cache = os.environ.get("EFFSSL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "effssl"))
    key = hashlib.sha1(f"{os.path.realpath(root)}:{size}".encode()).hexdigest()[:16]
    return os.path.join(cache, f"images-{key}.pt")


def _files_stamp(files):
    """A fingerprint of image files: each path, byte size and modification time (a file rewritten
    in place with new pixels changes its mtime). One stat per file: CIFAR-10's 50,000 training
    images in under a second on a busy 2-core machine."""
    lines = []
    for f in files:
        try:
            st = os.stat(f)
        except OSError as e:
            fail(f"cannot read {f} ({e.strerror})")
        lines.append(f"{f}\t{st.st_size}\t{st.st_mtime_ns}\n")
    return hashlib.sha1("".join(lines).encode()).hexdigest()


def _folder_set(root, size, in_memory, workers, scanned=None):
    """An ImageSet of the images under root (scanned: (classes, files, labels), else the ImageFolder
    scan). In memory (small images): decoded once into a cache file, reused while every file keeps
    its size and modification time; a changed file rebuilds it, said in one line."""
    classes, files, labels = scanned or _scan_folder(root)
    if not files:
        fail(f"no images found under {root} (expected one sub-folder per class holding image files)")
    labels = torch.tensor(labels)
    if not in_memory:
        return ImageSet(labels, len(classes), size, files=files)
    cache, stamp = _cache_path(root, size), _files_stamp(files)
    if os.path.exists(cache):  # decoded once, reused by later runs
        why = "is stale (an image file was added, removed or changed after it was written)"
        try:
            blob = torch.load(cache, weights_only=True)
        except Exception:  # torn or foreign: decoded again below
            blob, why = {}, "is unreadable"
        if isinstance(blob, dict) and blob.get("stamp") == stamp and torch.equal(blob["labels"], labels):
            return ImageSet(labels, len(classes), size, images=blob["images"])
        if is_main():
            print(f"the decoded cache {cache} of {root} {why}: decoding the images again", file=sys.stderr, flush=True)
    images = load_files(files, size, workers=max(workers, 2))
    try:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        atomic_save({"n": len(files), "labels": labels, "stamp": stamp, "images": images}, cache)
    except (OSError, UserError):
        pass  # a read-only or full cache only costs the decode next time
    return ImageSet(labels, len(classes), size, images=images)


def _tiny_imagenet_val(root, train_root):
    """Tiny ImageNet's own val layout: val/images/*.JPEG, labelled by val/val_annotations.txt
    (file, wnid, box per line); class ids as the train split numbers them (its sorted wnid folders,
    else the sorted wnids.txt beside them)."""
    if os.path.isdir(train_root):
        classes = sorted(d.name for d in os.scandir(train_root) if d.is_dir())
    else:
        with open(os.path.join(os.path.dirname(root), "wnids.txt")) as f:
            classes = sorted(line.strip() for line in f if line.strip())
    index = {c: i for i, c in enumerate(classes)}
    ann = os.path.join(root, "val_annotations.txt")
    files, labels = [], []
    with open(ann) as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2 or parts[1] not in index:
                fail(f"{ann} line {n}: expected '<file> <wnid> ...' with a wnid of the train split, "
                     f"not {line.strip()!r}")
            files.append(os.path.join(root, "images", parts[0]))
            labels.append(index[parts[1]])
    return classes, files, labels


def synthetic_set(split, seed=0, n=None):
    """Procedural 32x32 images whose class is carried by local texture (orientation and period
    of a grating, sign of the orientation random), under nuisance colour, contrast, position
    (phase) and noise. The colour is a smooth random field (4 x 4 random control colours,
    bicubic), so it differs between two patches of one image: patches co-occur within an image
    by texture, not by one shared colour, and an SSL objective cannot match two views by colour
    alone. A random network is dominated by the colour and is not already good at the task."""
    n = n or (10000 if split == "train" else 2000)
    g = torch.Generator().manual_seed(seed * 7919 + (0 if split == "train" else 1))
    labels = torch.arange(n) % 10
    labels = labels[torch.randperm(n, generator=g)]
    theta = (labels % 5).float() * (math.pi / 10) + math.pi / 20  # 5 orientations in (0, pi/2)
    theta = theta * (torch.randint(0, 2, (n,), generator=g) * 2 - 1)  # sign is a nuisance (flip)
    period = torch.where(labels < 5, 4.0, 9.0)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    phase = torch.rand(n, generator=g) * 2 * math.pi
    u = xx[None] * torch.cos(theta)[:, None, None] + yy[None] * torch.sin(theta)[:, None, None]
    tex = torch.sin(2 * math.pi * u / period[:, None, None] + phase[:, None, None])  # [n,32,32]
    amp = 0.15 + 0.2 * torch.rand(n, 1, 1, 1, generator=g)
    ctrl = 0.15 + 0.7 * torch.rand(n, 3, 4, 4, generator=g)  # nuisance colour field
    base = F.interpolate(ctrl, size=(32, 32), mode="bicubic", align_corners=True)
    img = base + amp * tex[:, None] + 0.05 * torch.randn(n, 3, 32, 32, generator=g)
    images = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    return ImageSet(labels, 10, 32, images=images)


# torchvision's layouts, read here without its md5 checks (a subset or a rebuilt copy has other sums):
# per data set, the folder and the files of each split; CIFAR: python pickles of the batches
TV_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}),
    "cifar100": ("cifar-100-python", {"train": ["train"], "test": ["test"]}),
    "stl10": ("stl10_binary", {"train": [("train_X.bin", "train_y.bin")], "test": [("test_X.bin", "test_y.bin")],
                               "ssl": [("unlabeled_X.bin", None), ("train_X.bin", "train_y.bin")]}),
}


_PICKLE_ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                   ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
                   ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}


def _load_array_pickle(f):
    """pickle.load that rebuilds numpy arrays, lists, dicts, numbers and strings and nothing else
    (as torchvision, latin1 for the Python 2 pickles): a CIFAR batch file cannot run code."""
    import pickle

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) not in _PICKLE_ALLOWED:
                raise pickle.UnpicklingError(f"{module}.{name} is not part of a CIFAR batch")
            return super().find_class(module, name)
    return Unpickler(f, encoding="latin1").load()


def _cifar_batches(files):
    """(uint8 images [N,3,32,32], labels [N]) of CIFAR python batch files, as torchvision's
    CIFAR10 / CIFAR100 read them (rows of 3 x 1024 bytes, R then G then B; 'labels', else
    'fine_labels'), without their md5 check."""
    data, labels = [], []
    for path in files:
        try:
            with open(path, "rb") as f:
                entry = _load_array_pickle(f)
            rows = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            lab = entry["labels"] if "labels" in entry else entry["fine_labels"]
        except Exception as e:  # torn, foreign or unsafe: one line, never a traceback
            fail(f"cannot read {path} ({e.__class__.__name__}: {' '.join(str(e).split())[:120]}): not a CIFAR "
                 f"batch of torchvision's layout; remove it and rerun with --download")
        if len(lab) != len(rows):
            fail(f"{path} holds {len(rows)} images but {len(lab)} labels")
        data.append(rows)
        labels.extend(int(v) for v in lab)
    return torch.from_numpy(np.concatenate(data)), torch.tensor(labels, dtype=torch.long)


def _stl10_binary(parts):
    """(uint8 images [N,3,96,96], labels [N]) of STL-10's binary files: each image 3 x 96 x 96 bytes
    stored column-major (as torchvision's STL10 transposes them), labels 1..10 as bytes, returned
    as 0..9; an images file without labels (unlabeled) gets -1. torchvision's md5 check is left out."""
    side = 96
    counts = []
    for x_path, y_path in parts:
        n, rest = divmod(os.path.getsize(x_path), 3 * side * side)
        if rest:
            fail(f"{x_path} is not a whole number of 3x{side}x{side} images ({os.path.getsize(x_path)} bytes)")
        counts.append(n)
    images = torch.empty(sum(counts), 3, side, side, dtype=torch.uint8)
    labels, start = [], 0
    for (x_path, y_path), n in zip(parts, counts):
        x = np.memmap(x_path, dtype=np.uint8, mode="c", shape=(n, 3, side, side))  # no second 2.7 GB copy
        images[start:start + n] = torch.from_numpy(x).transpose(2, 3)
        del x
        if y_path is None:
            labels.append(torch.full((n,), -1, dtype=torch.long))
        else:
            y = torch.from_numpy(np.fromfile(y_path, dtype=np.uint8).astype(np.int64)) - 1
            if len(y) != n or (n and (y.min() < 0 or y.max() > 9)):
                fail(f"{y_path} does not hold {n} labels from 1 to 10 (it holds {len(y)} bytes)")
            labels.append(y)
        start += n
    return images, torch.cat(labels)


def _torchvision_set(name, root, split):
    """CIFAR / STL-10 in torchvision's own layout under root (TV_LAYOUT: what --download gives), or
    None when one of the split's files is not there. Read here, with the arrays torchvision's
    classes give, but without their md5 checks."""
    if name not in TV_LAYOUT:
        return None
    folder, splits = TV_LAYOUT[name]
    split = split if split in splits else "train"  # CIFAR's SSL set is its train split
    base = os.path.join(root, folder)
    files = [[os.path.join(base, f) if f else None for f in (p if isinstance(p, tuple) else (p,))]
             for p in splits[split]]
    if not all(os.path.isfile(f) for part in files for f in part if f):
        return None
    if name == "stl10":
        images, labels = _stl10_binary(files)
    else:
        images, labels = _cifar_batches([part[0] for part in files])
    return ImageSet(labels, NUM_CLASSES[name], IMAGE_SIZE[name], images=images)


def load_dataset(name, data_dir, split, image_size=None, workers=0, download=False, seed=0):
    """Load split ('train', 'test' or 'ssl' = the SSL training set) of a data set as an ImageSet
    of uint8 images of the data set's fixed size. Missing data: one clear error (exit 2)."""
    if name not in DATASETS:
        fail(f"unknown data set '{name}' (choose from {', '.join(DATASETS)})")
    if name == "synthetic":
        return synthetic_set("train" if split in ("train", "ssl") else "test", seed)
    size = image_size or IMAGE_SIZE.get(name)
    if size is None:
        fail("--dataset folder needs --image-size")
    if split == "ssl":
        split = "train" if name != "stl10" else "ssl"
    if download and data_dir and name in ("cifar10", "cifar100", "stl10"):
        os.makedirs(data_dir, exist_ok=True)  # torchvision downloads into it
    if not data_dir or not os.path.isdir(data_dir):
        hint = " or pass --download" if name in ("cifar10", "cifar100", "stl10") else ""
        fail(f"data directory '{data_dir}' not found: expected {layout_hint(name)}{hint}")
    if name in ("cifar10", "cifar100", "stl10"):
        ds = _torchvision_set(name, data_dir, split)
        if ds is None and download:
            tv = torchvision.datasets
            try:
                if name == "stl10":
                    tv.STL10(data_dir, split="train", download=True)
                else:
                    (tv.CIFAR10 if name == "cifar10" else tv.CIFAR100)(data_dir, download=True)
            except Exception as e:
                fail(f"could not download {name} into {data_dir}: {e.__class__.__name__}")
            ds = _torchvision_set(name, data_dir, split)
        if ds is not None:
            return ds
    sub = {"train": ["train"], "ssl": ["unlabeled", "train"], "test": ["test", "val"]}[split]
    if name == "tinyimagenet":  # the unpacked archive's folder, or its parent; test/ is unlabelled: val
        if os.path.isdir(os.path.join(data_dir, "tiny-imagenet-200")):
            data_dir = os.path.join(data_dir, "tiny-imagenet-200")
        sub = ["val"] if split == "test" else sub
    for s in sub:
        root = os.path.join(data_dir, s)
        if os.path.isdir(root):
            scanned = None
            if name == "tinyimagenet" and os.path.isfile(os.path.join(root, "val_annotations.txt")):
                scanned = _tiny_imagenet_val(root, os.path.join(data_dir, "train"))  # the archive's val layout
            return _folder_set(root, size, in_memory=size <= 96, workers=workers, scanned=scanned)
    fail(f"data directory '{data_dir}' does not hold {name}: expected {layout_hint(name)}")


def layout_hint(name):
    """The layout load_dataset expects for a data set, for error messages."""
    tv = {"cifar10": "cifar-10-batches-py/", "cifar100": "cifar-100-python/", "stl10": "stl10_binary/"}
    folder = "train/<class>/*.jpg and test/<class>/*.jpg (or val/)"
    if name in tv:
        return f"torchvision's {tv[name]} or an ImageFolder tree {folder}"
    if name == "tinyimagenet":
        return ("the unpacked tiny-imagenet-200/ (train/<wnid>/images/*.JPEG, val/images/ with "
                "val/val_annotations.txt) or an ImageFolder tree train/<wnid>/*, val/<wnid>/*")
    return f"an ImageFolder tree {folder}"


def data_stats(name):
    """(mean, std) per channel for normalisation."""
    return STATS.get(name, IMAGENET_STATS)


def subset_indices(n, k, seed=0):
    """The first k of a fixed seeded permutation of range(n) (--subset, --train-fraction)."""
    if k >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values


def steps_per_epoch(n, batch_size):
    """Optimizer steps per epoch (the last incomplete global batch is dropped)."""
    return n // batch_size


def epoch_batches(ds, batch_size, epoch, seed, rank=0, world=1, start=0, workers=0, views=None):
    """Yield (uint8 images, labels, indices) of this rank's slice of each global batch.

    The order is a permutation seeded by (seed, epoch), the same on every rank; rank r takes the
    r-th slice of every global batch, so the ranks together see exactly the batches a single
    process would. `start` skips the first batches (resume mid-epoch). `views(files, generator)`
    (file data sets only, a picklable function) replaces the decode in the workers, e.g. crops of
    the full-resolution images; its generator is seeded by (seed, epoch, step, rank), so the crops
    depend neither on the number of workers nor on a resume."""
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    perm = torch.randperm(len(ds), generator=g)
    local = batch_size // world
    steps = steps_per_epoch(len(ds), batch_size)
    chunks = [perm[s * batch_size + rank * local: s * batch_size + (rank + 1) * local] for s in range(start, steps)]
    if ds.images is not None:
        for idx in chunks:
            yield ds.images[idx], ds.labels[idx], idx
        return
    seeds = [(seed, epoch, s, rank) for s in range(start, steps)]
    # a views batch is n times larger (200 x 224 px patches of 25 images: 750 MB): prefetch less
    prefetch = (2 if views is not None else 4) if workers else None
    loader = torch.utils.data.DataLoader(_FileBatches(ds, chunks, views, seeds), batch_size=None, num_workers=workers,
                                         pin_memory=torch.cuda.is_available(), prefetch_factor=prefetch,
                                         persistent_workers=False)
    for (imgs, idx) in loader:
        yield imgs, ds.labels[idx], idx


class _FileBatches(torch.utils.data.Dataset):
    """Decode one precomputed batch of files per item (DataLoader workers do the decoding)."""

    def __init__(self, ds, chunks, views=None, seeds=None):
        self.ds, self.chunks, self.views, self.seeds = ds, chunks, views, seeds

    def __len__(self):
        return len(self.chunks)

    def __getitem__(self, i):
        files = [self.ds.files[j] for j in self.chunks[i].tolist()]
        if self.views is None:
            return load_files(files, self.ds.size), self.chunks[i]
        g = torch.Generator().manual_seed(int(np.random.SeedSequence(self.seeds[i]).generate_state(1)[0]))
        return self.views(files, g), self.chunks[i]

# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


class UserError(Exception):
    """A mistake in the command line or the inputs: reported as one line on stderr, exit 2."""


def fail(msg):
    """Stop with one clear line on stderr and exit code 2 (a user mistake, never a traceback)."""
    raise UserError(msg)


class ArgParser(argparse.ArgumentParser):
    """argparse that takes no abbreviated flags (--epoch is not --epochs) and reports a bad
    command line as one 'error:' line, exit code 2 (a UserError, under run_cli)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        message = re.sub(r"^argument (--[\w-]+)(/[^:]*)?: ", r"\1 ", message)  # "--lr must be positive, ..."
        raise UserError(f"{message} (see {self.prog} --help)")


class Number:
    """argparse type of a numeric flag: an int, or a finite float, from lo to hi (open ends where
    asked); any other value is one error line naming the flag and the range."""

    def __init__(self, kind, lo, hi=None, open_lo=False, open_hi=False, says=None):
        self.kind, self.lo, self.hi, self.open_lo, self.open_hi = kind, lo, hi, open_lo, open_hi
        self.says = says or ("positive" if open_lo or (kind is int and lo == 1) else "0 or more" if lo == 0 else "")
        self.__name__ = kind.__name__

    def __call__(self, text):
        try:
            v = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"takes {'a whole number' if self.kind is int else 'a number'}, "
                                             f"not '{text}'") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be a finite number, not {text}")
        if v < self.lo or (self.open_lo and v == self.lo):
            raise argparse.ArgumentTypeError(f"must be {self.says}, not {text}")
        if self.hi is not None and (v > self.hi or (self.open_hi and v == self.hi)):
            says = self.says if self.says.startswith("in ") else f"at most {self.hi}"
            raise argparse.ArgumentTypeError(f"must be {says}, not {text}")
        return v


MAX_COUNT = 10 ** 9  # no count of steps, images, patches or pixels comes near it
COUNT, COUNT0 = Number(int, 1, MAX_COUNT), Number(int, 0, MAX_COUNT)  # at least 1; at least 0 (0 = off or none)
SEED = Number(int, 0, 2 ** 31 - 1)
POSITIVE, NONNEG = Number(float, 0, open_lo=True), Number(float, 0)  # rates, temperatures; weights
PROB = Number(float, 0, 1, says="in [0, 1]")


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
    a("--amp", default="bf16", choices=["bf16", "fp16", "off"],
      help="autocast on CUDA (the CPU runs float32); fp16 is refused: it needs a gradient scaler, which these scripts lack")
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


# flags that change how a run is executed or reported, not what it computes: --resume may change them
RUNTIME_FLAGS = {"out", "resume", "max_steps", "log_every", "save_every", "eval_every", "workers", "data_dir",
                 "download", "amp", "channels_last", "compile", "no_sync_bn"}


def resolve_common(args, method):
    """Fill data-dependent defaults, check the shared flags and the run folder (--out)."""
    args.method = method
    args.data_dir = args.data_dir or os.path.join("data", args.dataset)
    if args.out is None:
        args.out = os.path.join("runs", f"{method}-{args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.amp == "fp16":
        fail("--amp fp16 needs a gradient scaler, which these scripts do not have (its losses underflow "
             "silently): use --amp bf16 (the default) or --amp off")
    if args.channels_last is None:  # on by default where it helps: CUDA (README, "What the paper recipes cost")
        args.channels_last = torch.cuda.is_available()
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    if args.batch_size % ws:  # each flag's own range is its argparse type's (Number)
        fail(f"--batch-size {args.batch_size} does not split over {ws} ranks")
    if args.schedule_epochs is not None and args.schedule_epochs < args.epochs:
        fail(f"--schedule-epochs {args.schedule_epochs} is shorter than --epochs {args.epochs}")
    check_run_folder(args)
    return args


def check_run_folder(args):
    """--out must be a folder this process can write, holding no other run unless --resume."""
    out = args.out
    if os.path.exists(out) and not os.path.isdir(out):
        fail(f"--out {out} is a file, not a folder")
    if os.path.exists(os.path.join(out, "checkpoint.pt")) and not args.resume:
        fail(f"{out} already holds a run (checkpoint.pt): pass --resume to continue it, or choose another --out")
    if not is_main() or int(os.environ.get("RANK", "0")) != 0:
        return
    made = not os.path.exists(out)
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".write-test{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
        if made:  # the run makes it when it starts: a later user error leaves nothing behind
            os.rmdir(out)
    except OSError as e:
        fail(f"cannot write to --out {out} ({e.strerror})")


def recipe_changes(saved, args):
    """Recipe flags whose value differs between a checkpoint's args and this command line."""
    now = vars(args)
    return sorted(k for k in saved if k in now and k not in RUNTIME_FLAGS and saved[k] != now[k]
                  and not (isinstance(saved[k], (list, tuple)) and list(saved[k]) == list(now[k] or [])))


def load_train_set(args):
    """The SSL training set, cut to --subset when given."""
    ds = load_dataset(args.dataset, args.data_dir, "ssl", args.image_size, args.workers, args.download, args.seed)
    if args.subset:
        ds = ds.subset(subset_indices(len(ds), args.subset))
    if steps_per_epoch(len(ds), args.batch_size) == 0:
        fail(f"--batch-size {args.batch_size} is larger than the {len(ds)} training images")
    return ds


def autocast(args, device):
    """bf16 autocast on CUDA (--amp); a no-op context on the CPU."""
    if device.type != "cuda" or args.amp == "off":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast("cuda", dtype=torch.bfloat16 if args.amp == "bf16" else torch.float16)

# ---------------------------------------------------------------------------------------------
# checkpoints and the run
# ---------------------------------------------------------------------------------------------


def atomic_save(obj, path):
    """torch.save to a temporary file, then os.replace: never a half-written file. A failed
    write (full disk, no permission) or Ctrl-C removes the temporary file, keeps the old one and,
    for a failed write, is a user error."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
        _remove(tmp)
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0][:120]
        kept = "; the previous file is kept" if os.path.exists(path) else ""
        fail(f"cannot write {path} ({reason}){kept}")
    except BaseException:
        _remove(tmp)
        raise


def _remove(path):
    try:
        os.remove(path)
    except OSError:
        pass


def load_checkpoint(path, method=None):
    """torch.load(weights_only=True); an unreadable or foreign file is a user error."""
    if not os.path.isfile(path):
        fail(f"checkpoint '{path}' not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"cannot read checkpoint '{path}' ({e.__class__.__name__}): not a torch checkpoint or not safe to load")
    if not isinstance(ckpt, dict) or "method" not in ckpt or "backbone" not in ckpt:
        fail(f"checkpoint '{path}' was not written by an effssl method script")
    if method is not None and ckpt["method"] != method:
        fail(f"checkpoint '{path}' belongs to {ckpt['method']}, not {method}")
    return ckpt


def rng_state(generator):
    """Every random state a resumed run needs to continue exactly."""
    state = {"torch": torch.get_rng_state(), "gen": generator.get_state(), "numpy": _np_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state, generator):
    torch.set_rng_state(state["torch"])
    generator.set_state(state["gen"])
    np.random.set_state(("MT19937", state["numpy"][0].numpy(), int(state["numpy"][1]), 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _np_state():
    s = np.random.get_state()
    return [torch.from_numpy(s[1].astype(np.int64)), torch.tensor(s[2])]


def make_generator(seed, rank, device):
    """The per-rank generator for patches and augmentations (seeded, saved in checkpoints)."""
    g = torch.Generator(device=device)
    g.manual_seed(seed * 1000 + rank)
    return g


def unwrap(model):
    """The module under DDP and torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


# saved activations of one 32 px patch through ResNet-18 (CIFAR stem), float32, forward + backward
PATCH_BYTES = 4.6e6
STOP_SIGNALS = ("SIGTERM", "SIGUSR1")  # preemption (SLURM, its --signal), torchrun stopping the survivors


def step_memory(patches, out_size, stem):
    """Bytes a training step of `patches` patches holds, by estimate: PATCH_BYTES a 32 px patch, scaled
    by the input area (the ImageNet stem divides the side by 4 first); the larger ResNets need more."""
    side = out_size / 4 if stem == "imagenet" else out_size
    return patches * PATCH_BYTES * (side / 32) ** 2


def host_memory():
    """Bytes of memory this machine can give a new process (MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            return int(next(line for line in f if line.startswith("MemAvailable")).split()[1]) * 1024
    except (OSError, StopIteration, ValueError):
        return None


class Run:
    """One training run in its folder --out, around a method's loop:

        run = common.Run(args, model, optimizer, gen, train, probe, patches=n * B, state=state)
        for imgs, labels, idx in run.batches():   # every epoch from the resume point to the last step
            ... loss.backward(); optimizer.step()
            run.step(terms, lr)                   # terms["loss"] is checked, logged, checkpointed

    It owns the run folder (args.json, metrics.jsonl, checkpoint.pt written atomically by rank 0),
    --resume (model, optimiser, every rank's RNG state, method `state` such as a memory bank or an
    EMA target), the progress line (loss terms, lr, patches/s, ETA), --save-every and epoch-end
    checkpoints, the --eval-every k-NN probe on `probe`'s features, a non-finite loss (exit 3,
    the last good checkpoint kept), SIGTERM / SIGUSR1 (the step in progress ends, a checkpoint is
    saved at it, exit 128 + the signal's number: 143 / 138), a step that does not fit in memory
    (one line, exit 2) and the closing line. `probe` (probe_info) is saved in the
    checkpoint: it is what eval_linear.py needs to know about the run."""

    active = None  # the run in progress, for run_cli's Ctrl-C line

    def __init__(self, args, model, optimizer, generator, train, probe, patches, state=None):
        self.args, self.model, self.optimizer, self.gen, self.train = args, model, optimizer, generator, train
        self.probe, self.patches, self.state = probe, patches, state if state is not None else {}
        self.path = os.path.join(args.out, "checkpoint.pt")
        self.steps_per_epoch = steps_per_epoch(len(train), args.batch_size)
        self.total = self.steps_per_epoch * args.epochs
        self.horizon = self.steps_per_epoch * (args.schedule_epochs or args.epochs)  # the lr schedule's length
        self.last = min(self.total, args.max_steps or self.total)  # the step this run stops at
        self.steps, self.saved, self.epoch, self.signal, self.test = 0, None, 0, 0, None
        self.device = next(model.parameters()).device
        self.bad = torch.zeros((), dtype=torch.long, device=self.device)  # the first non-finite step, 0: none
        need, have = self.step_bytes(), host_memory()
        if self.device.type == "cpu" and have and need > have:
            fail(f"a step of {patches // world_size()} patches of {probe['out_size']} px needs about "
                 f"{need / 2**30:.1f} GiB by estimate, this machine has {have / 2**30:.1f} GiB available: "
                 f"use fewer --patches, a smaller --batch-size or --out-size, or a GPU")
        Run.active = self
        if args.resume and os.path.exists(self.path):
            self._resume()
        self.s0, self.t0 = self.steps, time.time()
        self.t_line, self.n_line = self.t0, 0
        if is_main():
            self._open_metrics()
        self.host_group = None  # the stop signal's vote: over gloo, so that it needs nothing of the device
        if dist.is_initialized():
            self.host_group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        self._handlers = {}
        if threading.current_thread() is threading.main_thread():
            for name in STOP_SIGNALS:
                if hasattr(signal, name):
                    self._handlers[name] = signal.signal(getattr(signal, name), self._on_signal)

    def _on_signal(self, signum, frame):
        self.signal = signum  # the step in progress ends; step() saves at it and stops

    def step_bytes(self):
        """Bytes one step of this rank holds, by estimate (step_memory)."""
        return step_memory(self.patches / world_size(), self.probe["out_size"], self.probe["stem"])

    def _resume(self):
        ckpt = load_checkpoint(self.path, self.args.method)
        changed = recipe_changes(ckpt.get("args", {}), self.args)
        if changed:
            was = ", ".join(f"--{k.replace('_', '-')} {ckpt['args'][k]} (now {getattr(self.args, k)})" for k in changed)
            fail(f"--resume with other recipe flags than the run in {self.args.out}: {was}; "
                 f"use the run's flags or another --out")
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            fail(f"checkpoint '{self.path}' does not fit this model ({str(e).splitlines()[0][:100]})")
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.state.update(ckpt.get("state", {}))
        self.steps = self.saved = ckpt["step"]
        if len(ckpt["rng"]) == world:
            set_rng_state(ckpt["rng"][rank], self.gen)
        else:  # another number of ranks: no rank's random state to take over; fresh ones, said
            torch.manual_seed(self.args.seed * 1000003 + self.steps * 1009 + rank)
            self.gen.manual_seed(self.args.seed * 1000 + rank + 7919 * (self.steps + 1))
            if is_main():
                print(f"the checkpoint was written by {len(ckpt['rng'])} ranks, this run has {world}: the random "
                      f"state of every rank is seeded afresh from --seed, the step and the rank (the run goes on, "
                      f"but does not repeat the draws of the same run resumed on {len(ckpt['rng'])} ranks)", flush=True)
        self.saved_args = ckpt.get("args", {})
        if is_main():
            print(f"resumed from {self.path} at step {self.steps}", flush=True)

    def _open_metrics(self):
        """A fresh run: this folder's args.json and an empty metrics.jsonl; a resumed one: drop
        what was logged after the checkpoint, so that every step appears once."""
        os.makedirs(self.args.out, exist_ok=True)
        metrics = os.path.join(self.args.out, "metrics.jsonl")
        if self.steps == 0:
            with open(os.path.join(self.args.out, "args.json"), "w") as f:
                json.dump(vars(self.args), f, indent=1)
            _remove(metrics)
        else:
            try:
                with open(os.path.join(self.args.out, "args.json")) as f:
                    json.load(f)
            except (OSError, ValueError):  # lost or torn: the checkpoint holds the run's recipe
                with open(os.path.join(self.args.out, "args.json"), "w") as f:
                    json.dump(self.saved_args, f, indent=1)
                print(f"{self.args.out}/args.json was missing or unreadable: rewritten from the checkpoint's recipe",
                      flush=True)
        if self.steps and os.path.exists(metrics):
            with open(metrics) as f:
                keep = [line for line in f if _logged_step(line) <= self.steps]
            with open(metrics + ".tmp", "w") as f:
                f.writelines(keep)
            os.replace(metrics + ".tmp", metrics)

    def batches(self, views=None):
        """(uint8 images, labels, indices) of this rank's slice of every global batch, epoch after
        epoch from the resume point, until the last step; a checkpoint and the --eval-every probe at
        each epoch end; the closing line at the end (epoch_batches: `views`)."""
        a, spe = self.args, self.steps_per_epoch
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        for self.epoch in range(self.steps // spe, a.epochs):
            if self.steps >= self.last:  # a resumed run that already reached --max-steps
                break
            self.model.train()
            for batch in epoch_batches(self.train, a.batch_size, self.epoch, a.seed, rank, world,
                                       self.steps - self.epoch * spe, a.workers, views):
                yield batch
                if self.steps >= self.last:
                    break
            self.save()
            if a.eval_every and ((self.epoch + 1) % a.eval_every == 0 or self.steps >= self.last):
                self._knn_probe()
        self._close()

    def step(self, terms, lr):
        """After each optimizer step: count, log, checkpoint; stop after it on SIGTERM / SIGUSR1, and
        on a non-finite loss before any later checkpoint or log line. Nothing here waits for the
        device but a log line or a checkpoint: the first non-finite step is kept on the device, and
        the ranks agree on a stop signal over the host (gloo)."""
        s = self.steps + 1
        finite = torch.isfinite(terms["loss"].detach()).all()
        self.bad = torch.where(finite | (self.bad > 0), self.bad, s)
        sig = self.signal
        if dist.is_initialized():
            flag = torch.tensor([sig])
            try:
                dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.host_group)
            except RuntimeError:
                if self.signal:  # torchrun stops the survivors of a lost worker: no group left to save with
                    self.stopped_without_peer()
                raise
            sig = int(flag)
        a = self.args
        log = s % a.log_every == 0 or s == self.last or s == self.s0 + 1
        if log or sig or s % a.save_every == 0:
            self.stop_if_not_finite()
        self.steps = s
        self.n_line += self.patches
        if is_main() and log:
            now = time.time()
            rate = self.n_line / max(now - self.t_line, 1e-9)
            eta = (now - self.t0) / max(s - self.s0, 1) * (self.last - s)
            terms = {k: float(v) for k, v in terms.items()}
            body = " ".join(f"{k} {v:.4f}" for k, v in terms.items())
            print(f"epoch {self.epoch} step {s}/{self.last} {body} lr {lr:.4g} patches/s {rate:.0f} "
                  f"eta {eta / 60:.1f} min", flush=True)
            self.write({"epoch": self.epoch, "step": s, **terms, "lr": lr, "patches_per_s": rate,
                        "elapsed_s": now - self.t0})
            self.t_line, self.n_line = now, 0
        if s % a.save_every == 0 or sig:
            self.save()
        if sig:
            name = signal.Signals(sig).name
            if is_main():
                print(f"stopped by {name} at step {s}; checkpoint saved at step {s}: rerun with --resume",
                      file=sys.stderr, flush=True)
            self._close(quiet=True)
            sys.exit(128 + sig)
        if os.environ.get("EFFSSL_CRASH_AT_STEP") == str(s):  # test hook: die as a killed worker would
            os._exit(137)

    def stop_if_not_finite(self):
        """Exit 3 if a step's loss was not finite (on any rank), naming the first such step; the last
        checkpoint, written before it, stays."""
        bad = self.bad.clone()
        if dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():
            print(f"error: non-finite loss at step {bad.item()}; stopping, last good checkpoint kept in "
                  f"{self.args.out}", file=sys.stderr, flush=True)
            _close_group()
            sys.exit(3)

    def stopped_without_peer(self):
        """A stop signal while a peer is gone (a collective failed): no checkpoint can be written."""
        name = signal.Signals(self.signal).name
        last = f"last checkpoint at step {self.saved}: rerun with --resume" if self.saved is not None \
            else "no checkpoint yet"
        print(f"stopped by {name} at step {self.steps}: another rank is gone, {last}", file=sys.stderr, flush=True)
        self._close(quiet=True)
        sys.exit(128 + self.signal)

    def out_of_memory(self):
        """The one line for a step that does not fit in the device's memory."""
        dev = self.device
        total = torch.cuda.get_device_properties(dev).total_memory if dev.type == "cuda" else host_memory()
        has = f", the device has {total / 2**30:.1f} GiB" if total else ""
        fix = "--grad-checkpoint, " if hasattr(self.args, "grad_checkpoint") else ""
        return (f"out of memory in step {self.steps + 1}: {self.patches // world_size()} patches of "
                f"{self.probe['out_size']} px per rank (global patches {self.patches}) need about "
                f"{self.step_bytes() / 2**30:.1f} GiB by estimate{has}; ways out: {fix}fewer --patches, more ranks, "
                f"a smaller --batch-size per rank; the last checkpoint is untouched")

    def save(self):
        """checkpoint.pt, written atomically by rank 0, with every rank's RNG state; never after a
        non-finite loss."""
        self.stop_if_not_finite()
        states = [rng_state(self.gen)]
        if dist.is_initialized() and dist.get_world_size() > 1:
            states = [None] * dist.get_world_size()
            dist.all_gather_object(states, rng_state(self.gen))
        if is_main():
            os.makedirs(self.args.out, exist_ok=True)
            model = unwrap(self.model)
            atomic_save({"method": self.args.method, "args": vars(self.args),
                         "epoch": self.steps // self.steps_per_epoch, "step": self.steps,
                         "backbone": model.backbone.state_dict(), "model": model.state_dict(),
                         "optimizer": self.optimizer.state_dict(), "rng": states, "state": self.state,
                         "probe": self.probe}, self.path)
        self.saved = self.steps

    def write(self, record):
        if is_main():
            with open(os.path.join(self.args.out, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")

    def _knn_probe(self):
        """--eval-every: k-NN top-1 on fixed subsets (quick_knn), by rank 0, logged to metrics.jsonl."""
        if is_main():
            a, backbone = self.args, unwrap(self.model).backbone
            if self.test is None:
                self.test = load_dataset(a.dataset, a.data_dir, "test", a.image_size, a.workers, seed=a.seed)
            self.model.eval()
            acc = quick_knn(lambda imgs: probe_features(backbone, imgs, self.probe), self.train, self.test,
                            next(backbone.parameters()).device)
            self.model.train()
            self.write({"epoch": self.epoch + 1, "step": self.steps, "knn_top1": acc,
                        "elapsed_s": time.time() - self.t0})
            print(f"epoch {self.epoch + 1} knn top-1 {acc:.2f}", flush=True)
        if dist.is_initialized():
            dist.barrier()

    def _close(self, quiet=False):
        """The closing line, and the process group closed. A run that stops for a signal (quiet)
        ignores further stop signals until it has exited: torchrun sends SIGTERM to the ranks still
        closing when the first one exits, and Python's own handlers end before the interpreter does."""
        for name, handler in self._handlers.items():
            signal.signal(getattr(signal, name), signal.SIG_IGN if quiet else handler)
        if is_main() and not quiet:
            left = f" of {self.total}" if self.steps < self.total else ""
            print(f"done: ran steps {self.s0 + 1}-{self.steps}{left} in {(time.time() - self.t0) / 60:.1f} min; "
                  f"checkpoint {self.path} (step {self.steps})", flush=True)
        Run.active = None
        _close_group()


def _logged_step(line):
    """The step of one metrics.jsonl line; a torn last line (a killed run) counts as after any step."""
    try:
        return json.loads(line).get("step", 0)
    except ValueError:
        return math.inf


OutOfMemoryError = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def run_cli(main, training=True):
    """Call main(); a UserError becomes 'error: ...' on stderr and exit code 2, Ctrl-C one line
    saying where the run stopped (training=True: its step and last checkpoint) and exit code 130."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        _close_group()
        sys.exit(2)
    except OutOfMemoryError:
        run = Run.active
        print(f"error: {run.out_of_memory() if run else 'out of memory: use a smaller --batch-size'}",
              file=sys.stderr, flush=True)
        _close_group()
        sys.exit(2)
    except RuntimeError:
        if Run.active is not None and Run.active.signal:  # a collective failed: a peer is gone
            Run.active.stopped_without_peer()
        raise
    except KeyboardInterrupt:
        run = Run.active
        if not training:
            print("interrupted", file=sys.stderr, flush=True)
        elif run is None or run.steps == 0 and run.saved is None:
            print("interrupted before the first step", file=sys.stderr, flush=True)
        else:
            ckpt = f"last checkpoint at step {run.saved}: rerun with --resume" if run.saved is not None \
                else "no checkpoint yet"
            print(f"interrupted at step {run.steps}, {ckpt}", file=sys.stderr, flush=True)
        _close_group()
        sys.exit(130)


def _close_group():
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a peer already gone: nothing left to close
            pass
