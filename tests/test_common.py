"""Tests of common.py: augmentation ops against torchvision's per-image functional ops, patch
and view sampling against F.interpolate, LARS and the cosine schedule against hand
computations, gather / gather_views / DDP in 2 gloo processes against 1 process, checkpoint
safety, data loading, the k-NN probe and bag-of-features; the fence in common.py (the science above it
uses nothing of the harness below) and the line budgets. CPU only, about a minute."""
import argparse
import ast
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torchvision.io import write_png

import common
from dist_util import run_world
from check_util import Payload
from tools import build_in100 as in100_tool

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4


def images(n=6, size=32, seed=0):
    """Float images in [0,1] with some gray pixels (hue's max == min branch) and saturated ones."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    x[0, :, :4] = x[0, :1, :4]  # gray rows
    x[1, :, :, :3] = (x[1, :, :, :3] > 0.5).float()  # saturated columns
    return x


def close(a, b, tol=TOL):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a.double() - b.double()).abs().max().item()
    assert err <= tol, f"max abs error {err}"


# ---------------------------------------------------------------------------------------------
# augmentation ops == torchvision.transforms.functional, per image
# ---------------------------------------------------------------------------------------------

def factors(n, lo, hi, seed=1):
    return torch.empty(n).uniform_(lo, hi, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name,ours,theirs,lo,hi", [  # JITTER_OPS: ColorJitter's fn_idx order
    ("brightness", common.JITTER_OPS[0], TF.adjust_brightness, 0.6, 1.4),
    ("contrast", common.JITTER_OPS[1], TF.adjust_contrast, 0.6, 1.4),
    ("saturation", common.JITTER_OPS[2], TF.adjust_saturation, 0.6, 1.4),
    ("hue", common.JITTER_OPS[3], TF.adjust_hue, -0.5, 0.5),
])
def test_colour_op_equals_torchvision_per_image(name, ours, theirs, lo, hi):
    x = images()
    f = factors(len(x), lo, hi)
    y = ours(x, f)
    for b in range(len(x)):
        close(y[b], theirs(x[b], float(f[b])))


def identity_params(n):
    """Drawn parameters under which apply_augment changes nothing."""
    off = torch.zeros(n, dtype=torch.bool)
    return dict(flip=off, jitter=off, order=torch.arange(4).repeat(n, 1), brightness=torch.ones(n),
                contrast=torch.ones(n), saturation=torch.ones(n), hue=torch.zeros(n), gray=off, blur=off,
                sigma=torch.ones(n), solarize=off)


def test_grayscale_flip_solarize_equal_torchvision():
    x = images()
    close(common.grayscale(x), torch.stack([TF.rgb_to_grayscale(i) for i in x]))
    close(common.apply_augment(x, identity_params(6), 13), x, 0)
    pick = torch.tensor([True, False, True, False, False, True])
    y = common.apply_augment(x, {**identity_params(6), "flip": pick}, 13)
    for b in range(6):
        close(y[b], TF.hflip(x[b]) if pick[b] else x[b], 0)
    y = common.apply_augment(x, {**identity_params(6), "solarize": pick}, 13)  # solarize is inline there
    for b in range(6):
        close(y[b], TF.solarize(x[b], 0.5) if pick[b] else x[b], 0)


@pytest.mark.parametrize("size", [32, 64])
def test_gaussian_blur_per_sample_sigma_equals_torchvision(size):
    x = images(5, size)
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.7, 2.0])
    k = common.blur_kernel_size(sigma.max(), size)  # one kernel for the batch, from the largest sigma
    assert k == 13
    y = common.gaussian_blur(x, sigma, k)
    s = common.matched_sigma(sigma, k)  # the sampled Gaussian's width whose variance is sigma^2
    assert (s >= sigma).all() and (s - sigma)[2:].abs().max() < 0.015  # sigma >= 1: nearly sigma itself
    for b in range(len(x)):
        close(y[b], TF.gaussian_blur(x[b], [k, k], [float(s[b])] * 2), 1e-5)


def test_blur_kernel_size_covers_three_sigma_and_is_capped_at_the_side():
    # 2 ceil(3 sigma) + 1 taps
    assert [common.blur_kernel_size(s, 224) for s in (0.1, 0.5, 1.0, 1.01, 2.0, 5.0)] == [3, 5, 7, 9, 13, 31]
    # capped at the largest odd size <= the side (reflect padding needs pad < side)
    assert [common.blur_kernel_size(2.0, s) for s in (8, 9, 12, 13, 32)] == [7, 9, 11, 13, 13]
    assert common.blur_kernel_size(torch.tensor(1.0), 32) == 7  # a 0-d tensor works too


def pil_blur_std(sigma, size=32):
    """Standard deviation of PIL's ImageFilter.GaussianBlur(radius=sigma) point-spread, measured.
    PIL blurs only 8-bit images (mode "F" raises "image has wrong mode"): it runs 3 extended box
    blurs per axis whose variances add up to sigma^2, rounding to uint8 after every pass. A single
    255 pixel spreads to values < 1 that round away (244 of 255 survive at sigma 1, biasing the
    std low), so the impulse is a whole row of 255: the horizontal passes leave it unchanged and
    the vertical profile is the 1-D point-spread with a peak 255 / (sqrt(2 pi) sigma) (~51 at
    sigma 2) instead of ~10."""
    from PIL import Image, ImageFilter
    import numpy as np
    a = np.zeros((size, size), np.uint8)
    a[size // 2] = 255
    out = np.asarray(Image.fromarray(a, "L").filter(ImageFilter.GaussianBlur(radius=sigma)), np.float64)
    profile = out[:, size // 2]
    d = np.arange(size) - size // 2
    return math.sqrt((profile * d ** 2).sum() / profile.sum())


def blur_std(sigma, size=32):
    """Per-axis std of our blur of a float impulse at the centre: sqrt of the second moment about
    the centre along one axis (the kernel is separable and isotropic)."""
    x = torch.zeros(1, 1, size, size, dtype=torch.float64)
    x[..., size // 2, size // 2] = 1.0
    s = torch.tensor([float(sigma)], dtype=torch.float64)
    y = common.gaussian_blur(x, s, common.blur_kernel_size(sigma, size))[0, 0]
    d = (torch.arange(size, dtype=torch.float64) - size // 2) ** 2
    return math.sqrt((y.sum(1) * d).sum().item() / y.sum().item())


@pytest.mark.parametrize("sigma", [0.1, 0.5, 1.0, 2.0])
def test_blur_of_an_impulse_has_std_sigma_and_so_has_pils(sigma):
    # ours: the discrete kernel's variance is sigma^2 (matched_sigma), measured on a blurred impulse
    assert abs(blur_std(sigma) - sigma) < 1e-6
    # PIL's box cascade has variance sigma^2 by construction (up to its uint8 rounding)
    if sigma >= 0.5:
        assert abs(pil_blur_std(sigma) - sigma) <= 0.02 * sigma


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_blur_std_matches_pil_gaussian_blur_within_5_percent(sigma):
    ours, pil = blur_std(sigma), pil_blur_std(sigma)
    assert abs(ours - pil) <= 0.05 * pil, (ours, pil)


def test_matched_sigma_changes_the_blur_of_random_sigmas(monkeypatch):
    """Why the bisection stays: blurring white noise with the recipe's sigmas, U(0.1, 2), at its one kernel size
    (13 taps), the matched width leaves a mean output variance more than 0.5 % away from the plain width's
    (measured: 15 % less, the small sigmas blur as PIL's do instead of hardly at all)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(400, 3, 32, 32, generator=g)
    sigma = torch.empty(400).uniform_(0.1, 2.0, generator=g)
    k = common.blur_kernel_size(2.0, 32)
    matched = common.gaussian_blur(x, sigma, k).var(dim=(1, 2, 3)).mean().item()
    monkeypatch.setattr(common, "matched_sigma", lambda sigma, kernel_size, iters=30: sigma.double())
    plain = common.gaussian_blur(x, sigma, k).var(dim=(1, 2, 3)).mean().item()
    assert matched < plain and (plain - matched) / plain > 0.005, (matched, plain)


def torchvision_composition(img, p, b):
    """The VICReg pipeline of one sample with its drawn parameters, torchvision ops only."""
    if p["flip"][b]:
        img = TF.hflip(img)
    if p["jitter"][b]:
        ops = [lambda t: TF.adjust_brightness(t, float(p["brightness"][b])),
               lambda t: TF.adjust_contrast(t, float(p["contrast"][b])),
               lambda t: TF.adjust_saturation(t, float(p["saturation"][b])),
               lambda t: TF.adjust_hue(t, float(p["hue"][b]))]
        for j in p["order"][b].tolist():  # ColorJitter's fn_idx: a random permutation per sample
            img = ops[j](img)
    if p["gray"][b]:
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    if p["blur"][b]:  # augment's one kernel size: from the recipe's largest sigma (2.0: 13 taps)
        k = common.blur_kernel_size(2.0, img.shape[-1])
        img = TF.gaussian_blur(img, [k, k], [float(common.matched_sigma(p["sigma"][b:b + 1], k))] * 2)
    if p["solarize"][b]:
        img = TF.solarize(img, 0.5)
    return img


def test_apply_augment_equals_torchvision_composition_in_each_samples_order():
    n = 48
    x = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    # raise blur and solarize so that every branch runs on many samples
    cfg = common.AugConfig(p_blur=0.5, p_solarize=0.5)
    p = common.draw_aug_params(n, cfg, torch.Generator().manual_seed(4))
    for key in ("flip", "jitter", "gray", "blur", "solarize"):
        assert 0 < p[key].sum() < n, key
    y = common.apply_augment(x, p, 13)  # every op on the whole batch, each sample keeps its own result
    for b in range(n):
        close(y[b], torchvision_composition(x[b], p, b))
    # augment = apply_augment then normalisation with the config's mean and std
    cfg = common.AugConfig(mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    z = common.augment(x, cfg, torch.Generator().manual_seed(5))
    p = common.draw_aug_params(n, cfg, torch.Generator().manual_seed(5))
    ref = torch.stack([TF.normalize(torchvision_composition(x[b], p, b), cfg.mean, cfg.std) for b in range(n)])
    close(z, ref)


def test_augmentation_parameters_are_drawn_per_patch():
    n = 200
    cfg = common.AugConfig()
    p = common.draw_aug_params(n, cfg, torch.Generator().manual_seed(0))
    for key, (lo, hi) in {"brightness": (0.6, 1.4), "contrast": (0.6, 1.4), "saturation": (0.6, 1.4),
                          "hue": (-0.2, 0.2), "sigma": (0.1, 2.0)}.items():
        v = p[key]
        assert v.min() >= lo and v.max() <= hi, key
        assert len(v.unique()) > n * 0.9, key  # not one value per batch
        assert v.std() > (hi - lo) / 5, key
    orders = {tuple(o) for o in p["order"].tolist()}
    assert len(orders) > 10 and all(sorted(o) == [0, 1, 2, 3] for o in orders)
    # coins: each probability roughly respected and not shared across the batch
    for key, prob in {"flip": 0.5, "jitter": 0.8, "gray": 0.2, "blur": 0.1, "solarize": 0.1}.items():
        assert abs(p[key].float().mean().item() - prob) < 0.12, key
    # the same patch repeated gives different augmented patches (all but the few that draw
    # no jitter, no flip, no grayscale, no blur and no solarization: 6.5 % of them)
    x = torch.rand(1, 3, 32, 32).repeat(64, 1, 1, 1)
    y = common.augment(x, cfg, torch.Generator().manual_seed(1)).flatten(1)
    assert len(torch.unique((y * 1000).round(), dim=0)) >= 54


# ---------------------------------------------------------------------------------------------
# patches and views
# ---------------------------------------------------------------------------------------------

def crop_interp(img, box, out):
    t, l, h, w = box.tolist()
    return F.interpolate(img[None, :, t:t + h, l:l + w], size=(out, out), mode="bilinear", align_corners=False)[0]


def uint8_images(n, size=32, seed=0):
    """The loaders' uint8 images [n,3,size,size] (sample_patches / sample_views take them)."""
    return (images(n, size, seed) * 255).round().to(torch.uint8)


@pytest.mark.parametrize("size,out", [(16, 32), (16, 16), (24, 16), (5, 32)])
def test_sample_patches_view_major_and_equal_to_interpolated_crops(size, out):
    B, n = 5, 7
    u8 = uint8_images(B, 32, seed=2)
    x = u8.float() / 255  # patches are floats in [0,1]
    p, boxes = common.sample_patches(u8, n, size, out, torch.Generator().manual_seed(0))
    assert p.shape == (n * B, 3, out, out) and boxes.shape == (n * B, 4) and p.dtype == torch.float32
    assert (boxes[:, 2:] == size).all() and (boxes[:, :2] >= 0).all() and (boxes[:, :2] <= 32 - size).all()
    for i in range(n):
        for b in range(B):
            k = i * B + b  # patch i of image b
            close(p[k], crop_interp(x[b], boxes[k], out))
            if out >= size:  # upsampling: torchvision's resized_crop (antialias only acts when shrinking)
                t, l, h, w = boxes[k].tolist()
                close(p[k], TF.resized_crop(x[b], t, l, h, w, [out, out], antialias=True))


def test_sample_patches_positions_cover_the_image_uniformly():
    u8 = uint8_images(50, 32)
    _, boxes = common.sample_patches(u8, 40, 16, 16, torch.Generator().manual_seed(1))
    for col in (0, 1):
        counts = torch.bincount(boxes[:, col], minlength=17)
        assert len(counts) == 17 and counts.min() > 0.6 * counts.float().mean()


def test_patch_larger_than_image_or_batch_larger_than_set_is_a_user_error(cached_synthetic):
    common.check_patch(32, 32)  # the whole image is a patch
    with pytest.raises(common.UserError, match="--patch-size 33"):
        common.check_patch(33, 32)
    # load_train_set checks both, on the set it returns (--subset applied)
    args = argparse.Namespace(dataset="synthetic", data_dir=None, image_size=None, workers=0, download=False,
                              seed=0, subset=20, batch_size=20)
    assert len(common.load_train_set(args, patch_size=32)) == 20
    with pytest.raises(common.UserError, match="--patch-size 33 is larger than the 32px images"):
        common.load_train_set(args, patch_size=33)
    args.batch_size = 21
    with pytest.raises(common.UserError, match="--batch-size 21 is larger than the 20 training images"):
        common.load_train_set(args)


def test_random_resized_boxes_inside_with_area_and_ratio_in_range():
    n, h, w = 4000, 224, 160
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    boxes = common.random_resized_boxes(n, h, w, scale, ratio, torch.Generator().manual_seed(0))
    t, l, bh, bw = boxes.unbind(1)
    assert (t >= 0).all() and (l >= 0).all() and (t + bh <= h).all() and (l + bw <= w).all()
    assert (bh > 0).all() and (bw > 0).all()
    # rounding moves each side by at most 0.5 px
    area = (bh * bw).double()
    lo = (math.sqrt(scale[0] * h * w) - 0.5) ** 2 * 0.99
    fallback = (bh == h) & (bw == w)  # in-ratio image: the central fallback is the whole image
    assert ((area >= lo) & (area <= h * w) | fallback).all()
    r = bw.double() / bh.double()
    slack_lo = (bw.double() - 0.5) / (bh.double() + 0.5)
    slack_hi = (bw.double() + 0.5) / (bh.double() - 0.5)
    assert ((slack_hi >= ratio[0]) & (slack_lo <= ratio[1]) | fallback).all()
    assert r.min() < 0.8 and r.max() > 1.25  # the range is used
    assert area.min() < 0.15 * h * w and area.max() > 0.8 * h * w
    # positions uniform over the free range: the top is sometimes 0 and sometimes at the bottom
    assert (t == 0).any() and (t + bh == h).any()


def test_views_and_patches_are_made_on_the_images_device():
    """Every tensor of a draw is made on the images' device (the GPU pipeline never leaves the GPU): on the meta
    device a tensor made on the CPU is an error. Catches a device= dropped, which a CPU run cannot otherwise see."""
    x = torch.empty(3, 3, 32, 24, dtype=torch.uint8, device="meta")
    for v, boxes in (common.sample_views(x, 2, 16, (0.08, 1.0)), common.sample_patches(x, 2, 16, 16)):
        assert (v.device.type, boxes.device.type) == ("meta", "meta")
        assert (tuple(v.shape), tuple(boxes.shape)) == ((6, 3, 16, 16), (6, 4))


def test_random_resized_boxes_fallback_is_torchvisions_central_crop():
    # no try can fit (aspect >= 3 at >= 90% of the area): torchvision falls back to a central crop
    boxes = common.random_resized_boxes(50, 32, 32, (0.9, 1.0), (3.0, 4.0), torch.Generator().manual_seed(0))
    fh = int(round(32 / 3.0))
    assert (boxes == torch.tensor([(32 - fh) // 2, 0, fh, 32])).all()
    # the EMP-SSL patch: scale 0.25, ratio 1 on 32 px is always a 16 px square
    boxes = common.random_resized_boxes(500, 32, 32, (0.25, 0.25), (1.0, 1.0), torch.Generator().manual_seed(0))
    assert (boxes[:, 2:] == 16).all() and boxes[:, :2].max() == 16


def test_sample_views_equal_interpolated_crops_view_major():
    B, m = 4, 3
    u8 = uint8_images(B, 32, seed=7)
    v, boxes = common.sample_views(u8, m, 24, (0.08, 1.0), generator=torch.Generator().manual_seed(2))
    assert v.shape == (m * B, 3, 24, 24)
    assert len({tuple(b) for b in boxes[:, 2:].tolist()}) > 1  # crops of different sizes in one batch
    assert len({tuple(b) for b in boxes.tolist()}) == m * B  # each view its own crop, not one per image repeated
    for k in range(m * B):
        close(v[k], crop_interp(u8[k % B].float() / 255, boxes[k], 24))


# ---------------------------------------------------------------------------------------------
# LARS and the cosine schedule
# ---------------------------------------------------------------------------------------------

def test_lars_step_equals_hand_computation():
    torch.manual_seed(0)
    lr, wd, eta, mom = 0.3, 1e-2, 0.5, 0.9
    W1 = nn.Parameter(torch.randn(5, 4))  # trust ratio clipped at 1 (large eta)
    W2 = nn.Parameter(torch.randn(3, 4))  # trust ratio below 1 (large gradient)
    W0 = nn.Parameter(torch.zeros(2, 3))  # |w| = 0: neither ratio nor weight decay
    bias = nn.Parameter(torch.randn(4))  # ndim == 1: plain Nesterov SGD, no weight decay
    params = [W1, W2, W0, bias]
    opt = common.LARS(params, lr=lr, weight_decay=wd, eta=eta)
    w = [p.detach().double().clone() for p in params]
    buf = [None] * 4
    ratios = []
    for it in range(3):
        grads = [torch.randn_like(p) * s for p, s in zip(params, (1e-3, 50.0, 1.0, 1.0))]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for j, g in enumerate(grads):
            g = g.double()
            if w[j].ndim > 1:
                wn, gn = w[j].norm().item(), g.norm().item()
                if wn > 0 and gn > 0:
                    ratio = min(eta * wn / (gn + wd * wn + 1e-8) / lr, 1.0)
                    ratios.append((it, j, ratio))
                    g = (g + wd * w[j]) * ratio
            buf[j] = g.clone() if buf[j] is None else mom * buf[j] + g  # SGD momentum, dampening 0
            w[j] = w[j] - lr * (g + mom * buf[j])  # Nesterov
        for j, p in enumerate(params):
            close(p.detach(), w[j], 1e-5)
    assert any(j == 0 and r == 1.0 for _, j, r in ratios)  # clipped case seen
    assert any(j == 1 and r < 0.5 for _, j, r in ratios)  # trust ratio case seen
    # zero-norm weight: the first step is plain SGD (no ratio), later steps see |w| > 0
    assert not any(it == 0 and j == 2 for it, j, _ in ratios) and any(j == 2 for _, j, _ in ratios)


def test_lars_zero_gradient_leaves_weight_decay_off():
    W = nn.Parameter(torch.ones(3, 3))
    opt = common.LARS([W], lr=0.1, weight_decay=0.5, eta=0.001)
    W.grad = torch.zeros(3, 3)
    opt.step()
    assert torch.equal(W.detach(), torch.ones(3, 3))


def test_cosine_lr_closed_form_with_warmup():
    base, total, warm = 0.8, 110, 10
    assert common.cosine_lr(0, total, base, warm) == pytest.approx(base / warm)
    assert common.cosine_lr(4, total, base, warm) == pytest.approx(base * 5 / warm)
    assert common.cosine_lr(9, total, base, warm) == pytest.approx(base)
    assert common.cosine_lr(10, total, base, warm) == pytest.approx(base)
    assert common.cosine_lr(60, total, base, warm) == pytest.approx(base / 2)
    assert common.cosine_lr(35, total, base, warm) == pytest.approx(base * 0.5 * (1 + math.cos(math.pi / 4)))
    assert common.cosine_lr(110, total, base, warm) == pytest.approx(0, abs=1e-12)
    assert common.cosine_lr(200, total, base, warm) == pytest.approx(0, abs=1e-12)
    assert common.cosine_lr(60, total, base, warm, final=0.1) == pytest.approx(0.1 + 0.35)
    assert common.cosine_lr(0, 100, base) == pytest.approx(base)
    assert common.cosine_lr(50, 100, base) == pytest.approx(base / 2)


# ---------------------------------------------------------------------------------------------
# distributed: 2 gloo processes == 1 process on the concatenated batch
# ---------------------------------------------------------------------------------------------

def tcr(Z, eps2=0.2):
    """0.5 logdet(I + c Z^T Z), c = d / (b eps2), on one view Z [b, d]."""
    b, d = Z.shape
    return 0.5 * torch.logdet(torch.eye(d, dtype=Z.dtype) + d / (b * eps2) * Z.T @ Z)


def vicreg_stats(Z):
    """VICReg's variance hinge and covariance terms of Z [b, d]."""
    Z = Z - Z.mean(0)
    std = torch.sqrt(Z.var(0) + 1e-4)
    cov = Z.T @ Z / (len(Z) - 1)
    off = cov - torch.diag(torch.diag(cov))
    return F.relu(1 - std).mean() + off.pow(2).sum() / Z.shape[1]


def views_loss(Zv, n):
    """EMP-style loss on view-major rows [n*B, d]: TCR of each view + cosine to the image mean."""
    Z = Zv.reshape(n, -1, Zv.shape[1])
    Zbar = Z.mean(0)
    return -sum(tcr(Z[i]) for i in range(n)) / n - 5 * F.cosine_similarity(Z, Zbar[None], dim=-1).mean()


def pair_loss(za, zb):
    return vicreg_stats(za) + vicreg_stats(zb) + F.mse_loss(za, zb)


def _dist_worker(rank, world, za, zb, zv, n, x, state):
    b = len(za) // world
    sl = slice(rank * b, (rank + 1) * b)
    out = {}
    # gather: each rank holds its rows of the global batch
    la, lb = za[sl].clone().requires_grad_(), zb[sl].clone().requires_grad_()
    loss = pair_loss(common.gather_views(la, 1), common.gather_views(lb, 1))
    loss.backward()
    out["pair"] = (loss.detach(), la.grad, lb.grad)
    # gather_views: local view-major rows [n*b, d] -> global view-major [n*B, d]
    Zg = zv.reshape(n, world * b, -1)
    lv = Zg[:, sl].reshape(n * b, -1).clone().requires_grad_()
    G = common.gather_views(lv, n)
    loss = views_loss(G, n)
    loss.backward()
    out["views"] = (loss.detach(), lv.grad, G.detach())
    # DDP through wrap_ddp: parameter gradients equal the single-process gradients
    model = nn.Sequential(nn.Linear(x.shape[1], 6), nn.Tanh(), nn.Linear(6, 5)).double()
    model.load_state_dict(state)
    net = common.wrap_ddp(model, torch.device("cpu"))
    assert isinstance(net, nn.parallel.DistributedDataParallel)
    xl = x.reshape(n, world * b, -1)[:, sl].reshape(n * b, -1)
    loss = views_loss(common.gather_views(net(xl), n), n)
    loss.backward()
    out["ddp"] = (loss.detach(), [p.grad for p in model.parameters()])
    return out


@pytest.mark.slow
def test_gather_gather_views_and_ddp_two_processes_equal_one_process():
    torch.manual_seed(0)
    B, d, n, world = 8, 5, 3, 2
    za, zb = torch.randn(B, d, dtype=torch.double), torch.randn(B, d, dtype=torch.double)
    zv = torch.randn(n * B, d, dtype=torch.double)
    x = torch.randn(n * B, 4, dtype=torch.double)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5)).double()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    res = run_world(_dist_worker, world, (za, zb, zv, n, x, state))

    # 1 process, concatenated batch
    ga, gb = za.clone().requires_grad_(), zb.clone().requires_grad_()
    loss1 = pair_loss(ga, gb)
    loss1.backward()
    gv = zv.clone().requires_grad_()
    lossv = views_loss(gv, n)
    lossv.backward()
    gv_views = gv.grad.reshape(n, B, d)
    lossd = views_loss(model(x), n)
    lossd.backward()
    b = B // world
    for r, out in enumerate(res):
        sl = slice(r * b, (r + 1) * b)
        loss, dla, dlb = out["pair"]
        close(loss, loss1.detach(), 1e-10)
        # VICReg convention: backward sums over ranks, so local grad / world = 1-process grad
        close(dla / world, ga.grad[sl], 1e-10)
        close(dlb / world, gb.grad[sl], 1e-10)
        loss, dlv, G = out["views"]
        close(G, zv, 0)  # gather_views rebuilt the global view-major batch
        close(loss, lossv.detach(), 1e-10)
        close(dlv.reshape(n, b, d) / world, gv_views[:, sl], 1e-10)
        loss, grads = out["ddp"]
        close(loss, lossd.detach(), 1e-10)
        for g, p in zip(grads, model.parameters()):
            close(g, p.grad, 1e-10)


def test_gather_is_identity_in_one_process():
    z = torch.randn(6, 3)
    assert common.gather_views(z, 1) is z and common.gather_views(z, 2) is z and common.all_gather_nograd(z) is z
    m = nn.Linear(2, 2)
    assert common.wrap_ddp(m, torch.device("cpu")) is m


def test_epoch_batches_ranks_together_give_the_single_process_batches(tmp_path):
    ds = common.synthetic_set("test", seed=3, n=53)
    one = list(common.epoch_batches(ds, 10, epoch=2, seed=1))
    assert len(one) == 5 == common.steps_per_epoch(53, 10)
    idx = torch.cat([i for _, _, i in one])
    assert len(idx.unique()) == 50  # a permutation: no image twice in an epoch
    for imgs, labels, i in one:
        assert torch.equal(imgs, ds.images[i]) and torch.equal(labels, ds.labels[i])
    ranks = [list(common.epoch_batches(ds, 10, 2, 1, rank=r, world=2)) for r in (0, 1)]
    for s in range(5):
        assert torch.equal(torch.cat([ranks[0][s][2], ranks[1][s][2]]), one[s][2])
        assert torch.equal(torch.cat([ranks[0][s][0], ranks[1][s][0]]), one[s][0])
    late = list(common.epoch_batches(ds, 10, 2, 1, rank=1, world=2, start=3))
    assert len(late) == 2 and all(torch.equal(a[2], b[2]) for a, b in zip(late, ranks[1][3:]))
    other = torch.cat([i for _, _, i in common.epoch_batches(ds, 10, epoch=3, seed=1)])
    assert not torch.equal(other, idx)  # a new order every epoch
    # a file-backed set yields the same batches, decoded
    files = []
    for k in range(len(ds)):
        files.append(str(tmp_path / f"{k}.png"))
        write_png(ds.images[k], files[-1])
    fs = common.ImageSet(ds.labels, 10, 32, files=files)
    for (a, la, ia), (b, lb, ib) in zip(one, common.epoch_batches(fs, 10, epoch=2, seed=1)):
        assert torch.equal(ia, ib) and torch.equal(a, b) and torch.equal(la, lb)


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------

def test_atomic_save_leaves_no_temp_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    common.atomic_save({"a": torch.ones(2)}, str(path))
    common.atomic_save({"a": torch.zeros(2)}, str(path))  # overwrite
    assert os.listdir(tmp_path) == ["checkpoint.pt"]
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.zeros(2))


def test_load_checkpoint_refuses_bad_files(tmp_path):
    probe = common.probe_info("resnet18", "cifar", 32, (0.5,) * 3, (0.5,) * 3, "bag", patch_size=16)
    good = {"method": "emp_ssl", "backbone": {"w": torch.ones(1)}, "args": {"arch": "resnet18"}, "probe": probe}
    common.atomic_save(good, str(tmp_path / "good.pt"))
    assert common.load_checkpoint(str(tmp_path / "good.pt"), "emp_ssl")["args"]["arch"] == "resnet18"
    with pytest.raises(common.UserError):
        common.load_checkpoint(str(tmp_path / "good.pt"), "bag_ssl")
    (tmp_path / "garbage.pt").write_bytes(os.urandom(300))
    torch.save([1, 2, 3], tmp_path / "list.pt")
    torch.save({"state_dict": {"w": torch.ones(1)}}, tmp_path / "foreign.pt")
    torch.save({k: v for k, v in good.items() if k != "probe"}, tmp_path / "old.pt")  # the old format: refused
    for name in ("garbage.pt", "list.pt", "foreign.pt", "old.pt", "missing.pt"):
        with pytest.raises(common.UserError):
            common.load_checkpoint(str(tmp_path / name))
    marker = tmp_path / "pwned"
    torch.save({**good, "extra": Payload(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(common.UserError):
        common.load_checkpoint(str(tmp_path / "evil.pt"))
    assert not marker.exists()  # weights_only: the pickled object was never built


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------

def test_synthetic_set_deterministic_uint8_balanced():
    a, b = common.synthetic_set("train", seed=1, n=500), common.synthetic_set("train", seed=1, n=500)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.images.dtype == torch.uint8 and a.images.shape == (500, 3, 32, 32)
    assert a.num_classes == 10 and a.size == 32
    counts = torch.bincount(a.labels, minlength=10)
    assert len(counts) == 10 and counts.min() >= 40 and counts.max() <= 60
    c = common.synthetic_set("train", seed=2, n=500)
    assert not torch.equal(a.images, c.images)
    t = common.synthetic_set("test", seed=1, n=500)
    assert not torch.equal(a.images, t.images)
    assert a.images.float().std() > 20  # not blank
    assert len(common.load_dataset("synthetic", None, "test", seed=1)) == 2000


def test_central_view_of_a_flat_image_is_its_normalised_value():
    """A flat uint8 image v resized to any side is (v / 255 - mean) / std per channel. Catches mean and std
    swapped, or 256 for 255."""
    img = torch.tensor([200, 30, 90], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 20, 20)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.125)
    want = (torch.tensor([200, 30, 90]) / 255 - torch.tensor(mean)) / torch.tensor(std)
    out = common.central_view(img, 12, mean, std)
    assert out.shape == (2, 3, 12, 12) and torch.allclose(out, want.view(1, 3, 1, 1).expand_as(out), atol=1e-5)


@pytest.mark.parametrize("side,out", [(32, 20), (20, 32)])
def test_central_view_is_torchvisions_resize_then_normalize(side, out):
    """The central probe's view is torchvision's Resize(out, antialias=True) and Normalize on the float image.
    Catches align_corners or antialias flipped."""
    import torchvision.transforms.v2.functional as TF
    img, mean, std = uint8_images(3, side, seed=5), (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    want = TF.normalize(TF.resize(img.float() / 255, [out, out], antialias=True), mean, std)
    close(common.central_view(img, out, mean, std), want)


def test_augconfig_defaults_are_emp_ssl_a1():
    """AugConfig() is EMP-SSL's A.1 recipe (VICReg's), normalised 0.5 / 0.5 as the authors' code: every caller that
    leaves a value out gets it. Catches a class default changed (e.g. blur p 0.2)."""
    assert vars(common.AugConfig()) == {"flip": 0.5, "jitter": (0.4, 0.4, 0.4, 0.2), "p_jitter": 0.8, "p_gray": 0.2,
                                        "p_blur": 0.1, "blur_sigma": (0.1, 2.0), "p_solarize": 0.1,
                                        "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}


@pytest.mark.parametrize("scale", [1.0, 0.08])  # the whole image squeezed to 16 px; the smallest crop
def test_synthetic_class_survives_the_strongest_default_augmentation_at_16px(scale):
    """The class is in coarse luminance structure: after a crop of `scale` resized to 16 px, blur at sigma 2
    px (the top of every recipe's range), grayscale and jitter, a k-NN on the flip-folded amplitude spectrum
    of the views finds the class (chance 10 %), and their mean colour does not. The former period-4 grating
    fails at scale 1 (17.6 %: blurred away), which is what misled a copied method with blur p 0.5."""
    aug = common.AugConfig(p_jitter=0.8, p_gray=1.0, p_blur=1.0, blur_sigma=(2.0, 2.0), p_solarize=0.0)
    feats = {}
    for split, n in (("train", 1000), ("test", 500)):
        ds, g = common.synthetic_set(split, seed=0, n=n), torch.Generator().manual_seed(n)
        x, _ = common.sample_views(ds.images, 1, 16, (scale, scale), generator=g)
        y = common.augment(x, aug, g).mean(1)
        f = torch.fft.fftshift(torch.fft.fft2(y - y.mean((1, 2), keepdim=True)).abs(), dim=(1, 2))
        feats[split] = F.normalize((f + f.flip(2)).flatten(1), dim=1), F.normalize(x.mean((2, 3)), dim=1), ds.labels
    (tr, tr_col, ytr), (te, te_col, yte) = feats["train"], feats["test"]
    texture = (common.knn_predict(tr, ytr, te, 10) == yte).float().mean().item()
    colour = (common.knn_predict(tr_col, ytr, te_col, 10) == yte).float().mean().item()
    assert texture > 0.45 and colour < 0.2, (texture, colour)


def test_load_dataset_missing_or_wrong_dirs_are_user_errors(tmp_path):
    with pytest.raises(common.UserError):
        common.load_dataset("cifar10", str(tmp_path / "nope"), "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(common.UserError):
        common.load_dataset("cifar10", str(tmp_path / "empty"), "train")
    with pytest.raises(common.UserError):
        common.load_dataset("imagenet", str(tmp_path), "train")
    with pytest.raises(common.UserError):
        common.load_dataset("folder", str(tmp_path), "train")  # needs --image-size


def write_tree(root, split, classes, per_class, size, seed):
    g = torch.Generator().manual_seed(seed)
    imgs, labels = [], []
    for c, name in enumerate(classes):
        os.makedirs(os.path.join(root, split, name), exist_ok=True)
        for k in range(per_class):
            img = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g)
            write_png(img, os.path.join(root, split, name, f"{k:03d}.png"))
            imgs.append(img)
            labels.append(c)
    return torch.stack(imgs), torch.tensor(labels)


def test_load_dataset_imagefolder_tree(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFSSL_CACHE", str(tmp_path / "cache"))
    root = str(tmp_path / "data")
    classes = ["zebra", "apple", "mango"]  # labels follow the sorted class names
    tr_imgs, tr_labels = write_tree(root, "train", classes, 4, 32, 0)
    te_imgs, te_labels = write_tree(root, "test", classes, 2, 32, 1)
    order = {"zebra": 2, "apple": 0, "mango": 1}
    for split, imgs, labels in (("train", tr_imgs, tr_labels), ("test", te_imgs, te_labels)):
        for attempt in range(2):  # second time from the decoded cache
            ds = common.load_dataset("cifar10", root, split)
            assert ds.num_classes == 3 and ds.size == 32 and ds.images.dtype == torch.uint8
            want = torch.tensor([order[classes[c]] for c in labels.tolist()])
            perm = torch.argsort(want, stable=True)  # files come out grouped by sorted class
            assert torch.equal(ds.labels, want[perm])
            assert torch.equal(ds.images, imgs[perm])
    assert len(os.listdir(tmp_path / "cache")) == 2
    # --dataset folder with --image-size: short side resized with antialias, then centre crop
    ds = common.load_dataset("folder", root, "test", image_size=16)
    assert ds.images.shape == (6, 3, 16, 16) and ds.num_classes == 3
    perm = torch.argsort(torch.tensor([order[classes[c]] for c in te_labels.tolist()]), stable=True)
    for k in range(6):
        ref = TF.center_crop(TF.resize(te_imgs[perm[k]], 16, antialias=True), 16)
        assert (ds.images[k].int() - ref.int()).abs().max() <= 1


def test_cifar10_imagefolder_test_split(tmp_path, monkeypatch):
    root = os.environ.get("EFFSSL_CIFAR10")
    if not root:
        pytest.skip("EFFSSL_CIFAR10 not set (ImageFolder CIFAR-10 tree with train/ and test/)")
    monkeypatch.setenv("EFFSSL_CACHE", str(tmp_path))
    ds = common.load_dataset("cifar10", root, "test", workers=2)
    assert len(ds) == 10000 and ds.images.shape == (10000, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert ds.num_classes == 10 and torch.equal(torch.bincount(ds.labels), torch.full((10,), 1000))
    m = ds.images.float().div(255).mean((0, 2, 3))
    close(m, torch.tensor(common.STATS["cifar10"][0]), 0.02)  # decoded pixels look like CIFAR-10


def test_subset_indices_fixed_and_nested():
    a = common.subset_indices(1000, 100, seed=0)
    assert torch.equal(a, common.subset_indices(1000, 100, seed=0))
    assert len(a.unique()) == 100 and (a[1:] > a[:-1]).all() and a.max() < 1000
    b = common.subset_indices(1000, 300, seed=0)
    assert set(a.tolist()) <= set(b.tolist())
    assert not torch.equal(a, common.subset_indices(1000, 100, seed=1))
    assert torch.equal(common.subset_indices(50, 80), torch.arange(50))


def run_common(*args):
    return subprocess.run([sys.executable, "tools/build_in100.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_build_in100_links_the_cmc_classes(tmp_path, monkeypatch, capsys):
    assert len(set(in100_tool.IN100_CLASSES)) == 100
    fake = tmp_path / "imagenet"
    for split in ("train", "val"):
        for c in in100_tool.IN100_CLASSES + ["n99999999"]:  # plus a class outside in100
            (fake / split / c).mkdir(parents=True)
    r = run_common("--imagenet", str(fake), "--out", str(tmp_path / "in100"))
    assert r.returncode == 0, r.stderr
    for split in ("train", "val"):
        names = sorted(os.listdir(tmp_path / "in100" / split))
        assert names == sorted(in100_tool.IN100_CLASSES)
        assert all(os.path.islink(tmp_path / "in100" / split / c) for c in names)
        assert os.path.realpath(tmp_path / "in100" / split / names[0]) == os.path.realpath(fake / split / names[0])
    # a missing class: exit 2 with one line (run in-process through the same run_cli entry)
    os.rmdir(fake / "val" / in100_tool.IN100_CLASSES[5])
    monkeypatch.setattr(sys, "argv", ["build_in100.py", "--imagenet", str(fake), "--out", str(tmp_path / "b")])
    with pytest.raises(SystemExit) as e:
        common.run_cli(in100_tool.main, training=False)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error:")
    assert in100_tool.IN100_CLASSES[5] in err
    assert not (tmp_path / "b").exists()  # nothing written on bad input


@pytest.mark.skipif(not os.path.isdir(os.path.join(os.path.dirname(ROOT), "shared", "data")),
                    reason="shared data folder missing")
def test_in100_class_list_matches_shared_file():
    with open(os.path.join(os.path.dirname(ROOT), "shared", "data", "imagenet100_classes.txt")) as f:
        assert f.read().split() == in100_tool.IN100_CLASSES


# ---------------------------------------------------------------------------------------------
# probes
# ---------------------------------------------------------------------------------------------

def test_knn_predict_weighted_vote_known_answer():
    s = math.sqrt
    # test point [1, 0]; one very close class-0 neighbour, two farther class-1 neighbours
    train = torch.tensor([[0.99, s(1 - 0.99 ** 2)], [0.5, s(0.75)], [0.5, -s(0.75)], [-1.0, 0.0]])
    y = torch.tensor([0, 1, 1, 0])
    test = torch.tensor([[3.0, 0.0], [-2.0, 0.1]])  # scale does not matter (cosine)
    # sharp temperature: exp(0.99/0.07) > 2 exp(0.5/0.07) -> class 0
    assert common.knn_predict(train * 4, y, test, 2, k=3, t=0.07).tolist() == [0, 0]
    # flat temperature: the two class-1 votes win
    assert common.knn_predict(train, y, test, 2, k=3, t=10.0).tolist()[0] == 1
    # k larger than the train set is clamped; second point is nearest [-1,0] but k=4 votes all
    assert common.knn_predict(train, y, test, 3, k=50, t=0.07).tolist() == [0, 0]
    # chunking gives the same answer
    big = torch.randn(300, 8)
    yb = torch.randint(0, 5, (300,))
    q = torch.randn(70, 8)
    assert torch.equal(common.knn_predict(big, yb, q, 5, k=7, chunk=9), common.knn_predict(big, yb, q, 5, k=7))


def test_bag_of_features_equals_mean_of_per_patch_features():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3, stride=2),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    net[1].running_mean.uniform_(-0.2, 0.2)
    imgs = (images(3, 32, seed=9) * 255).round().to(torch.uint8)
    boxes = common.fixed_patch_boxes(5, 16, 32, seed=1)
    assert torch.equal(boxes, common.fixed_patch_boxes(5, 16, 32, seed=1))
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    bag = common.bag_of_features(net, imgs, boxes, 24, mean, std, chunk=4)  # chunks cut across images
    for b in range(3):
        feats = []
        for box in boxes:
            p = crop_interp(imgs[b].float() / 255, box, 24)
            p = TF.normalize(p, mean, std)
            with torch.no_grad():
                feats.append(net(p[None])[0])
        close(bag[b], torch.stack(feats).mean(0), 1e-5)


def test_augment_under_autocast_equals_float32():
    """eval_linear --bag-augment augments inside a bf16 autocast (on CUDA); the blur convolution
    must not come back in bf16 (it broke index_copy_ on an H200) nor lose precision."""
    cfg = common.AugConfig(p_blur=1.0)  # every sample takes every branch that writes back
    x = torch.rand(16, 3, 32, 32)
    ref = common.augment(x, cfg, torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = common.augment(x, cfg, torch.Generator().manual_seed(3))
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, ref)


# what a training step's view pipeline calls: nothing that makes the host wait for the device
WAITS = {"nonzero", "item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy"}


class Calls(torch.overrides.TorchFunctionMode):
    """The names of the torch functions called on the pipeline's tensors. Tensors built from Python numbers
    (torch.tensor without a device) and what is computed from them alone stay on the host: their ops
    (random_resized_boxes' log(ratio).tolist()) never wait for the device, and are not recorded."""

    def __init__(self):
        super().__init__()
        self.names, self.host = set(), {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if (func is torch.tensor and kwargs.get("device") is None) or (
                tensors and all(id(t) in self.host for t in tensors)):
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.host[id(t)] = t  # held, so that its id is not reused
        else:
            self.names.add(getattr(func, "__name__", str(func)))
        return out


@pytest.mark.parametrize("cfg", [common.AugConfig(p_blur=0.5, p_solarize=0.5),
                                 common.AugConfig(jitter=(0.4, 0.4, 0.2, 0.1), p_blur=1.0, p_solarize=0.0),
                                 common.AugConfig(jitter=(0.4, 0.4, 0.4, 0.0), p_blur=0.0, p_solarize=0.0)])
def test_augmentation_pipeline_equals_torchvision_per_image_and_never_waits_for_the_device(cfg):
    """apply_augment (every op on the whole batch, torch.where per sample: no nonzero, .item() or
    data-dependent shape) gives torchvision's per-image composition, for EMP-SSL's, BYOL's first view's and
    the multi-view paper's parameters; patches, views and their augmentation call no op that waits for the device."""
    imgs = common.synthetic_set("test", n=64).images
    g = torch.Generator().manual_seed(7)
    common.sample_views(imgs, 2, 32, (0.08, 1.0), generator=g)  # the first call takes log(ratio) on the host
    calls = Calls()
    with calls:
        x, _ = common.sample_patches(imgs, 3, 16, 32, g)
        p = common.draw_aug_params(192, cfg, g)
        y = common.apply_augment(x, p, 13)
        v, _ = common.sample_views(imgs, 2, 32, (0.08, 1.0), generator=g)
        common.apply_augment(v, common.draw_aug_params(128, cfg, g), 13)
    assert "where" in calls.names and not calls.names & WAITS, calls.names & WAITS
    for k in range(len(x)):
        close(y[k], torchvision_composition(x[k], p, k))


# ---------------------------------------------------------------------------------------------
# the shape of the code: the fence in common.py, and sizes
# ---------------------------------------------------------------------------------------------

def parsed(name):
    with open(os.path.join(ROOT, name)) as f:
        src = f.read()
    return src, ast.parse(src)


def test_nothing_above_the_fence_uses_a_name_below_it_nor_imports_beyond_torch_and_numpy():
    """common.py's science (above '# ======== harness') stands alone: no name it uses is defined below the
    fence, it is at most 450 lines, and it imports only the standard library, numpy, torch and torchvision."""
    src, tree = parsed("common.py")
    fence = next(n for n, line in enumerate(src.splitlines(), 1) if line.startswith("# ======== harness"))
    assert fence - 1 <= 450, f"{fence - 1} lines above the fence"
    below = set()
    for node in tree.body:
        if node.lineno < fence:
            continue
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            below.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                below |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
    assert {"UserError", "fail", "load_dataset", "Run", "run_cli", "STATS"} <= below  # the scan sees the harness
    above = [node for node in tree.body if node.end_lineno < fence]
    used = {}  # every Name, the base of each Attribute chain among them (ast.walk reaches it)
    for n in (n for node in above for n in ast.walk(node)):
        if isinstance(n, ast.Name) and n.id in below:
            used.setdefault(n.id, n.lineno)
    assert not used, f"names of the harness used above the fence (name: line): {used}"
    allowed = {"torch", "torchvision", "numpy"} | set(sys.stdlib_module_names)
    imports = [(n.lineno, alias.name if isinstance(n, ast.Import) else n.module or "", getattr(n, "level", 0))
               for node in above for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))
               for alias in (n.names if isinstance(n, ast.Import) else [None])]
    assert any(m == "torch" for _, m, _ in imports)  # the scan sees the imports
    bad = [(line, m) for line, m, level in imports if level or m.split(".")[0] not in allowed]
    assert not bad, f"imports above the fence beyond the standard library, numpy, torch, torchvision: {bad}"


def top_level_lines(name, what):
    """Lines of the top-level function or class `what` in file `name` (decorators not counted)."""
    node = next(n for n in parsed(name)[1].body if getattr(n, "name", None) == what)
    return node.end_lineno - node.lineno + 1


def file_lines(name):
    return len(parsed(name)[0].splitlines())


METHOD_FILES = ("emp_ssl.py", "bag_ssl.py", "multiaug_ssl.py", "npid_sqrtkl.py")
FILE_LIMITS = {**{f: 300 for f in METHOD_FILES}, "eval_linear.py": 350}


def test_run_class_fits_in_150_lines():
    assert top_level_lines("common.py", "Run") <= 150


@pytest.mark.parametrize("name", list(FILE_LIMITS))
def test_method_and_probe_files_fit_their_line_budget(name):
    assert file_lines(name) <= FILE_LIMITS[name]


@pytest.mark.parametrize("name", list(FILE_LIMITS))
def test_each_scripts_main_fits_in_60_lines(name):
    assert top_level_lines(name, "main") <= 60


@pytest.mark.xfail(strict=False, reason="the goal, not met yet: common.py is being cut from ~1,170 lines")
def test_common_py_fits_in_1000_lines():
    assert file_lines("common.py") <= 1000
