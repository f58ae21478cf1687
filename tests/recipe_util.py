"""Holding an augmentation recipe to its paper: the configured values, and the drawn parameters'
frequencies and ranges over enough draws that a probability 0.1 against 0, or 0.2 against 0.3, fails."""
import math

import torch

import common

DRAWS = 20000  # a frequency's standard deviation is at most 0.0035: 5 of them are 0.018


def assert_recipe(cfg, flip, jitter, p_jitter, p_gray, p_blur, p_solarize, blur_sigma=(0.1, 2.0)):
    got = (cfg.flip, tuple(cfg.jitter), cfg.p_jitter, cfg.p_gray, cfg.p_blur, cfg.p_solarize, tuple(cfg.blur_sigma))
    assert got == (flip, tuple(jitter), p_jitter, p_gray, p_blur, p_solarize, tuple(blur_sigma)), got
    p = common.draw_aug_params(DRAWS, cfg, torch.Generator().manual_seed(0))
    for key, prob in {"flip": flip, "jitter": p_jitter, "gray": p_gray, "blur": p_blur, "solarize": p_solarize}.items():
        bound = 5 * math.sqrt(max(prob * (1 - prob), 1e-12) / DRAWS)
        assert abs(p[key].float().mean().item() - prob) <= bound, (key, p[key].float().mean().item(), prob)
    for key, strength in zip(("brightness", "contrast", "saturation"), jitter[:3]):
        lo, hi = max(0.0, 1 - strength), 1 + strength
        v = p[key]
        assert v.min() >= lo and v.max() <= hi and (strength == 0 or v.max() - v.min() > 0.98 * (hi - lo)), key
    assert p["hue"].abs().max() <= jitter[3] and (jitter[3] == 0 or p["hue"].abs().max() > 0.98 * jitter[3])
    s = p["sigma"]
    assert s.min() >= blur_sigma[0] and s.max() <= blur_sigma[1]
