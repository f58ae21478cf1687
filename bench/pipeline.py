"""Benchmark: is the data pipeline or the training step the bottleneck?

1. Patches/s of our batched pipeline (common.sample_patches + common.augment on a uint8 image
   tensor, per-patch parameters) against a per-patch PIL pipeline written like the official
   EMP-SSL loader (dataset/aug.py: for each image, for each of n patches, a torchvision
   Compose of RandomResizedCrop(32, scale=(0.25, 0.25), ratio=(1, 1)), flip, colour jitter
   p=0.8, grayscale p=0.2, PIL Gaussian blur p=0.1, solarization p=0.1, ToTensor, Normalize,
   run in a DataLoader with one worker per core). Same images, same cores.
2. One full EMP-SSL training step (patches, augmentation, EMPNet forward, emp_loss, backward,
   LARS step) against the backbone's forward+backward alone on the same patches.

Ratios are measured side by side in one run; absolute numbers only with the machine printed.
Real CIFAR-10 when EFFSSL_CIFAR10 points to an ImageFolder tree (train/, test/), else the
synthetic set. Patches per CPU-second are printed beside patches/s: on a machine shared with
other jobs they still compare the two pipelines fairly. Defaults take 1-3 minutes on 2 cores;
    python bench/pipeline.py --threads 1 --workers 1      # per core
    python bench/pipeline.py --images 5000 --step-batch 20 --steps 5 --device cuda
"""
import argparse
import os
import platform
import resource
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import emp_ssl  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--images", type=int, default=600, help="images pushed through each pipeline")
    a("--batch-size", type=int, default=100, help="images per batch (EMP-SSL Sec. 3: 100)")
    a("--patches", type=int, default=20, help="patches per image (EMP-SSL Table 1: 20)")
    a("--patch-size", type=int, default=16, help="patch side (EMP-SSL CIFAR: 16)")
    a("--out-size", type=int, default=32, help="network input side (EMP-SSL CIFAR: 32)")
    a("--workers", type=int, default=None, help="DataLoader workers of the PIL pipeline (default: one per core)")
    a("--threads", type=int, default=None, help="torch threads of our pipeline and part 2 (default: one per core)")
    a("--split", default="test", choices=["train", "test"], help="CIFAR-10 split to take images from")
    a("--step-batch", type=int, default=2, help="images per training step in part 2 (x --patches patches)")
    a("--steps", type=int, default=2, help="timed training steps in part 2 (after one warm-up)")
    a("--arch", default="resnet18", help="backbone of part 2")
    a("--proj", default="4096-512", help="EMP-SSL projector of part 2")
    a("--device", default="cpu", help="device of our pipeline and of part 2 (cpu or cuda)")
    a("--seed", type=int, default=0)
    return p.parse_args()


def cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def machine(device):
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import PIL
    import torchvision
    line = (f"machine: {cores()} cores ({cpu}), torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"torchvision {torchvision.__version__}, PIL {PIL.__version__}, python {platform.python_version()}")
    if device.type == "cuda":
        line += f", GPU {torch.cuda.get_device_name(device)}"
    if hasattr(os, "getloadavg"):  # other jobs on the machine slow the wall-clock figures down
        line += f"; load average {os.getloadavg()[0]:.1f}"
    return line


def load_images(args):
    root = os.environ.get("EFFSSL_CIFAR10")
    if root:
        ds = common.load_dataset("cifar10", root, args.split, workers=cores())
        name = f"CIFAR-10 {args.split} ({root})"
    else:
        ds = common.synthetic_set("train", args.seed)
        name = "synthetic (set EFFSSL_CIFAR10 for real CIFAR-10)"
    idx = common.subset_indices(len(ds), args.images, args.seed)
    return ds.images[idx], ds.labels[idx], name


# --- the official EMP-SSL loader, per patch with PIL (tsb0601/EMP-SSL dataset/aug.py) --------


class GBlur:
    """PIL Gaussian blur with probability p, sigma uniform in [0.1, 2.0] (official GBlur)."""

    def __init__(self, p):
        self.p = p

    def __call__(self, img):
        from PIL import ImageFilter
        if np.random.rand() < self.p:
            return img.filter(ImageFilter.GaussianBlur(np.random.rand() * 1.9 + 0.1))
        return img


class Solarization:
    def __call__(self, img):
        from PIL import ImageOps
        return ImageOps.solarize(img)


class ContrastiveLearningViewGenerator:
    """n augmented patches of one PIL image, each through its own Compose call (official code)."""

    def __init__(self, num_patch, out_size, scale=0.25):
        self.num_patch, self.out_size, self.scale = num_patch, out_size, scale

    def __call__(self, x):
        import torchvision.transforms as T
        aug_transform = T.Compose([
            T.RandomResizedCrop(self.out_size, scale=(self.scale, self.scale), ratio=(1, 1)),
            T.RandomHorizontalFlip(p=0.5),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.2)], p=0.8),
            T.RandomGrayscale(p=0.2),
            GBlur(p=0.1),
            T.RandomApply([Solarization()], p=0.1),
            T.ToTensor(),
            T.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
        ])
        return [aug_transform(x) for _ in range(self.num_patch)]


