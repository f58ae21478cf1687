"""Benchmark: images/s of the in100 loader per DataLoader worker on this CPU, and an ESTIMATE of
how many workers each method's in100 recipe needs to keep one H100 fed.

1. A tree of ImageNet-like JPEGs (500x375, some 375x500 and 500x333, quality 90, about 100 KB
   each as ImageNet's ~110 KB average; smooth colour fields plus texture at several scales, so
   the entropy decoder has real work) is generated once under runs/in100_bench/ (git-ignored).
2. The in100 loader as the method scripts run it: common.epoch_batches on a file ImageSet, each
   worker decoding its batch with common.load_files (decode, resize the short side to 256, centre
   crop 224), with 1 and 2 workers; steady state (first batch excluded: worker start-up) and the
   whole pass. Beside it, one core decoding in-process (the rate a worker can reach at best).
3. Workers per GPU = images/s the GPU consumes / images/s of one worker. No GPU was at hand, so
   the GPU side is an ASSUMPTION, not a measurement: forward+backward throughput at 224 px, bf16
   autocast, channels_last, of ResNet-18 = 6,000 and ResNet-50 = 3,000 images/s on one H100
   (ResNet-50: about NVIDIA's published mixed-precision A100 training throughput, ~2,500-3,000
   images/s, which an H100 should at least match in plain PyTorch; ResNet-18: 2.25x fewer FLOPs
   than ResNet-50, taken as 2x the throughput). A step of a recipe with V views (patches) of 224
   px per image then consumes GPU_images_per_s / V images/s. Once a GPU has measured them (the
   backbone's forward+backward at 224 px; bench/gpu.py times CIFAR-size patches only), pass the
   figures: --gpu resnet18=...,resnet50=...
4. For docs/in100.md: bytes of activations saved for backward per 224 px view (CPU, float32,
   with and without --grad-checkpoint), from which the recipes' GPU memory is estimated.

    python bench/in100_loader.py                      # about 40 s on 2 cores, the tree included
    python bench/in100_loader.py --images 2000 --workers 1,2,4,8
"""
import argparse
import math
import os
import platform
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402

# each script's in100 defaults (--dataset in100): global batch, views of 224 px per image, backbone
RECIPES = {
    "emp_ssl": dict(batch=100, views=200, arch="resnet18", epochs=10),
    "bag_ssl": dict(batch=1024, views=2, arch="resnet50", epochs=400),
    "multiaug_ssl": dict(batch=128, views=2, arch="resnet18", epochs=100),
    "npid_sqrtkl": dict(batch=512, views=1, arch="resnet18", epochs=400),
}
IN100_TRAIN = 126689  # images in the in100 train split


