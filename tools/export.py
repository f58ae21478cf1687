"""Export a run's backbone as a plain state dict that torchvision's own model loads, no effssl needed.

    python tools/export.py --ckpt runs/demo --out resnet18-cifar.pt

The file holds the backbone's tensors under torchvision's key names, without a classifier (a run
trains none). The tool prints the Python lines (torch and torchvision only) that build the matching
torchvision model, stem and strides as common.backbone sets them, and load the file with strict=True;
it runs those very lines on the file before it says so.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402


def build_lines(arch, stem):
    """Python that builds `m`, the torchvision model common.backbone(arch, stem) is, classifier removed."""
    extra = ", stochastic_depth_prob=0.0" if arch.startswith("efficientnet") else ""  # as trained: no stochastic depth
    lines = ["import torch, torchvision", f"m = torchvision.models.{arch}(weights=None{extra})"]
    if arch.startswith("resnet"):
        if stem == "cifar":  # 3x3 stride-1 stem conv, no max-pool
            lines.append("m.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False); m.maxpool = torch.nn.Identity()")
        return lines + ["m.fc = torch.nn.Identity()  # no classifier was trained: m(x) is the pooled embedding"]
    if stem == "cifar":  # the stem conv and the first stride-2 block at stride 1
        lines += ["convs = [c for c in m.features.modules() if isinstance(c, torch.nn.Conv2d) and c.stride == (2, 2)]",
                  "for c in convs[:2]: c.stride = (1, 1)"]
    return lines + ["m.classifier = torch.nn.Identity()  # no classifier was trained: m(x) is the pooled embedding"]


def export(ckpt_path, out):
    """Write the backbone of the checkpoint at ckpt_path to out (atomically); return the lines that load it."""
    ckpt = common.load_checkpoint(ckpt_path)
    info = ckpt.get("probe") or ckpt.get("args") or {}
    arch, stem = info.get("arch"), info.get("stem")
    if arch not in common.ARCHS or stem not in ("cifar", "imagenet"):
        common.fail(f"checkpoint '{ckpt_path}' does not say which backbone it holds (arch {arch}, stem {stem})")
    state = {k: v.contiguous() for k, v in ckpt["backbone"].items()}
    lines = build_lines(arch, stem)
    scope = {}
    exec("\n".join(lines), scope)  # the printed lines, run here: they must take the file strictly
    try:
        scope["m"].load_state_dict(state, strict=True)
    except RuntimeError as e:
        common.fail(f"the backbone in '{ckpt_path}' does not fit torchvision's {arch} ({str(e).splitlines()[0][:100]})")
    tmp = f"{out}.tmp{os.getpid()}"
    try:
        torch.save(state, tmp)
        os.replace(tmp, out)
    except (OSError, RuntimeError) as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        common.fail(f"cannot write {out} ({getattr(e, 'strerror', None) or e})")
    return lines + [f"m.load_state_dict(torch.load({out!r}), strict=True)"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a run folder or its checkpoint.pt")
    p.add_argument("--out", required=True, help="the state dict to write (torch.save)")
    args = p.parse_args(argv)
    path = os.path.join(args.ckpt, "checkpoint.pt") if os.path.isdir(args.ckpt) else args.ckpt
    lines = export(path, args.out)
    print(f"# wrote {args.out}: the backbone of {path}; it loads into torchvision's model with:")
    print("\n".join(lines))


if __name__ == "__main__":
    common.run_cli(main, training=False)