class PILImages(torch.utils.data.Dataset):
    """HWC uint8 images decoded to PIL per item, as torchvision's CIFAR10 dataset does."""

    def __init__(self, images, labels, transform):
        self.data = images.permute(0, 2, 3, 1).contiguous().numpy()
        self.labels, self.transform = labels.tolist(), transform

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        from PIL import Image
        return self.transform(Image.fromarray(self.data[i])), self.labels[i]


def _seed_worker(worker_id):
    np.random.seed(torch.initial_seed() % 2 ** 32)  # the official GBlur draws from numpy


def cpu_children():
    """CPU seconds of this process's finished child processes (the DataLoader workers)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def pil_pipeline(images, labels, args, workers):
    """(patches/s in the steady state, patches/s in all, patches per CPU-second) of the
    per-patch PIL loader. The steady state leaves out the first batch, which pays for the
    worker start-up (the batches the workers prefetched meanwhile make it a generous figure).
    CPU-seconds count the workers and the main process: other jobs on a shared machine do not
    distort them."""
    scale = (args.patch_size / images.shape[-1]) ** 2  # 0.25: a 16 px square of the 32 px image
    ds = PILImages(images, labels, ContrastiveLearningViewGenerator(args.patches, args.out_size, scale))
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=workers, worker_init_fn=_seed_worker)
    t0, c0, k0 = time.perf_counter(), time.process_time(), cpu_children()
    t_first, n, total = None, 0, 0
    for data, _ in loader:
        data = torch.cat(data, dim=0)  # view-major [n*B, 3, 32, 32], as the official training loop
        total += data.shape[0]
        if t_first is None:
            t_first = time.perf_counter()
        else:
            n += data.shape[0]
    t1 = time.perf_counter()
    del loader  # the workers have been joined at the end of the epoch: their CPU time is counted
    cpu = time.process_time() - c0 + cpu_children() - k0
    return n / (t1 - t_first), total / (t1 - t0), total / cpu


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def our_pipeline(images, args, device):
    """(patches/s, patches per CPU-second) of sample_patches + augment on uint8 images held as
    one tensor on `device`."""
    aug = common.AugConfig(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))  # EMP-SSL A.1 defaults
    gen = common.make_generator(args.seed, 0, device)
    imgs = images.to(device)
    B, n = args.batch_size, args.patches

    def batch(idx):
        x, _ = common.sample_patches(imgs[idx], n, args.patch_size, args.out_size, gen)
        return common.augment(x, aug, gen)

    perm = torch.randperm(len(imgs), device=device)
    batch(perm[:B])  # warm-up
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    count = 0
    for s in range(0, len(imgs) - B + 1, B):
        count += batch(perm[s:s + B]).shape[0]
    sync(device)
    return count / (time.perf_counter() - t0), count / (time.process_time() - c0)


# --- part 2: a full EMP-SSL step vs the backbone alone ----------------------------------------


def training_step(images, args, device):
    """Median (wall s, CPU s) of a full EMP-SSL step and of the backbone's forward+backward on
    the same patches, interleaved so that load from other processes hits both; mean wall
    seconds of each part of the full step."""
    torch.manual_seed(args.seed)
    n, B = args.patches, args.step_batch
    model = emp_ssl.EMPNet(args.arch, "cifar", args.proj).to(device)
    opt = common.LARS(model.parameters(), lr=0.3, weight_decay=1e-4, eta=0.005)
    aug = common.AugConfig(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    gen = common.make_generator(args.seed, 0, device)
    imgs = images[:B].to(device)
    parts = dict.fromkeys(["patches+augment", "forward", "loss", "backward", "LARS step"], 0.0)

    def full_step():
        c0, marks = time.process_time(), [time.perf_counter()]

        def mark():
            sync(device)
            marks.append(time.perf_counter())

        x, _ = common.sample_patches(imgs, n, args.patch_size, args.out_size, gen)
        x = common.augment(x, aug, gen)
        mark()
        z = model(x)
        mark()
        loss, _, _ = emp_ssl.emp_loss(z.float().reshape(n, B, -1))
        mark()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        mark()
        opt.step()
        mark()
        for k, a, b in zip(parts, marks, marks[1:]):
            parts[k] += b - a
        return (marks[-1] - marks[0], time.process_time() - c0), x

    def backbone_step(x):
        sync(device)
        t, c = time.perf_counter(), time.process_time()
        model.zero_grad(set_to_none=True)
        model.backbone(x).square().mean().backward()  # forward + backward of the backbone only
        sync(device)
        return time.perf_counter() - t, time.process_time() - c

    _, x = full_step()  # warm-up
    backbone_step(x)
    for k in parts:
        parts[k] = 0.0
    full, bone = [], []
    for _ in range(args.steps):
        t, x = full_step()
        full.append(t)
        bone.append(backbone_step(x.detach()))
    med = lambda v: np.median(np.array(v), 0).tolist()  # noqa: E731
    return med(full), med(bone), {k: v / args.steps for k, v in parts.items()}


def main():
    args = parse_args()
    device = torch.device(args.device)
    if args.images < 2 * args.batch_size:
        common.fail(f"--images {args.images} must be at least twice --batch-size {args.batch_size}")
    workers = args.workers or cores()
    torch.set_num_threads(args.threads or cores())
    print(machine(device), flush=True)
    images, labels, name = load_images(args)
    print(f"images: {len(images)} of {name}, {images.shape[-1]} px uint8; batch {args.batch_size} images x "
          f"{args.patches} patches of {args.patch_size} px -> {args.out_size} px")

    ours, ours_cpu = our_pipeline(images, args, device)
    pil, pil_all, pil_cpu = pil_pipeline(images, labels, args, workers)
    where = f"{device.type}, {torch.get_num_threads()} threads" if device.type == "cpu" else device.type
    print("\n1. patch + augmentation pipeline                 patches/s  patches/CPU-s")
    print(f"   ours, batched ({where}){' ' * max(0, 29 - len(where))}{ours:10.0f}  {ours_cpu:10.0f}")
    print(f"   per-patch PIL, DataLoader, {workers} workers          {pil:10.0f}  {pil_cpu:10.0f}"
          f"   (steady state; {pil_all:.0f}/s with worker start-up)")
    print(f"   ratio ours / PIL                               {ours / pil:9.1f}x {ours_cpu / pil_cpu:9.1f}x"
          f"   (target >= 10x)", flush=True)

    full, bone, parts = training_step(images, args, device)
    p = args.patches * args.step_batch
    print(f"\n2. one EMP-SSL training step: {args.arch}, {args.step_batch} images x {args.patches} patches "
          f"= {p} patches of {args.out_size} px, projector {args.proj}, {device.type}")
    print("   median of the timed steps                                      wall ms    CPU ms")
    print(f"   full step (patches, augment, EMPNet, emp_loss, backward, LARS) {full[0] * 1e3:8.0f}  {full[1] * 1e3:8.0f}"
          f"   ({p / full[0]:.0f} patches/s)")
    print(f"   backbone forward+backward alone, same patches                 {bone[0] * 1e3:8.0f}  {bone[1] * 1e3:8.0f}"
          f"   ({p / bone[0]:.0f} patches/s)")
    print(f"   ratio full / backbone                                          {full[0] / bone[0]:8.2f}  {full[1] / bone[1]:8.2f}")
    print("   full step by part (mean wall ms): " + ", ".join(f"{k} {v * 1e3:.0f}" for k, v in parts.items()))


if __name__ == "__main__":
    common.run_cli(main, training=False)