def parse_args():
    """The bench's flags (sizes of the run, the assumed GPU throughput)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--images", type=int, default=600, help="JPEGs in the generated tree")
    a("--dir", default=os.path.join(ROOT, "runs", "in100_bench"), help="where the tree is generated (reused)")
    a("--workers", default="1,2", help="comma list of DataLoader worker counts")
    a("--batch-size", type=int, default=32, help="images per worker batch")
    a("--gpu", default="resnet18=6000,resnet50=3000",
      help="ASSUMED H100 forward+backward images/s at 224 px per backbone (no GPU measured)")
    return p.parse_args()


def fake_photo(rng, w, h):
    """A 'photo' JPEG decoders work on like a real one: smooth colour plus texture at four scales."""
    from PIL import Image
    x = np.full((h, w, 3), 128, np.float32)
    for (gw, gh), amp in (((6, 5), 50), ((31, 24), 25), ((125, 94), 25), ((250, 188), 20), ((w, h), 10)):
        g = rng.normal(0, amp, (gh, gw, 3)).astype(np.float32)
        x += np.stack([np.asarray(Image.fromarray(g[..., c]).resize((w, h), Image.BICUBIC)) for c in range(3)], -1)
    return Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))


def make_tree(root, n):
    """n JPEGs in 10 class folders, ImageNet-like sizes; reused when already there."""
    files = [os.path.join(root, f"c{i % 10}", f"img{i:05d}.JPEG") for i in range(n)]
    if all(os.path.exists(f) for f in files):
        return files
    rng = np.random.default_rng(0)
    sizes = [(500, 375)] * 6 + [(375, 500)] * 2 + [(500, 333)] * 2  # ImageNet's common shapes
    for i, f in enumerate(files):
        os.makedirs(os.path.dirname(f), exist_ok=True)
        fake_photo(rng, *sizes[i % len(sizes)]).save(f, "JPEG", quality=90)
    return files


def loader_rate(files, workers, batch):
    """(steady images/s after the first batch, images/s of the whole pass) through epoch_batches."""
    ds = common.ImageSet(torch.zeros(len(files), dtype=torch.long), 10, 224, files=files)
    t0 = time.perf_counter()
    n, t1 = 0, None
    for imgs, _, _ in common.epoch_batches(ds, batch, 0, 0, workers=workers):
        assert imgs.shape[1:] == (3, 224, 224)
        if t1 is None:
            t1, n0 = time.perf_counter(), len(imgs)
        n += len(imgs)
    t2 = time.perf_counter()
    return (n - n0) / (t2 - t1), n / (t2 - t0)


def inprocess_rate(files):
    """images/s of one core decoding + resize 256 + centre crop 224, no DataLoader."""
    t0 = time.perf_counter()
    for f in files:
        common.decode_image(f, 224)
    return len(files) / (time.perf_counter() - t0)


def saved_bytes(arch, checkpointed):
    """Bytes saved for backward per 224 px image (float32, batch 2, distinct storages only)."""
    torch.manual_seed(0)
    net = common.backbone(arch, "imagenet").train()
    x = torch.randn(2, 3, 224, 224, requires_grad=False)
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    if not checkpointed:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            net(x).sum()
        return sum(seen.values()) / 2
    # --grad-checkpoint keeps the stem's activations and each block's input; backward recomputes
    # one block at a time, so add the largest block's own activations
    b = net
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        h = b.maxpool(b.relu(b.bn1(b.conv1(x))))
    kept, peak_block = sum(seen.values()), 0
    for layer in (b.layer1, b.layer2, b.layer3, b.layer4):
        for block in layer:
            kept += h.untyped_storage().nbytes()
            seen = {}
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                h = block(h)
            peak_block = max(peak_block, sum(seen.values()))
    return (kept + peak_block) / 2


def main():
    """Generate or reuse the tree, time the loader, print the worker table and activation sizes."""
    args = parse_args()
    torch.set_num_threads(1)  # as in a DataLoader worker
    gpu = {k: float(v) for k, v in (kv.split("=") for kv in args.gpu.split(","))}
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"machine: {cpu}, {os.cpu_count()} cores, load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}; "
          f"torch {torch.__version__}")
    t0 = time.perf_counter()
    files = make_tree(args.dir, args.images)
    mb = sum(os.path.getsize(f) for f in files) / len(files) / 1e3
    print(f"tree: {len(files)} JPEGs under {args.dir}, mean {mb:.0f} KB "
          f"(made or reused in {time.perf_counter() - t0:.0f} s)")

    one = inprocess_rate(files[:200])
    print(f"\none core in-process, decode + resize 256 + centre crop 224: {one:.0f} images/s")
    per_worker = []
    for w in (int(v) for v in args.workers.split(",")):
        steady, whole = loader_rate(files, w, args.batch_size)
        per_worker.append(steady / w)
        print(f"epoch_batches, {w} worker(s), batch {args.batch_size}: {steady:.0f} images/s steady "
              f"({steady / w:.0f} per worker), {whole:.0f} images/s for the whole pass incl. start-up")
    if os.cpu_count() and os.cpu_count() < max(int(v) for v in args.workers.split(",")) + 1:
        print("  (more workers than free cores: the per-worker figure of the largest count is pessimistic)")
    rate = per_worker[0]  # one worker on an otherwise idle core

    print("\nESTIMATE (GPU side assumed, not measured): H100 forward+backward images/s at 224 px: "
          + ", ".join(f"{k} {v:.0f}" for k, v in gpu.items()))
    print(f"loader side measured above: {rate:.0f} images/s per worker (1 worker)")
    print(f"{'recipe (in100 defaults)':<34}{'views':>6}{'arch':>10}{'GPU img/s':>11}{'step s':>8}"
          f"{'worker img/s':>14}{'workers/GPU':>13}{'epoch min':>11}{'run h, 1 GPU':>14}{'4 GPUs':>8}")
    for name, r in RECIPES.items():
        need = gpu[r["arch"]] / r["views"]  # images/s one GPU consumes
        supply = rate
        step = r["batch"] * r["views"] / gpu[r["arch"]]
        epoch = IN100_TRAIN / need / 60  # GPU-bound: the loader keeps up
        print(f"{name:<34}{r['views']:>6}{r['arch']:>10}{need:>11.0f}{step:>8.2f}{supply:>14.1f}"
              f"{math.ceil(need / supply):>13}{epoch:>11.1f}{epoch * r['epochs'] / 60:>14.1f}"
              f"{epoch * r['epochs'] / 60 / 4:>8.1f}")
    print("(step s: one GPU's step at the default global batch. epoch and run: GPU-bound, with as many\n"
          " workers as the table asks; 4 GPUs: perfect scaling assumed, all-reduce and probes not counted.)")

    print("\nactivations saved for backward per 224 px view, float32 (bf16 autocast: about half):")
    for arch in ("resnet18", "resnet50"):
        plain, ck = saved_bytes(arch, False), saved_bytes(arch, True)
        print(f"  {arch}: {plain / 2**20:.1f} MiB plain, {ck / 2**20:.1f} MiB with --grad-checkpoint")
    print(f"\nmachine: {cpu}, {os.cpu_count()} cores, load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
