"""ImageNet-100 end to end on a tiny fake ImageNet: `tools/build_in100.py`, then each method's
in100 recipe under 2-process torchrun (gloo, CPU) for 2 steps, emp_ssl's resume to step 3, and a k-NN
probe of the checkpoint; a corrupt JPEG in the tree is reported once and replaced, not fatal.
emp_ssl's resumed run is compared weight for weight with 3 steps run without a stop (the
file-backed loader with workers), and its probe's k-NN numbers with a direct computation.

Only the batch, patches/views and steps are shrunk (bag_ssl also its projector, see BAG_SMALL).
Wall time of this file on this 2-core AMD EPYC, shared with other jobs: 161 s (pytest's count;
163 s for the whole command, 253 CPU-seconds; load average 2.3 when it started), the four
pipelines two at a time (fixture `runs`); one at a time it took 211 s. Most of it is start-up:
8 torchrun launches (each about 16 CPU-seconds of imports before any step) and 4 probes;
npid_sqrtkl's Feature Calibrate forwards all 200 training images once on rank 0. The uninterrupted
emp_ssl run and the two checks on it added 29 s (236 s against 207 s without them, run one after
the other, load average 6-7 from other jobs).
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import emp_ssl
from tools import build_in100 as in100_tool
from check_util import assert_state_dicts_close

pytestmark = pytest.mark.slow  # the full run only (python -m pytest -q --full)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXTRA = "n99999999"  # a class folder outside in100: build-in100 must leave it out
TRAIN_PER_CLASS, VAL_PER_CLASS = 2, 1
BATCH = 4  # global; 2 per rank

# bag_ssl's in100 default is ResNet-50 + an 8192-8192-8192 projector (BagSSL App. C.2; Chen,
# Bardes, Li, LeCun 2023, arXiv:2206.08954), about 175M parameters. Measured here with it: one
# 2-step torchrun took 101 s (load average 5), 5.4 GB resident per rank, a 1.4 GB checkpoint; with
# the resume and the probe that alone would be about the whole budget. So the projector is shrunk
# for this test only; the backbone keeps its in100 default (ResNet-50, imagenet stem).
BAG_SMALL = ["--proj", "512-512-512"]

METHODS = {
    "emp_ssl": ["--patches", "2"],
    "bag_ssl": ["--patches", "2", *BAG_SMALL],
    "multiaug_ssl": ["--views", "2"],
    "npid_sqrtkl": [],
}
PROBE = ["--probe", "knn", "--subset", "12", "--test-subset", "6", "--knn-k", "5", "--patches", "1", "--workers", "0"]


# --- the fake ImageNet ---------------------------------------------------------------------------


def _image(rng, kind):
    """A small PIL image of a random size and aspect ratio, in one of ImageNet's odd formats."""
    from PIL import Image
    w, h = (int(v) for v in rng.integers(40, 91, 2))
    base = rng.integers(0, 256, 3)
    px = np.clip(base + rng.integers(-60, 61, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(px)
    if kind == "grey":
        return img.convert("L"), "JPEG"
    if kind == "cmyk":
        return img.convert("CMYK"), "JPEG"
    if kind == "png_alpha":  # a PNG with alpha named .JPEG, as a few ImageNet train files are
        return Image.fromarray(np.dstack([px, rng.integers(0, 256, (h, w), dtype=np.uint8)]), "RGBA"), "PNG"
    return img, "JPEG"


def make_fake_imagenet(root):
    """train/<wnid>/<wnid>_<k>.JPEG and val/<wnid>/ILSVRC2012_val_<k>.JPEG for the 100 in100
    classes plus EXTRA; formats cycle through RGB, grey, CMYK and PNG-with-alpha. Returns
    {path relative to root: format}."""
    rng = np.random.default_rng(0)
    kinds = ["rgb", "grey", "cmyk", "png_alpha"]
    k, made = 0, {}
    for split, per in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for c in sorted(in100_tool.IN100_CLASSES + [EXTRA]):
            os.makedirs(os.path.join(root, split, c))
            for i in range(per):
                img, fmt = _image(rng, kinds[k % len(kinds)])
                name = f"{c}_{i}.JPEG" if split == "train" else f"ILSVRC2012_val_{k:08d}.JPEG"
                img.save(os.path.join(root, split, c, name), format=fmt, quality=90)
                made[os.path.join(split, c, name)] = kinds[k % len(kinds)]
                k += 1
    return made


def scan_folder(root):
    """(classes, files, labels) of an ImageFolder tree, scanned as common's loaders scan it (torchvision's)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
    classes, class_to_idx = find_classes(root)
    samples = make_dataset(root, class_to_idx, IMG_EXTENSIONS)
    return classes, [f for f, _ in samples], [c for _, c in samples]


def first_file_read(train_dir):
    """The file of index perm[0] of epoch 0 (seed 0): the first image rank 0 decodes in training,
    found with epoch_batches itself on a stand-in in-memory set of the same length."""
    _, files, labels = scan_folder(train_dir)
    stand_in = common.ImageSet(torch.tensor(labels), 100, 1, images=torch.zeros(len(files), 1, 1, 1))
    _, _, idx = next(common.epoch_batches(stand_in, BATCH, 0, 0, rank=0, world=2))
    return files[idx[0]]


@pytest.fixture(scope="module")
def in100(tmp_path_factory):
    """The fake ImageNet and its in100 tree, built once; one train file truncated (corrupt)."""
    base = tmp_path_factory.mktemp("in100")
    fake, out = str(base / "imagenet"), str(base / "in100")
    kinds = make_fake_imagenet(fake)
    r = run(["tools/build_in100.py", "--imagenet", fake, "--out", out], timeout=120)
    assert r.returncode == 0, r.stderr
    bad = first_file_read(os.path.join(out, "train"))
    with open(bad, "rb") as f:
        data = f.read()
    with open(os.path.realpath(bad), "wb") as f:  # a download cut short: half of a valid JPEG
        f.write(data[:len(data) // 2])
    return {"fake": fake, "out": out, "bad": bad, "build": r, "kinds": kinds}


# --- running the scripts ---------------------------------------------------------------------------


def run(args, timeout=300):
    """Run python <args> in the repository root with one intra-op thread per process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{args[:4]} ran past {timeout}s: {str(e.stderr)[-2000:]}")


def torchrun(method, data, out, extra):
    """The method's in100 recipe under 2-process torchrun, only batch/patches/steps shrunk."""
    return run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", f"{method}.py",
                "--dataset", "in100", "--data-dir", data, "--workers", "2", "--batch-size", str(BATCH),
                "--epochs", "1", "--log-every", "1", "--out", out, *METHODS[method], *extra])


