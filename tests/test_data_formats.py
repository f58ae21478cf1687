"""The data layouts other than an ImageFolder tree, on tiny fixtures this file writes: torchvision's
CIFAR-10 / CIFAR-100 python pickles (what --download gives), STL-10's binary files with their
unlabeled split, the unpacked Tiny ImageNet archive (its val/ sorted into class folders by
tools/tinyimagenet_val.py); each read through common.load_dataset (pixels and labels as written, and
as torchvision's own classes read them) and trained for one step. torchvision.datasets reads the
CIFAR and STL-10 files with an md5 check of the real data set's files, which a fixture cannot pass:
the tests that read them switch it off (fixture accept_fixtures); with it on, a foreign file is refused
before it is unpickled. Also: a decoded-image cache whose files changed is rebuilt, said."""
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import bag_ssl
import common
import emp_ssl
import multiaug_ssl
import npid_sqrtkl
from check_util import Payload
from tools import tinyimagenet_val


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny steps run fastest on one thread (two stall when other jobs load the 2 cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def accept_fixtures(monkeypatch):
    """torchvision's md5 checks of the CIFAR / STL-10 files (and of CIFAR's meta file) pass the fixtures."""
    for cls in (torchvision.datasets.CIFAR10, torchvision.datasets.CIFAR100, torchvision.datasets.STL10):
        monkeypatch.setattr(cls, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)


# --- fixtures in each layout -----------------------------------------------------------------------


def _pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_cifar(root, name, per_batch=3, n_test=4, seed=0):
    """torchvision's cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta) or
    cifar-100-python/ (train, test, meta): dicts of 'data' [N, 3072] uint8 rows (R, G, B planes of
    32 x 32) and 'labels' / 'fine_labels'. Returns {split: (images [N,3,32,32], labels [N])}."""
    rng = np.random.default_rng(seed)
    classes = 10 if name == "cifar10" else 100
    folder = os.path.join(root, "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    os.makedirs(folder)
    files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]} if name == "cifar10" \
        else {"train": ["train"], "test": ["test"]}
    want = {}
    for split, names in files.items():
        n = per_batch if split == "train" and name == "cifar10" else (5 * per_batch if split == "train" else n_test)
        imgs, labels = [], []
        for f in names:
            data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            lab = [int(v) for v in rng.integers(0, classes, n)]
            entry = {"data": data, "filenames": [f"img_{k}.png" for k in range(n)]}
            if name == "cifar10":
                entry.update(batch_label=f"batch {f}", labels=lab)
            else:
                entry.update(fine_labels=lab, coarse_labels=[v // 5 for v in lab])
            _pickle(os.path.join(folder, f), entry)
            imgs.append(torch.from_numpy(data.reshape(n, 3, 32, 32)))
            labels += lab
        want[split] = (torch.cat(imgs), torch.tensor(labels))
    meta = {"label_names": [f"c{k}" for k in range(10)]} if name == "cifar10" else \
        {"fine_label_names": [f"f{k}" for k in range(100)], "coarse_label_names": [f"g{k}" for k in range(20)]}
    _pickle(os.path.join(folder, "batches.meta" if name == "cifar10" else "meta"), meta)
    return want


def write_stl10(root, n_train=6, n_test=4, n_unlabeled=5, seed=0):
    """stl10_binary/{train,test}_{X,y}.bin and unlabeled_X.bin: each image 3 x 96 x 96 bytes stored
    column-major (byte [c, x, y] at c*9216 + x*96 + y), labels 1..10. Returns {split: (images, labels)}
    with images [N,3,96,96] row-major and labels 0..9 (-1 for unlabeled)."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "stl10_binary")
    os.makedirs(folder)
    want = {}
    for split, n in (("train", n_train), ("test", n_test), ("unlabeled", n_unlabeled)):
        img = rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)  # [N, C, row, column]
        np.ascontiguousarray(img.transpose(0, 1, 3, 2)).tofile(os.path.join(folder, f"{split}_X.bin"))
        lab = rng.integers(1, 11, n).astype(np.uint8)
        if split != "unlabeled":
            lab.tofile(os.path.join(folder, f"{split}_y.bin"))
        want[split] = (torch.from_numpy(img), torch.from_numpy(lab.astype(np.int64)) - 1 if split != "unlabeled"
                       else torch.full((n,), -1))
    return want


def write_tiny_imagenet(root, wnids=("n03444034", "n01443537", "n02124075"), per_class=4, val_per_class=2, seed=0):
    """tiny-imagenet-200/ as the archive unpacks: wnids.txt, train/<wnid>/images/<wnid>_<k>.JPEG (and
    <wnid>_boxes.txt), val/images/val_<k>.JPEG with val/val_annotations.txt, test/images/ unlabelled.
    64 px JPEGs. Returns {split: (file paths, labels)}, label = index of the wnid in sorted order, and
    "val_wnids": the wnid of each val image."""
    rng = np.random.default_rng(seed)
    base = os.path.join(root, "tiny-imagenet-200")
    order = {w: i for i, w in enumerate(sorted(wnids))}
    with open(os.path.join(os.makedirs(base) or base, "wnids.txt"), "w") as f:
        f.write("\n".join(wnids) + "\n")  # the archive's order, not sorted

    def jpeg(path):
        px = np.clip(rng.integers(0, 256, 3) + rng.integers(-40, 41, (64, 64, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(px).save(path, format="JPEG", quality=95)

    want = {"train": ([], []), "test": ([], [])}
    for w in sorted(wnids):  # train: grouped by class in sorted order, as an ImageFolder scan lists them
        os.makedirs(os.path.join(base, "train", w, "images"))
        with open(os.path.join(base, "train", w, f"{w}_boxes.txt"), "w") as f:
            for k in range(per_class):
                f.write(f"{w}_{k}.JPEG\t0\t0\t63\t63\n")
                jpeg(os.path.join(base, "train", w, "images", f"{w}_{k}.JPEG"))
                want["train"][0].append(os.path.join(base, "train", w, "images", f"{w}_{k}.JPEG"))
                want["train"][1].append(order[w])
    os.makedirs(os.path.join(base, "val", "images"))
    os.makedirs(os.path.join(base, "test", "images"))
    val = [w for w in wnids for _ in range(val_per_class)]
    val = [val[i] for i in rng.permutation(len(val))]  # classes interleaved, as in the archive
    with open(os.path.join(base, "val", "val_annotations.txt"), "w") as f:
        for k, w in enumerate(val):
            jpeg(os.path.join(base, "val", "images", f"val_{k}.JPEG"))
            f.write(f"val_{k}.JPEG\t{w}\t1\t2\t60\t61\n")
            want["test"][0].append(os.path.join(base, "val", "images", f"val_{k}.JPEG"))
            want["test"][1].append(order[w])
    for k in range(3):
        jpeg(os.path.join(base, "test", "images", f"test_{k}.JPEG"))
    return {**{s: (files, torch.tensor(labels)) for s, (files, labels) in want.items()}, "val_wnids": val}


def _pil(path):
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1)


# --- each layout read as written ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_pickles_read_as_written_and_as_torchvisions_class_reads_them(name, tmp_path, request):
    want = write_cifar(str(tmp_path), name)
    folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    with pytest.raises(common.UserError, match=f"cannot read {name} in .*{folder}.*--download") as e:
        common.load_dataset(name, str(tmp_path), "train")  # md5 sums of the full data set: refused, one line
    assert "\n" not in str(e.value)
    request.getfixturevalue("accept_fixtures")
    tv = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    for split in ("train", "test", "ssl"):
        ds = common.load_dataset(name, str(tmp_path), split)
        imgs, labels = want["test" if split == "test" else "train"]
        assert (ds.size, ds.num_classes, ds.images.dtype) == (32, 10 if name == "cifar10" else 100, torch.uint8)
        assert torch.equal(ds.images, imgs) and torch.equal(ds.labels, labels)
        ref = tv(str(tmp_path), train=split != "test")  # the same arrays as torchvision's class
        assert torch.equal(ds.images, torch.from_numpy(ref.data).permute(0, 3, 1, 2))
        assert ds.labels.tolist() == ref.targets


def cifar_error(root, capsys):
    """common.load_dataset('cifar10', root, 'train') under run_cli: (exit code, stderr lines)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        common.run_cli(lambda: common.load_dataset("cifar10", str(root), "train"), training=False)
    return e.value.code, capsys.readouterr().err.strip().splitlines()


def test_a_cifar_batch_that_would_run_code_or_is_torn_is_one_line(tmp_path, monkeypatch, capsys):
    """With torchvision's md5 check on (as in a real run), a foreign batch is refused before it is unpickled:
    the code it carries never runs. A torn batch is one line even where the check is off."""
    write_cifar(str(tmp_path), "cifar10")
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    _pickle(batch, {"data": np.zeros((1, 3072), np.uint8), "labels": [Payload(str(tmp_path / "ran"))]})
    code, err = cifar_error(tmp_path, capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: cannot read cifar10 in ") and "cifar-10-batches-py" in err[0], err
    assert "rerun with --download" in err[0] and not (tmp_path / "ran").exists()
    with open(batch, "wb") as f:
        f.write(b"\x80\x04\x95")  # a download cut short
    code, err = cifar_error(tmp_path, capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: cannot read cifar10"), err
    with monkeypatch.context() as m:  # torchvision unpickles it: still one line
        for name, obj in (("CIFAR10", torchvision.datasets.CIFAR10), ("cifar", torchvision.datasets.cifar)):
            m.setattr(obj, "_check_integrity" if name == "CIFAR10" else "check_integrity", lambda *a, **k: True)
        code, err = cifar_error(tmp_path, capsys)
        assert code == 2 and len(err) == 1 and err[0].startswith("error: cannot read cifar10"), err
    os.remove(batch)  # a missing batch
    code, err = cifar_error(tmp_path, capsys)
    assert code == 2 and len(err) == 1 and "cifar-10-batches-py" in err[0], err


def test_stl10_binary_reads_as_written_and_as_torchvisions_class_reads_it(tmp_path, request):
    want = write_stl10(str(tmp_path))
    with pytest.raises(common.UserError, match="cannot read stl10 in .*stl10_binary"):
        common.load_dataset("stl10", str(tmp_path), "train")  # md5 sums of the full data set
    request.getfixturevalue("accept_fixtures")
    for split, parts, tv_split in (("train", ["train"], "train"), ("test", ["test"], "test"),
                                   ("ssl", ["train", "unlabeled"], "train+unlabeled")):
        ds = common.load_dataset("stl10", str(tmp_path), split)
        assert (ds.size, ds.num_classes) == (96, 10)
        assert torch.equal(ds.images, torch.cat([want[p][0] for p in parts]))
        assert torch.equal(ds.labels, torch.cat([want[p][1] for p in parts]))  # unlabeled: -1
        ref = torchvision.datasets.STL10(str(tmp_path), split=tv_split)
        assert torch.equal(ds.images, torch.from_numpy(ref.data))
        assert torch.equal(ds.labels, torch.from_numpy(ref.labels).long())


def test_tiny_imagenet_archive_layout_labels_val_by_its_annotations(tmp_path, monkeypatch):
    """train/<wnid>/images/ as unpacked; val/ once tools/tinyimagenet_val.py has sorted it into class folders.
    (The archive's unlabelled test/ is left out: common.load_dataset would read it as the test split, see
    tests/test_tools.py::test_tinyimagenet_test_split_is_val_not_the_unlabelled_test_folder.)"""
    monkeypatch.setenv("EFFSSL_CACHE", str(tmp_path / "cache"))
    want = write_tiny_imagenet(str(tmp_path))
    data_dir = str(tmp_path / "tiny-imagenet-200")
    shutil.rmtree(os.path.join(data_dir, "test"))
    assert tinyimagenet_val.sort_val(data_dir) == (6, 0)
    val = os.path.join(data_dir, "val")
    want["test"] = ([os.path.join(val, w, os.path.basename(f)) for f, w in zip(want["test"][0], want["val_wnids"])],
                    want["test"][1])
    for split in ("train", "test"):
        ds = common.load_dataset("tinyimagenet", data_dir, split)
        files, labels = want[split]
        order = sorted(range(len(files)), key=lambda i: files[i])  # an ImageFolder scan: by class folder, name
        assert (len(ds), ds.size, ds.num_classes) == (len(files), 64, 3)  # the classes found
        assert torch.equal(ds.labels, labels[order])  # test: the val images by their annotations
        ref = torch.stack([_pil(files[i]) for i in order])
        assert (ds.images.int() - ref.int()).abs().max() <= 2  # the same JPEG decoded by PIL


# --- one training step on each layout -------------------------------------------------------------


FORMAT_RUNS = {  # layout -> (method, its smallest flags); each method once
    "cifar10": (emp_ssl, ["--patches", "2", "--patch-size", "8", "--out-size", "8", "--proj", "32-8"]),
    "cifar100": (multiaug_ssl, ["--views", "2", "--arch", "resnet18", "--pdim", "16", "--out-size", "16"]),
    "stl10": (bag_ssl, ["--arch", "resnet18", "--patch-size", "16", "--out-size", "16", "--proj", "32-8"]),
    "tinyimagenet": (npid_sqrtkl, ["--out-size", "16", "--proj", "16"]),
}


@pytest.mark.parametrize("name", list(FORMAT_RUNS))
def test_one_training_step_on_each_layout(name, tmp_path, monkeypatch, accept_fixtures):
    """--data-dir in the layout, --max-steps 1: the step trains on the fixture's own images."""
    monkeypatch.setenv("EFFSSL_CACHE", str(tmp_path / "cache"))
    data = str(tmp_path / "data")
    os.makedirs(data)
    if name in ("cifar10", "cifar100"):
        images = write_cifar(data, name)["train"][0]
    elif name == "stl10":
        want = write_stl10(data)
        images = torch.cat([want["train"][0], want["unlabeled"][0]])  # SSL on train + unlabeled (torchvision's order)
    else:
        images = torch.stack([_pil(f) for f in write_tiny_imagenet(data)["train"][0]])
        data = os.path.join(data, "tiny-imagenet-200")  # --data-dir is the unpacked folder itself
    seen = []
    real = common.Run.batches

    def spy(self):
        for imgs, labels, idx in real(self):
            seen.append((imgs, idx))
            yield imgs, labels, idx
    monkeypatch.setattr(common.Run, "batches", spy)
    method, flags = FORMAT_RUNS[name]
    out = tmp_path / "run"
    method.main(["--dataset", name, "--data-dir", data, "--batch-size", "4", "--epochs", "1", "--max-steps", "1",
                 "--workers", "0", "--out", str(out), *flags])
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 1 and ckpt["args"]["dataset"] == name
    assert len(seen) == 1 and len(seen[0][1]) == 4
    imgs, idx = seen[0]
    assert (imgs.int() - images[idx].int()).abs().max() <= 2  # the fixture's images (JPEG: PIL's decode)


# --- the decoded cache of an ImageFolder tree -----------------------------------------------------------


def test_a_changed_image_file_makes_the_decoded_cache_stale_rebuilt_and_said(tmp_path, monkeypatch, capsys):
    """Same count, same labels, one file rewritten with new pixels: the cache is rebuilt (one
    stderr line), not served; an unchanged tree is served from it silently; a torn cache is decoded again."""
    monkeypatch.setenv("EFFSSL_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "data"
    g = torch.Generator().manual_seed(0)
    paths = []
    for c in ("a", "b"):
        os.makedirs(root / "train" / c)
        for k in range(2):
            paths.append(str(root / "train" / c / f"{k}.png"))
            torchvision.io.write_png(torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=g), paths[-1])
    decoded = []
    real = common.load_files
    monkeypatch.setattr(common, "load_files", lambda files, *a, **k: decoded.append(len(files)) or real(files, *a, **k))

    def load():
        capsys.readouterr()
        ds = common.load_dataset("folder", str(root), "train", image_size=16)
        return ds, capsys.readouterr().err.strip().splitlines()

    first, err = load()
    assert decoded == [4] and err == []
    again, err = load()
    assert decoded == [4] and err == [] and torch.equal(again.images, first.images)  # served from the cache
    new = torch.full((3, 16, 16), 7, dtype=torch.uint8)
    torchvision.io.write_png(new, paths[1])
    st = os.stat(paths[1])
    os.utime(paths[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a later mtime even on a coarse clock
    changed, err = load()
    assert decoded == [4, 4] and torch.equal(changed.images[1], new)
    assert torch.equal(changed.images[[0, 2, 3]], first.images[[0, 2, 3]])
    assert len(err) == 1 and "stale" in err[0] and str(root / "train") in err[0], err
    _, err = load()
    assert decoded == [4, 4] and err == []  # the rebuilt cache is current
    cache = os.path.join(tmp_path, "cache", os.listdir(tmp_path / "cache")[0])
    with open(cache, "wb") as f:
        f.write(b"torn")
    torn, err = load()
    assert decoded == [4, 4, 4] and err == []  # not served: decoded again (silently) and rewritten
    assert torch.equal(torn.images, changed.images)
    _, err = load()
    assert decoded == [4, 4, 4] and err == []  # the rewritten cache is served
