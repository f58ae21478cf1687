"""tools/cifar_batches.py: an ImageFolder CIFAR-10 tree to torchvision's cifar-10-batches-py layout.
tools/tinyimagenet_val.py: Tiny ImageNet's val/images + val_annotations.txt sorted into class folders.

The references are independent of the converter: PIL reads the test's own lossless PNGs, the pickles
are read back with the CIFAR page's recipe (pickle.load(f, encoding="bytes")) and by torchvision's
CIFAR10 class, and batches.meta is checked against the md5 torchvision holds for the original file.
The sorted Tiny ImageNet val/ is read back by common.load_dataset, each one-colour image under its label.
"""
import hashlib
import io
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torchvision

import common
from tools import cifar_batches

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


# --- tools/tinyimagenet_val.py: Tiny ImageNet's val/images + val_annotations.txt to class folders --------


WNIDS = ("n03444034", "n01443537", "n02124075")  # wnids.txt's order, not sorted


def tiny_imagenet(root, val_per_class=2, with_test=False):
    """A fake unpacked tiny-imagenet-200/: train/<wnid>/images/<wnid>_<k>.JPEG (+ <wnid>_boxes.txt),
    val/images/val_<k>.JPEG (lossless PNGs, as the classes interleave in the archive) with val/val_annotations.txt,
    and with_test the unlabelled test/images/. Each val image one colour: {colour (R, G, B): its label}, the label
    the index of its wnid in sorted order (train/'s class ids)."""
    from PIL import Image
    base = root / "tiny-imagenet-200"
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    for w in WNIDS:
        (base / "train" / w / "images").mkdir(parents=True)
        (base / "train" / w / f"{w}_boxes.txt").write_text("".join(f"{w}_{k}.JPEG\t0\t0\t63\t63\n" for k in range(2)))
        for k in range(2):
            Image.new("RGB", (64, 64), (k, 0, 0)).save(base / "train" / w / "images" / f"{w}_{k}.JPEG", format="PNG")
    val = [w for w in WNIDS for _ in range(val_per_class)]
    val = [val[i] for i in np.random.default_rng(0).permutation(len(val))]
    colours, lines = {}, []
    for k, w in enumerate(val):
        colours[(10 * k, 200 - 10 * k, 7)] = sorted(WNIDS).index(w)
        Image.new("RGB", (64, 64), (10 * k, 200 - 10 * k, 7)).save(base / "val" / "images" / f"val_{k}.JPEG",
                                                                   format="PNG")
        lines.append(f"val_{k}.JPEG\t{w}\t1\t2\t60\t61\n")
    (base / "val" / "val_annotations.txt").write_text("".join(lines))
    if with_test:
        (base / "test" / "images").mkdir(parents=True)
        for k in range(3):
            Image.new("RGB", (64, 64), (0, 0, 250)).save(base / "test" / "images" / f"test_{k}.JPEG", format="PNG")
    return base, colours


def tinyimagenet_val(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "tinyimagenet_val.py"), *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("link", [False, True])
def test_tinyimagenet_val_sorts_val_into_the_class_folders_the_loaders_read(link, tmp_path, monkeypatch):
    monkeypatch.setenv("EFFSSL_CACHE", str(tmp_path / "cache"))
    base, colours = tiny_imagenet(tmp_path)
    flags = ["--root", str(base)] + (["--link"] if link else [])
    for attempt in range(2):  # the second run finds every image in place and changes nothing
        r = tinyimagenet_val(*flags)
        assert r.returncode == 0 and r.stderr == "", r.stderr
        assert (f"{0 if attempt else 6} images " in r.stdout) and f"{6 if attempt else 0} already" in r.stdout
        assert sorted(os.listdir(base / "val")) == sorted(WNIDS) + ["val_annotations.txt"]  # no images/ left
        for w in WNIDS:
            names = os.listdir(base / "val" / w)
            assert len(names) == 2 and all(os.path.islink(base / "val" / w / n) == link for n in names)
        assert sorted(os.listdir(base / "val_images")) == [f"val_{k}.JPEG" for k in range(6)] if link \
            else not (base / "val_images").exists()
    ds = common.load_dataset("tinyimagenet", str(base), "test")
    assert (len(ds), ds.size, ds.num_classes) == (6, 64, 3)
    got = sorted((tuple(img[:, 0, 0].tolist()), int(y)) for img, y in zip(ds.images, ds.labels))
    assert got == sorted(colours.items())  # each image under its annotated wnid's train/ class id
    train = common.load_dataset("tinyimagenet", str(base), "train")
    assert len(train) == 6 and train.labels.tolist() == [0, 0, 1, 1, 2, 2]  # the same sorted wnids


def test_tinyimagenet_val_bad_input_is_one_error_line_and_exit_2(tmp_path):
    r = tinyimagenet_val("--root", str(tmp_path / "nowhere"))
    assert r.returncode == 2 and r.stdout == ""
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "val_annotations.txt not found" in err[0], err
    r = tinyimagenet_val()  # no --root
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--root" in r.stderr
    base, _ = tiny_imagenet(tmp_path)
    with open(base / "val" / "val_annotations.txt", "a") as f:
        f.write("val_99.JPEG\tn99999999\t0\t0\t1\t1\n")  # a class train/ does not have
    before = sorted(os.listdir(base / "val" / "images"))
    r = tinyimagenet_val("--root", str(base))
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and "val_annotations.txt line 7" in err[0], err
    assert sorted(os.listdir(base / "val" / "images")) == before  # every line checked before a move


def test_tinyimagenet_test_split_is_val_not_the_unlabelled_test_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFSSL_CACHE", str(tmp_path / "cache"))
    base, colours = tiny_imagenet(tmp_path, with_test=True)  # the archive holds test/images/, unlabelled
    assert tinyimagenet_val("--root", str(base)).returncode == 0
    ds = common.load_dataset("tinyimagenet", str(base), "test")
    assert (len(ds), ds.num_classes) == (6, 3)