def warnings_for(path, stderr):
    """The loader's unreadable-file lines that name path."""
    return [line for line in stderr.splitlines() if line.startswith("warning: cannot decode") and path in line]


# --- tests ---------------------------------------------------------------------------------------------


def test_build_in100_links_the_100_classes_of_both_splits(in100):
    """Both splits get exactly the 100 CMC classes, as symlinks, read as file-backed 224 px sets."""
    assert "100 classes linked" in in100["build"].stdout
    for split, per in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        d = os.path.join(in100["out"], split)
        assert sorted(os.listdir(d)) == sorted(in100_tool.IN100_CLASSES)  # EXTRA left out
        assert all(os.path.islink(os.path.join(d, c)) for c in os.listdir(d))
        ds = common.load_dataset("in100", in100["out"], "train" if split == "train" else "test")
        assert (len(ds), ds.num_classes, ds.size, ds.images) == (100 * per, 100, 224, None)  # decoded on the fly


def test_every_odd_format_decodes_to_rgb_224(in100):
    """Grey, CMYK and PNG-with-alpha files named .JPEG all come out as uint8 [3,224,224]."""
    ds = common.load_dataset("in100", in100["out"], "test")
    kind = [in100["kinds"][os.path.relpath(os.path.realpath(f), os.path.realpath(in100["fake"]))] for f in ds.files[:8]]
    assert sorted(set(kind)) == ["cmyk", "grey", "png_alpha", "rgb"]
    imgs = ds.get(torch.arange(8))
    assert imgs.shape == (8, 3, 224, 224) and imgs.dtype == torch.uint8
    for img, k in zip(imgs, kind):
        assert img.float().std() > 5, k  # real content, not the grey stand-in of a corrupt file
        same = torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])
        assert same == (k == "grey"), k  # grey gives three equal channels, the others stay coloured


