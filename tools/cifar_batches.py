"""Convert a CIFAR-10 ImageFolder tree (train/<class>/*.jpg, test/<class>/*.jpg) to torchvision's
`cifar-10-batches-py` layout, the files of the original CIFAR-10 python release (Krizhevsky 2009):

    OUT/cifar-10-batches-py/data_batch_1 .. data_batch_5   10,000 training images each
    OUT/cifar-10-batches-py/test_batch                      the 10,000 test images
    OUT/cifar-10-batches-py/batches.meta                    label_names, num_cases_per_batch, num_vis

Each batch is a pickle of a dict: data (uint8 [N, 3072], one image a row: the red plane, then green,
then blue, each row-major), labels (N ints), batch_label, filenames. The strings are written as
Python 2 wrote them, as the original files hold them: `pickle.load(f, encoding="bytes")` gives the
keys b'data', b'labels', ... (the CIFAR page's recipe) and torchvision's `encoding="latin1"` str keys.
Images are decoded as the effssl loaders decode them (common.load_files), so these files hold the
very pixels our own runs train on. Within a split, images are stored in a fixed seeded order (all
classes mixed in every batch, as in the original); `filenames` keeps each image's path under its split.

torchvision's CIFAR10 checks the md5 of the original files, which converted JPEG pixels cannot match:
a reader must bypass the check of the batches (`CIFAR10._check_integrity`); batches.meta, written as
cPickle wrote it, passes its own check at full size (with --limit, `torchvision.datasets.cifar.
check_integrity` must be bypassed too). bench/emp_control.py does both in its edited copy of the
EMP-SSL authors' code.

    python tools/cifar_batches.py --data cache/cifar10 --out cache/cifar10-batches
    python tools/cifar_batches.py --data cache/cifar10 --out /tmp/toy --limit 500   # toy size
"""
import os
import pickle
import struct
import sys

import numpy as np
import torch
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
from common import fail  # noqa: E402

# torchvision's (and the original release's) class order: label i is CLASSES[i]
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
BASE = "cifar-10-batches-py"
TRAIN_BATCHES = 5


