"""tools/cifar_batches.py: an ImageFolder CIFAR-10 tree to torchvision's cifar-10-batches-py layout.

The references are independent of the converter: PIL reads the test's own lossless PNGs, the pickles
are read back with the CIFAR page's recipe (pickle.load(f, encoding="bytes")) and by torchvision's
CIFAR10 class, and batches.meta is checked against the md5 torchvision holds for the original file.
"""
import hashlib
import io
import os
import pickle

import numpy as np
import pytest
import torchvision

import common
from tools import cifar_batches

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def image_folder(root, per_class, classes=CLASSES, seed=0):
    """root/{train,test}/<class>/*.png of random 32x32 RGB images:
    {(split, 'class/name.png'): (pixels HWC, label)}."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    truth = {}
    for split, n in (("train", per_class), ("test", max(1, per_class // 2))):
        for label, c in enumerate(classes):
            os.makedirs(root / split / c, exist_ok=True)
            for i in range(n):
                px = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(px).save(root / split / c / f"{i:04d}.png")  # lossless: the pixels are known
                truth[(split, f"{c}/{i:04d}.png")] = (px, label)
    return truth


def test_converted_batches_read_back_as_the_same_pixels_and_labels(tmp_path, monkeypatch):
    truth = image_folder(tmp_path / "folder", per_class=2)  # 20 train, 10 test images
    made = cifar_batches.convert(str(tmp_path / "folder"), str(tmp_path / "out"), workers=0)
    assert made["train"] == 20 and made["test"] == 10
    base = tmp_path / "out" / "cifar-10-batches-py"
    seen = {}
    for split, names in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        for name in names:
            with open(base / name, "rb") as f:
                d = pickle.load(f, encoding="bytes")  # the CIFAR page's recipe: bytes keys
            assert d[b"data"].dtype == np.uint8 and d[b"data"].shape == (4 if split == "train" else 10, 3072)
            for row, label, fname in zip(d[b"data"], d[b"labels"], d[b"filenames"]):
                seen[(split, fname.decode())] = (row.reshape(3, 32, 32).transpose(1, 2, 0), label)  # CHW rows
    assert seen.keys() == truth.keys()
    for key, (px, label) in truth.items():
        assert np.array_equal(seen[key][0], px), key
        assert seen[key][1] == label, key
    with open(base / "batches.meta", "rb") as f:
        assert pickle.load(f, encoding="bytes")[b"label_names"] == [c.encode() for c in CLASSES]

    # torchvision's own reader (encoding latin1, str keys), its md5 checks bypassed
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)  # meta at toy size
    for train, split in ((True, "train"), (False, "test")):
        ds = torchvision.datasets.CIFAR10(str(tmp_path / "out"), train=train)
        assert ds.classes == CLASSES and len(ds) == made[split]
        got = sorted((px.tobytes(), y) for px, y in zip(ds.data, ds.targets))
        want = sorted((px.tobytes(), y) for (s, _), (px, y) in truth.items() if s == split)
        assert got == want


def test_full_size_meta_is_the_original_file_byte_for_byte():
    """batches.meta written as cPickle wrote it has the md5 torchvision checks for the original."""
    buf = io.BytesIO()
    cifar_batches.Py2Pickler(buf, protocol=2).dump(
        {"num_cases_per_batch": 10000, "label_names": CLASSES, "num_vis": 3072})
    assert hashlib.md5(buf.getvalue()).hexdigest() == torchvision.datasets.CIFAR10.meta["md5"]


@pytest.mark.parametrize("case", ["missing", "foreign"])
def test_a_missing_or_foreign_folder_is_one_line_and_exit_2(tmp_path, capsys, case):
    data = tmp_path / "folder"
    if case == "foreign":
        image_folder(data, per_class=1, classes=["cats", "dogs"])
    with pytest.raises(SystemExit) as e:
        common.run_cli(lambda: cifar_batches.main(["--data", str(data), "--out", str(tmp_path / "out")]),
                       training=False)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(data) in err[0], err
    assert ("not a CIFAR-10" in err[0]) if case == "foreign" else True
    assert not (tmp_path / "out").exists()