def test_corrupt_file_is_reported_once_and_replaced(in100, capsys):
    """In one process: one stderr line for three reads of the truncated JPEG, grey images back."""
    common._BAD_FILES.discard(in100["bad"])
    capsys.readouterr()
    a = common.decode_image(in100["bad"], 224)
    b = common.load_files([in100["bad"], in100["bad"]], 224)
    err = capsys.readouterr().err.splitlines()
    assert a.shape == (3, 224, 224) and a.dtype == torch.uint8 and b.shape == (2, 3, 224, 224)
    assert (a == 128).all() and (b == 128).all()  # the grey stand-in
    assert len(err) == 1 and err[0].startswith("warning: cannot decode ") and in100["bad"] in err[0], err


def pipeline(method, data, out):
    """Run 2 steps, resume to step 3 (emp_ssl; the other methods' resume is checked at 32 px in their own test
    files: here it would repeat the same loader at the cost of a torchrun start each), probe; what the test
    checks, stopping at the first failure."""
    res = {"out": out, "run": torchrun(method, data, out, ["--max-steps", "2"])}
    if res["run"].returncode:
        return res
    ckpt = common.load_checkpoint(os.path.join(out, "checkpoint.pt"), method)  # before the resume rewrites it
    res["ckpt"] = {"step": ckpt["step"], "rng": len(ckpt["rng"]), "args": ckpt["args"],
                   "conv1": ckpt["backbone"]["conv1.weight"]}
    if method == "emp_ssl":
        res["resume"] = torchrun(method, data, out, ["--max-steps", "3", "--resume"])
        if res["resume"].returncode:
            return res
        res["step_after_resume"] = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["step"]
    probe = os.path.join(out, "probe")
    res["probe"] = run(["eval_linear.py", "--ckpt", os.path.join(out, "checkpoint.pt"), *PROBE, "--out", probe])
    if res["probe"].returncode == 0:
        res["eval"] = [json.load(open(os.path.join(probe, f))) for f in sorted(os.listdir(probe))
                       if f.endswith(".json")]
    return res


@pytest.fixture(scope="module")
def runs(in100, tmp_path_factory):
    """The four pipelines, two at a time: one torchrun leaves much of the 2 cores idle (imports,
    rank 0 alone in Feature Calibrate and checkpoint writes), two side by side fill them."""
    from concurrent.futures import ThreadPoolExecutor
    base = tmp_path_factory.mktemp("runs")
    with ThreadPoolExecutor(2) as pool:  # the two slowest first, then the quicker ones
        jobs = {m: pool.submit(pipeline, m, in100["out"], str(base / m))
                for m in ("npid_sqrtkl", "bag_ssl", "emp_ssl", "multiaug_ssl")}
        # emp_ssl's 3 steps without a stop, for its resumed run to equal (test_resume_on_in100_...)
        jobs["emp_ssl_uninterrupted"] = pool.submit(torchrun, "emp_ssl", in100["out"],
                                                    str(base / "emp_ssl_uninterrupted"), ["--max-steps", "3"])
        return {m: job.result() for m, job in jobs.items()}


@pytest.mark.parametrize("method", list(METHODS))
def test_method_runs_resumes_and_probes_on_in100(method, runs, in100):
    """Exit 0 through the corrupt file (with its warning), resume from step 2 to 3 (emp_ssl), k-NN probe."""
    res = runs[method]
    r = res["run"]
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = res["ckpt"]
    assert ckpt["step"] == 2 and ckpt["rng"] == 2  # both ranks' RNG states
    a = ckpt["args"]
    assert (a["dataset"], a["stem"], a["out_size"]) == ("in100", "imagenet", 224)  # the in100 recipe
    # the truncated JPEG was in rank 0's first batch: reported (one line), replaced, run finished
    lines = warnings_for(in100["bad"], r.stderr)
    assert lines and all(line.endswith("using a grey image instead") for line in lines), r.stderr[-3000:]
    assert "Traceback" not in r.stderr

    if method == "emp_ssl":
        r = res["resume"]
        assert r.returncode == 0, r.stderr[-3000:]
        assert re.search(r"resumed from \S*checkpoint\.pt at step 2\b", r.stdout), r.stdout[-2000:]
        assert res["step_after_resume"] == 3

    r = res["probe"]
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(res["eval"]) == 1, res["eval"]
    ev = res["eval"][0]
    assert (ev["dataset"], ev["method"], ev["n_train"], ev["n_test"]) == ("in100", method, 12, 6)
    assert 0 <= ev["knn"]["k5"] <= 100


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as the torchrun ranks (OMP_NUM_THREADS=1): the same float reductions
    yield
    torch.set_num_threads(n)