class Py2Pickler(pickle._Pickler):
    """Protocol 2 as Python 2's cPickle wrote the original CIFAR-10 files: every str and bytes a
    Python 2 string (SHORT_BINSTRING / BINSTRING), so that the reader's `encoding` decides whether
    they come back as str (latin1, torchvision) or bytes (encoding="bytes"); memo slots from 1.
    At full size batches.meta comes out byte for byte the original (its md5 passes torchvision's check)."""

    dispatch = dict(pickle._Pickler.dispatch)

    def memoize(self, obj):
        if self.fast:
            return
        idx = len(self.memo) + 1  # cPickle counts from 1
        self.write(self.put(idx))
        self.memo[id(obj)] = idx, obj

    def save_py2_string(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else bytes(obj)
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[str] = save_py2_string
    dispatch[bytes] = save_py2_string


def write_pickle(obj, path):
    """obj pickled as the original release's files are (Py2Pickler), written atomically."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            Py2Pickler(f, protocol=2).dump(obj)
        os.replace(tmp, path)
    except OSError as e:
        fail(f"cannot write {path} ({e.strerror})")


def read_split(root, limit=None, seed=0, workers=4):
    """(uint8 images [N,3,32,32], labels [N] in CLASSES' order, file names relative to root) of one
    split folder, in a fixed seeded order; `limit` keeps the first N of that order."""
    if not os.path.isdir(root):
        fail(f"'{root}' not found: expected a CIFAR-10 ImageFolder split (one sub-folder per class)")
    try:  # torchvision's ImageFolder scan, as common's loaders: class folders sorted, images below them
        classes, class_to_idx = find_classes(root)
    except FileNotFoundError:  # no class folder at all
        classes, class_to_idx = [], {}
    samples = make_dataset(root, class_to_idx, IMG_EXTENSIONS, allow_empty=True)
    files, labels = [f for f, _ in samples], [y for _, y in samples]
    if sorted(classes) != sorted(CLASSES):
        fail(f"'{root}' is not a CIFAR-10 split: its class folders are {classes[:12]}, expected "
             f"{', '.join(CLASSES)}")
    if not files:
        fail(f"no images found under '{root}'")
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed))
    if limit:
        order = order[:limit]
    files = [files[i] for i in order.tolist()]
    to_cifar = {i: CLASSES.index(c) for i, c in enumerate(classes)}
    labels = [to_cifar[labels[i]] for i in order.tolist()]
    first = common.decode_image(files[0], None)
    if tuple(first.shape) != (3, 32, 32):
        fail(f"'{files[0]}' is {first.shape[-1]}x{first.shape[-2]} px, not a 32x32 CIFAR-10 image")
    images = common.load_files(files, 32, workers)
    names = [os.path.relpath(f, root) for f in files]
    return images, torch.tensor(labels), names


def batch_dict(images, labels, names, batch_label):
    """One batch as the original files hold it (data: [N, 3072] uint8, planes R, G, B, row-major)."""
    return {"batch_label": batch_label, "labels": [int(v) for v in labels],
            "data": np.ascontiguousarray(images.reshape(len(images), -1).numpy()), "filenames": list(names)}


def convert(data, out, limit=None, seed=0, workers=4):
    """Write OUT/cifar-10-batches-py from the ImageFolder tree `data`: {folder, train, test} (image counts)."""
    if not (os.path.isdir(os.path.join(data, "train")) and os.path.isdir(os.path.join(data, "test"))):
        fail(f"'{data}' is not a CIFAR-10 ImageFolder tree (train/<class>/*.jpg, test/<class>/*.jpg)")
    train = read_split(os.path.join(data, "train"), limit, seed, workers)
    test = read_split(os.path.join(data, "test"), limit, seed + 1, workers)
    if len(train[0]) < TRAIN_BATCHES:
        fail(f"{len(train[0])} training images cannot fill {TRAIN_BATCHES} batches")
    dst = os.path.join(out, BASE)
    try:
        os.makedirs(dst, exist_ok=True)
    except OSError as e:
        fail(f"cannot create {dst} ({e.strerror})")
    parts = np.array_split(np.arange(len(train[0])), TRAIN_BATCHES)
    for b, idx in enumerate(parts, 1):
        idx = torch.from_numpy(idx)
        write_pickle(batch_dict(train[0][idx], train[1][idx], [train[2][i] for i in idx.tolist()],
                                f"training batch {b} of {TRAIN_BATCHES}"), os.path.join(dst, f"data_batch_{b}"))
    write_pickle(batch_dict(*test, "testing batch 1 of 1"), os.path.join(dst, "test_batch"))
    write_pickle({"num_cases_per_batch": len(parts[0]), "label_names": list(CLASSES), "num_vis": 3072},
                 os.path.join(dst, "batches.meta"))
    print(f"wrote {dst}: {len(train[0])} training images in {TRAIN_BATCHES} batches, {len(test[0])} test images")
    return {"folder": dst, "train": len(train[0]), "test": len(test[0])}


def main(argv=None):
    p = common.ArgParser(description=__doc__)
    p.add_argument("--data", required=True, help="CIFAR-10 ImageFolder tree holding train/ and test/")
    p.add_argument("--out", required=True, help="folder to hold cifar-10-batches-py/ (torchvision's root)")
    p.add_argument("--limit", type=common.COUNT, default=None,
                   help="keep N images of each split (toy sizes; at least 5 for the training batches)")
    p.add_argument("--seed", type=common.SEED, default=0, help="seed of the image order within each split")
    p.add_argument("--workers", type=common.COUNT0, default=4, help="decoding threads")
    args = p.parse_args(argv)
    convert(args.data, args.out, args.limit, args.seed, args.workers)


if __name__ == "__main__":
    common.run_cli(main, training=False)