def test_resume_on_in100_equals_the_uninterrupted_run(runs):
    """emp_ssl on the file-backed loader (2 workers per rank, 2 ranks): the run stopped at step 2
    and resumed to step 3 (test_method_runs_resumes_and_probes_on_in100) holds the weights of 3 steps
    without a stop, to float tolerance: same batches, patches, augmentations and optimizer state."""
    full = runs["emp_ssl_uninterrupted"]
    assert full.returncode == 0, full.stderr[-3000:]
    res = runs["emp_ssl"]
    assert res.get("step_after_resume") == 3, res["run"].stderr[-3000:]
    resumed = torch.load(os.path.join(res["out"], "checkpoint.pt"), weights_only=True)
    uninterrupted = torch.load(os.path.join(os.path.dirname(res["out"]), "emp_ssl_uninterrupted", "checkpoint.pt"),
                               weights_only=True)
    assert resumed["step"] == uninterrupted["step"] == 3
    a, b = resumed["model"], uninterrupted["model"]
    assert_state_dicts_close(a, b)
    assert not torch.equal(resumed["backbone"]["conv1.weight"], res["ckpt"]["conv1"])  # step 3 moved the weights


def _bag_features(backbone, images, probe, patches):
    """EMP-SSL's bag (Sec. 2) written out: the mean backbone embedding of the fixed patches, each
    cut out, resized bilinearly to the input side and normalised; backbone in eval mode."""
    mean = torch.tensor(probe["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(probe["std"]).view(1, 3, 1, 1)
    out = probe["out_size"]
    feats = 0
    with torch.no_grad():
        for top, left, h, w in common.fixed_patch_boxes(patches, probe["patch_size"], images.shape[-1]).tolist():
            x = images[:, :, top:top + h, left:left + w].float() / 255
            x = F.interpolate(x, size=(out, out), mode="bilinear", align_corners=False)
            feats = feats + backbone.eval()((x - mean) / std).double()
    return feats / patches


def _knn_top1(train_f, train_y, test_f, test_y, k, t=0.07):
    """Weighted k-NN (Wu et al. 2018, arXiv:1805.01978) in float64: cosine similarity to the k most
    similar train images, votes exp(s / t) per class; top-1 in %."""
    a, b = F.normalize(train_f.double(), dim=1), F.normalize(test_f.double(), dim=1)
    sim, idx = (b @ a.T).topk(min(k, len(a)), dim=1)
    votes = torch.zeros(len(b), int(train_y.max()) + 1, dtype=torch.float64)
    votes.scatter_add_(1, train_y[idx], (sim / t).exp())
    return (votes.argmax(1) == test_y).double().mean().item() * 100


def test_probe_numbers_equal_a_direct_computation(runs, in100, tmp_path, one_thread):
    """The k-NN top-1 that eval_linear.py reports for the resumed in100 run, recomputed here from
    the checkpoint: (1) its in100 probe (12 train / 6 test images, k 5); (2) a probe whose test split
    is its train split (12 images, 6 classes of 2 in a folder tree), where k 1 must be 100 (every
    image is its own nearest neighbour) and k 3 takes the other images' votes."""
    import eval_linear
    res = runs["emp_ssl"]
    assert res.get("eval"), res.get("probe", res["run"]).stderr[-3000:]
    ckpt = torch.load(os.path.join(res["out"], "checkpoint.pt"), weights_only=True)
    backbone = common.backbone(ckpt["probe"]["arch"], ckpt["probe"]["stem"])
    backbone.load_state_dict(ckpt["backbone"])
    # (1) the in100 probe of the pipeline
    train = common.load_dataset("in100", in100["out"], "train")
    test = common.load_dataset("in100", in100["out"], "test")
    train = train.subset(common.subset_indices(len(train), 12, seed=1))
    test = test.subset(common.subset_indices(len(test), 6, seed=2))
    tr_f = _bag_features(backbone, train.get(torch.arange(12)), ckpt["probe"], 1)
    te_f = _bag_features(backbone, test.get(torch.arange(6)), ckpt["probe"], 1)
    assert res["eval"][0]["knn"]["k5"] == pytest.approx(_knn_top1(tr_f, train.labels, te_f, test.labels, 5))
    # (2) test split = train split: 12 in100 train images, linked into 6 class folders
    _, files, labels = scan_folder(os.path.join(in100["out"], "train"))
    tree = tmp_path / "same"
    for f, c in zip(files[:12], labels[:12]):
        os.makedirs(tree / "train" / f"c{c}", exist_ok=True)
        os.symlink(os.path.realpath(f), tree / "train" / f"c{c}" / os.path.basename(f))
    os.symlink(tree / "train", tree / "val")
    result = eval_linear.main(["--ckpt", os.path.join(res["out"], "checkpoint.pt"), "--dataset", "folder",
                               "--data-dir", str(tree), "--image-size", "224", "--probe", "knn", "--knn-k", "1,3",
                               "--patches", "1", "--workers", "0", "--out", str(tmp_path / "probe")])
    ds = common.load_dataset("folder", str(tree), "train", image_size=224)
    f = _bag_features(backbone, ds.get(torch.arange(len(ds))), ckpt["probe"], 1)
    assert result["knn"]["k1"] == _knn_top1(f, ds.labels, f, ds.labels, 1) == 100
    assert result["knn"]["k3"] == pytest.approx(_knn_top1(f, ds.labels, f, ds.labels, 3))


# --- emp_ssl --patch-sampler official: the authors' RandomResizedCrop per patch ------------------------


@pytest.mark.parametrize("side", [128, 32])  # 128: decoded per batch from the files; 32: held in memory
def test_emp_ssl_official_sampler_feeds_the_step(side, tmp_path, monkeypatch):
    """One in-process emp_ssl step per path, recording the crops it asked for: RandomResizedCrop boxes of
    scale 0.25, ratio 1 of the decoded image, drawn on the device (files and in-memory sets alike)."""

    from PIL import Image
    rng = np.random.default_rng(1)
    for c in range(2):
        os.makedirs(tmp_path / "data" / "train" / f"c{c}")
        for i in range(4):
            px = rng.integers(0, 256, (int(rng.integers(40, 91)), int(rng.integers(40, 91)), 3), dtype=np.uint8)
            Image.fromarray(px).save(tmp_path / "data" / "train" / f"c{c}" / f"{i}.jpg")
    monkeypatch.setenv("EFFSSL_CACHE", str(tmp_path / "cache"))
    calls, real_boxes = [], common.random_resized_boxes

    def boxes_spy(n, h, w, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), generator=None, device="cpu"):
        out = real_boxes(n, h, w, scale, ratio, generator, device)
        calls.append((n, h, w, scale, ratio, out))
        return out

    monkeypatch.setattr(common, "random_resized_boxes", boxes_spy)
    emp_ssl.main(["--dataset", "folder", "--data-dir", str(tmp_path / "data"), "--image-size", str(side),
                  "--patch-sampler", "official", "--patches", "3", "--out-size", "16", "--patch-size", str(side // 2),
                  "--proj", "32-8", "--batch-size", "4", "--epochs", "1", "--max-steps", "1", "--workers", "0",
                  "--out", str(tmp_path / "run")])
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 1
    assert len(calls) == 1
    n, h, w, scale, ratio, boxes = calls[0]
    assert (n, h, w, scale, ratio) == (12, side, side, (0.25, 0.25), (1.0, 1.0))
    assert (boxes[:, 2:] == side // 2).all()  # a quarter of the image, square
