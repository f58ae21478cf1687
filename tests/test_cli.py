"""The shared command line of the method scripts and eval_linear.py: one `error:` line and exit 2
for every user mistake, one run per run folder, progress that counts to the step the run stops
at, Ctrl-C, a full disk, the learning-rate horizon (--schedule-epochs), the plot command, and a
repository that stands alone. emp_ssl.py stands for the four scripts: they share common.py's
parser, run folder, Logger and checkpoint code."""
import errno
import glob
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import common
import emp_ssl
import eval_linear
from tools import plot as plot_tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--dataset", "synthetic", "--subset", "64", "--batch-size", "16", "--patches", "2",
        "--patch-size", "8", "--out-size", "8", "--log-every", "1"]
pytestmark = pytest.mark.usefixtures("cached_synthetic")  # tests/conftest.py


from cli_util import call  # noqa: E402  (tests/cli_util.py)


def one_error_line(code, err, needle):
    assert code == 2, (code, err)
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err


def run_script(args, env=None, timeout=300):
    e = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=e, timeout=timeout)


def steps_logged(out):
    return [r["step"] for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "loss" in r]


# --- bad input: one line, exit 2, nothing written --------------------------------------------


@pytest.mark.parametrize("bad,needle", [
    (["--lr", "-0.1"], "--lr must be positive"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--epochs", "0"], "--epochs must be positive"),
    (["--weight-decay", "-1"], "--weight-decay"),
    (["--epochs", "2", "--schedule-epochs", "1"], "--schedule-epochs 1 is shorter"),
    (["--max-step", "1"], "unrecognized arguments: --max-step"),  # no abbreviated flags
    (["--epoch", "1"], "unrecognized arguments: --epoch"),
    (["--lr", "abc"], "--lr"),
])
def test_bad_flag_is_one_error_line_exit_2(bad, needle, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = call(emp_ssl.main, TINY + ["--max-steps", "1", "--out", str(out)] + bad, capsys)
    one_error_line(code, err, needle)
    assert not (out / "checkpoint.pt").exists()


def test_out_naming_a_file_is_a_user_error(tmp_path, capsys):
    f = tmp_path / "a_file"
    f.write_text("x")
    code, _, err = call(emp_ssl.main, TINY + ["--max-steps", "1", "--out", str(f)], capsys)
    one_error_line(code, err, f"cannot write to --out {f} (a file)")
    assert f.read_text() == "x"


def test_out_under_a_file_is_a_user_error(tmp_path, capsys):
    f = tmp_path / "a_file"
    f.write_text("x")
    code, _, err = call(emp_ssl.main, TINY + ["--max-steps", "1", "--out", str(f / "run")], capsys)
    one_error_line(code, err, "cannot write to --out")  # nothing can be made under a file (root or not)
    assert f.read_text() == "x"


def test_out_in_a_folder_that_is_not_writable_is_a_user_error(tmp_path, capsys, monkeypatch):
    """os.access on the nearest existing ancestor (faked: a test run as root may write anywhere)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if str(p) == str(ro) else real(p, mode, *a, **k))
    code, _, err = call(emp_ssl.main, TINY + ["--max-steps", "1", "--out", str(ro / "a" / "run")], capsys)
    one_error_line(code, err, f"cannot write to --out {ro / 'a' / 'run'} (permission denied)")
    assert os.listdir(ro) == []


# --- a run folder holds one run ------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 3-step run with a checkpoint at every step (one subprocess, shared by the tests below)."""
    out = tmp_path_factory.mktemp("cli") / "run"
    r = run_script(["emp_ssl.py", *TINY, "--epochs", "2", "--max-steps", "3", "--save-every", "1", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    return out, r


@pytest.mark.slow
def test_progress_counts_to_the_stop_step_and_a_closing_line_names_the_checkpoint(finished_run):
    out, r = finished_run
    lines = [x for x in r.stdout.splitlines() if x.startswith("epoch")]
    assert [int(re.search(r"step (\d+)/3 ", x).group(1)) for x in lines] == [1, 2, 3], r.stdout
    assert all("eta" in x and "patches/s" in x and "lr" in x for x in lines)
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("done: ran steps 1-3 of 8") and str(out / "checkpoint.pt") in last, last


@pytest.mark.slow
def test_first_and_last_step_are_logged_with_a_long_log_every(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = call(emp_ssl.main, TINY + ["--max-steps", "3", "--log-every", "100", "--out", str(out)], capsys)
    assert code == 0
    assert [int(m) for m in re.findall(r"step (\d+)/3 ", stdout)] == [1, 3], stdout
    assert steps_logged(out) == [1, 3]


def _snapshot(out):
    return (out / "checkpoint.pt").read_bytes(), (out / "args.json").read_text(), (out / "metrics.jsonl").read_text()


@pytest.mark.parametrize("extra,needle", [
    ([], "already holds a run"),  # a second run into the same folder without --resume
    (["--resume", "--arch", "resnet34"], "--arch resnet18 (now resnet34)"),
    (["--resume", "--patches", "3", "--lr", "1.0"], "--lr 0.3 (now 1.0), --patches 2 (now 3)"),
])
def test_existing_run_is_never_overwritten_or_mixed(extra, needle, finished_run, capsys):
    out, _ = finished_run
    before = _snapshot(out)
    code, _, err = call(emp_ssl.main, TINY + ["--epochs", "2", "--max-steps", "5", "--out", str(out)] + extra, capsys)
    one_error_line(code, err, needle)
    assert _snapshot(out) == before
    assert not glob.glob(str(out / "*.tmp*"))


@pytest.mark.slow
def test_resume_may_change_runtime_flags_and_logs_each_step_once(finished_run, tmp_path, capsys):
    """The run's checkpoint is at step 3 but a crash may leave later lines in metrics.jsonl: they go."""
    src, _ = finished_run
    out = tmp_path / "run"
    os.makedirs(out)
    for name in ("checkpoint.pt", "args.json", "metrics.jsonl"):
        (out / name).write_bytes((src / name).read_bytes())
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 0, "step": 4, "loss": 0.0}) + "\n" + '{"epoch": 0, "st')  # torn last line
    code, stdout, err = call(emp_ssl.main, TINY + ["--epochs", "2", "--max-steps", "5", "--out", str(out), "--resume",
                                                   "--log-every", "2", "--save-every", "7", "--workers", "0"], capsys)
    assert code == 0, err
    assert "resumed from" in stdout and "at step 3" in stdout
    assert steps_logged(out) == [1, 2, 3, 4, 5]  # 4 (first after resume) and 5 (last) once each
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 5
    assert json.loads((out / "args.json").read_text())["log_every"] == 1  # the run's own args stay


# --- a full disk and Ctrl-C ----------------------------------------------------------------------


def test_full_disk_during_a_save_keeps_the_last_checkpoint_and_no_temp_file(tmp_path, capsys, monkeypatch):
    real_save = torch.save
    calls = []

    def save(obj, f, *a, **k):  # the second checkpoint hits a full disk half-way
        calls.append(f)
        if len(calls) == 2 and ".tmp" in str(f):
            with open(f, "wb") as fh:
                fh.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    code, _, err = call(emp_ssl.main, TINY + ["--max-steps", "3", "--save-every", "1", "--out", str(out)], capsys)
    one_error_line(code, err, "No space left on device")
    assert "previous file is kept" in err[0]
    assert os.listdir(out) and not glob.glob(str(out / "*.tmp*"))
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 1


def test_interrupted_save_removes_its_temporary_file(tmp_path, monkeypatch):
    def save(obj, f, *a, **k):
        open(f, "wb").write(b"partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(KeyboardInterrupt):
        common.atomic_save({"x": 1}, str(tmp_path / "c.pt"))
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_ctrl_c_says_where_the_run_stopped_and_exits_130(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # a shell's background job (`cmd &`) starts with SIGINT ignored, and the child would inherit that:
    # give it the default disposition, as a terminal's foreground run has, so Ctrl-C reaches Python
    p = subprocess.Popen([sys.executable, "emp_ssl.py", *TINY, "--epochs", "50", "--save-every", "2",
                          "--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    for line in p.stdout:  # wait until step 3 is done: a checkpoint at step 2 exists
        if re.search(r"step 3/", line) or time.time() > deadline:
            break
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert p.returncode == 130, err
    m = re.fullmatch(r"interrupted at step (\d+), last checkpoint at step (\d+): rerun with --resume", lines[-1])
    assert m and len(lines) == 1, err
    step, saved = int(m.group(1)), int(m.group(2))
    assert step >= 3 and saved in (step // 2 * 2, step // 2 * 2 - 2)  # Ctrl-C may land during a save
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == saved
    assert not glob.glob(str(out / "*.tmp*"))


def test_ctrl_c_line_of_a_probe_names_no_step(capsys, monkeypatch):
    """A training script's Ctrl-C line names its step; a probe's or a benchmark's, which have none,
    says only that it was interrupted."""
    monkeypatch.setattr(common.Run, "active", None)  # as in a fresh process

    def stop():
        raise KeyboardInterrupt
    for training, line in ((False, "interrupted"), (True, "interrupted before the first step")):
        with pytest.raises(SystemExit) as e:
            common.run_cli(stop, training=training)
        assert e.value.code == 130
        assert capsys.readouterr().err.strip().splitlines() == [line]


# --- the learning-rate horizon ---------------------------------------------------------------------


@pytest.mark.slow
def test_lr_at_every_step_is_the_cosine_over_the_schedule_horizon_across_a_resume(tmp_path, capsys):
    """--epochs 1 --schedule-epochs 3: 4 steps of a 12-step cosine (64 images / 16), run as 2 + 2."""
    out = tmp_path / "run"
    flags = TINY + ["--epochs", "1", "--schedule-epochs", "3", "--out", str(out)]
    assert call(emp_ssl.main, flags + ["--max-steps", "2"], capsys)[0] == 0
    assert call(emp_ssl.main, flags + ["--resume"], capsys)[0] == 0
    rec = [r for r in map(json.loads, open(out / "metrics.jsonl")) if "lr" in r]
    assert [r["step"] for r in rec] == [1, 2, 3, 4]
    for r in rec:  # the lr of step k (1-based) is the cosine at k - 1 of 12, from 0.3 to 0
        assert r["lr"] == pytest.approx(0.3 * 0.5 * (1 + math.cos(math.pi * (r["step"] - 1) / 12)), rel=1e-9)
    # without the flag the same run decays over its own 4 steps
    out2 = tmp_path / "run2"
    assert call(emp_ssl.main, TINY + ["--epochs", "1", "--out", str(out2)], capsys)[0] == 0
    rec2 = [r for r in map(json.loads, open(out2 / "metrics.jsonl")) if "lr" in r]
    assert rec2[-1]["lr"] == pytest.approx(0.3 * 0.5 * (1 + math.cos(math.pi * 3 / 4)), rel=1e-9)


# --- eval_linear ---------------------------------------------------------------------------------


PROBE = ["--probe", "knn", "--knn-k", "5", "--subset", "40", "--test-subset", "20", "--patches", "2"]


def test_eval_takes_a_run_folder_and_keeps_one_result_file_per_setting(finished_run, capsys):
    out, _ = finished_run
    code, stdout, err = call(eval_linear.main, ["--ckpt", str(out), *PROBE, "--batch-size", "16"], capsys)
    assert code == 0, err
    assert re.search(r"features trained train: 40/40 images, \d+ images/s, eta", stdout), stdout
    early = re.search(r"k-NN k=5 \(trained\): ([\d.]+)", stdout)  # printed before any linear probe
    assert early, stdout
    res = json.load(open(out / "eval-bag-p2-s8-fixed-backbone-n40-20.json"))
    assert float(early.group(1)) == pytest.approx(res["knn"]["k5"], abs=0.01)
    code, _, err = call(eval_linear.main, ["--ckpt", str(out / "checkpoint.pt"), *PROBE, "--mode", "central"], capsys)
    assert code == 0, err
    code, _, err = call(eval_linear.main, ["--ckpt", str(out), *PROBE, "--positions", "random"], capsys)
    assert code == 0, err
    files = sorted(os.path.basename(f) for f in glob.glob(str(out / "eval-*.json")))
    assert files == ["eval-bag-p2-s8-fixed-backbone-n40-20.json", "eval-bag-p2-s8-random-backbone-n40-20.json",
                     "eval-central-backbone-n40-20.json"], files
    modes = [json.load(open(out / f))["mode"] for f in files]
    assert modes == ["bag", "bag", "central"]


def test_eval_compare_random_prints_trained_and_random_side_by_side(finished_run, capsys):
    out, _ = finished_run
    code, stdout, err = call(eval_linear.main, ["--ckpt", str(out), *PROBE, "--compare-random", "--out",
                                                str(out / "cmp")], capsys)
    assert code == 0, err
    res = json.load(open(glob.glob(str(out / "cmp" / "eval-*.json"))[0]))
    row = re.search(r"k-NN k=5\s+([\d.]+)\s+([\d.]+)\s+([+-][\d.]+)", stdout)
    assert row, stdout
    assert float(row.group(1)) == pytest.approx(res["knn"]["k5"], abs=0.01)
    assert float(row.group(2)) == pytest.approx(res["random"]["knn"]["k5"], abs=0.01)


@pytest.mark.parametrize("bad,needle", [
    (["--arch", "resnet34"], "holds a resnet18"),
    (["--ckpt-dir", "x"], "unrecognized arguments"),
    (["--dataset", "cifar10", "--data-dir", "/nonexistent"], "/nonexistent"),
    (["--linear-aug", "--mode", "bag"], "--linear-aug"),
])
def test_eval_user_mistakes_are_one_error_line(bad, needle, finished_run, capsys):
    out, _ = finished_run
    code, _, err = call(eval_linear.main, ["--ckpt", str(out), *PROBE] + bad, capsys)
    one_error_line(code, err, needle)


def _random_positions(n_images, patches, size, seed, seed_offset=0):
    """The boxes eval_linear.extract hands bag_of_features with --positions random (recorded)."""
    ds = common.synthetic_set("test", n=n_images)
    args = eval_linear.parse_args(["--ckpt", "x", "--mode", "bag", "--positions", "random", "--patches",
                                   str(patches), "--patch-size", str(size), "--batch-size", "20",
                                   "--seed", str(seed), "--workers", "0"])
    info = {"mean": [0.5] * 3, "std": [0.25] * 3, "out_size": size, "patch_size": size}
    seen = []
    real = common.bag_of_features
    common.bag_of_features = lambda backbone, images, boxes, *a, **k: seen.append(boxes.clone()) or real(
        backbone, images, boxes, *a, **k)
    try:
        eval_linear.extract(args, lambda x: x.mean((2, 3)), ds, torch.device("cpu"), info, seed_offset=seed_offset)
    finally:
        common.bag_of_features = real
    return torch.cat(seen, 1)


def test_eval_random_positions_are_drawn_per_image_and_repeat_on_every_call():
    a = _random_positions(50, 8, 14, seed=3)
    b = _random_positions(50, 8, 14, seed=3)
    assert torch.equal(a, b) and a.shape == (8, 50, 4)
    assert (a[..., :2] >= 0).all() and (a[..., :2] <= 32 - 14).all() and (a[..., 2:] == 14).all()
    assert not torch.equal(a[:, 0], a[:, 1])  # two images do not share their positions
    assert not torch.equal(a, _random_positions(50, 8, 14, seed=4))
    assert not torch.equal(a, _random_positions(50, 8, 14, seed=3, seed_offset=1))  # the test set's own draw


def test_bag_of_features_with_per_image_boxes_equals_one_image_at_a_time():
    torch.manual_seed(0)
    net = common.backbone("resnet18", "cifar").eval()
    imgs = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    boxes = common.patch_boxes(4 * 3, 16, 32, 32, torch.Generator().manual_seed(0)).reshape(4, 3, 4)
    mean, std = (0.5,) * 3, (0.25,) * 3
    both = common.bag_of_features(net, imgs, boxes, 16, mean, std)
    one = torch.cat([common.bag_of_features(net, imgs[i:i + 1], boxes[:, i], 16, mean, std) for i in range(3)])
    torch.testing.assert_close(both, one, rtol=1e-4, atol=1e-5)


def test_linear_aug_probe_runs_the_ssql_schedule(finished_run, capsys):
    """A few epochs on the synthetic set: lr 30 -> 3 -> 0.3 at 60 % and 80 % of the epochs."""
    out, _ = finished_run
    seen = []
    real = torch.optim.lr_scheduler.MultiStepLR.step

    def step(self, *a, **k):
        seen.append(self.optimizer.param_groups[0]["lr"])
        return real(self, *a, **k)
    torch.optim.lr_scheduler.MultiStepLR.step = step
    try:
        code, stdout, err = call(eval_linear.main, ["--ckpt", str(out), "--mode", "central", "--probe", "linear",
                                                    "--linear-aug", "--linear-epochs", "5", "--subset", "64",
                                                    "--test-subset", "32"], capsys)
    finally:
        torch.optim.lr_scheduler.MultiStepLR.step = real
    assert code == 0, err
    assert seen[1:] == pytest.approx([30.0, 30.0, 30.0, 3.0, 0.3]), seen  # lr used in epochs 1..5
    res = json.load(open(glob.glob(str(out / "eval-central-*linaug*.json"))[0]))
    assert res["linear"]["epochs"] == 5 and res["linear"]["opt"] == "sgd-aug"
    assert re.search(r"linear probe: 5/5 epochs \(loss [\d.]+, lr 3\.00e-01, top-1 [\d.]+\)", stdout), stdout


def test_head1_is_the_checkpoints_projector_up_to_its_first_relu(finished_run):
    """--feature head1 (the official EMP-SSL evaluation's 4096-d feature): Linear-BN-ReLU of the trained
    projector, with the trained weights and BatchNorm statistics, not a random init."""
    out, _ = finished_run
    args = eval_linear.parse_args(["--ckpt", str(out / "checkpoint.pt"), "--feature", "head1"])
    _, proj, targs = eval_linear.load_backbone(args)
    model = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    assert [type(m).__name__ for m in proj] == ["Linear", "BatchNorm1d", "ReLU"]
    kept = {f"projector.{k}": v for k, v in proj.state_dict().items()}
    assert set(kept) == {k for k in model if k.startswith(("projector.0.", "projector.1."))}
    for k, v in kept.items():
        assert torch.equal(v, model[k]), k


def test_head1_of_a_projector_saved_under_other_names_is_one_error_line(finished_run, tmp_path, capsys):
    out, _ = finished_run
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    ckpt["model"] = {k.replace("projector.1.", "projector.bn."): v for k, v in ckpt["model"].items()}
    torch.save(ckpt, tmp_path / "renamed.pt")
    code, _, err = call(eval_linear.main, ["--ckpt", str(tmp_path / "renamed.pt"), "--feature", "head1", *PROBE],
                        capsys)
    one_error_line(code, err, "projector does not match")


def test_plain_linear_probe_separates_two_blobs_and_reports_its_epochs(capsys):
    """Features of two well-separated Gaussian blobs: the linear probe ends at 100 % and its progress line
    (printed at least at the last epoch) gives the epochs done, the loss, the lr and that top-1."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 2
    f = torch.randn(200, 8, generator=g) + 4.0 * (2 * y[:, None].float() - 1)
    args = eval_linear.parse_args(["--ckpt", "x", "--linear-epochs", "3", "--linear-opt", "sgd"])
    accs = eval_linear.linear_probe(args, lambda idx: f[idx], y[:100], f[100:], y[100:], 2, torch.device("cpu"))
    assert len(accs) == 3 and accs[-1] == 100.0
    line = re.findall(r"linear probe: 3/3 epochs \(loss ([\d.]+), lr ([\d.e+-]+), top-1 ([\d.]+)\)",
                      capsys.readouterr().out)
    assert line and float(line[-1][2]) == 100.0 and float(line[-1][1]) == 0.0  # the cosine ends at 0


# --- the plot command ------------------------------------------------------------------------------


def test_plot_without_matplotlib_is_one_line_saying_how_to_install(finished_run, capsys, monkeypatch):
    out, _ = finished_run
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    with pytest.raises(common.UserError, match="pip install matplotlib"):
        plot_tool.plot_runs([str(out)], str(out / "p.png"))


def test_plot_writes_one_png_of_the_runs(finished_run, tmp_path):
    pytest.importorskip("matplotlib")
    out, _ = finished_run
    plot_tool.plot_runs([str(out), str(out / "metrics.jsonl")], str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_read_metrics_separates_steps_and_knn_records(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0}\n{"epoch": 1, "step": 2, "knn_top1": 40.0}\n{"st')
    steps, evals = plot_tool.read_metrics(str(tmp_path))
    assert [r["loss"] for r in steps] == [2.0, 1.0] and [r["knn_top1"] for r in evals] == [40.0]


# --- the repository stands alone ------------------------------------------------------------------


def test_product_files_cite_papers_not_the_workshop():
    """Users get only the repository: no pointer to the team's spec or paper copies."""
    files = subprocess.run(["git", "ls-files", "*.py", "*.md", "*.txt", "bench/*", "docs/*"], cwd=ROOT,
                           capture_output=True, text=True).stdout.split()
    files = [f for f in files if not f.startswith(("tests/", ".ci/"))] or glob.glob(os.path.join(ROOT, "*.py"))
    bad = re.compile(r"\.\./shared|\bSPEC\b|SPEC\.md|SPEC ?\d|papers/")
    hits = [f"{f}:{i + 1}" for f in files for i, line in enumerate(open(os.path.join(ROOT, f), errors="ignore"))
            if bad.search(line)]
    assert not hits, hits


def test_eval_takes_download_as_the_missing_data_hint_says(tmp_path, capsys):
    code, _, err = call(eval_linear.main, ["--ckpt", "random", "--dataset", "stl10", "--data-dir",
                                           str(tmp_path / "none"), "--probe", "knn"], capsys)
    one_error_line(code, err, "stl10_binary/ (--download)")
    assert eval_linear.parse_args(["--ckpt", "random", "--download"]).download


def test_learn_cpu_plot_matches_rows_to_the_recipe_by_their_effective_flags():
    """A row run with --extra repeats a recipe flag; argparse takes the last value, and so must the
    plot when it picks the current recipe's rows (bench/learn_cpu_plot.py)."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from learn_cpu import RECIPES
    from learn_cpu_plot import effective
    assert effective(["--patches", "8", "--flip", "--patches", "6"]) == {"--patches": "6", "--flip": None}
    old_8 = "--batch-size 100 --patches 8 --patch-size 16 --out-size 16 --epochs 1 --seed 0".split()
    with_extra = "--batch-size 100 --patches 8 --patch-size 16 --out-size 16 --epochs 1 --patches 6 --seed 0".split()
    recipe = effective(RECIPES["emp_ssl"] + ["--seed", "0"])
    assert effective(with_extra) == recipe != effective(old_8)


# --- what a checkpoint holds: no older format, the probe's information, a fork of two files ---------

METHODS = ("emp_ssl", "bag_ssl", "multiaug_ssl", "npid_sqrtkl")
# each method's smallest run on the synthetic set (one step of 16 images)
SMALL = {"emp_ssl": ["--dataset", "synthetic", "--subset", "64", "--batch-size", "16", "--patches", "2",
                     "--patch-size", "16", "--out-size", "16", "--epochs", "1", "--max-steps", "1"],
         "bag_ssl": ["--dataset", "synthetic", "--subset", "64", "--batch-size", "16", "--out-size", "16",
                     "--arch", "resnet18", "--epochs", "1", "--max-steps", "1", "--loss", "byol"],
         "multiaug_ssl": ["--dataset", "synthetic", "--subset", "64", "--batch-size", "16", "--out-size", "16",
                          "--arch", "resnet18", "--epochs", "1", "--max-steps", "1", "--views", "2"],
         "npid_sqrtkl": ["--dataset", "synthetic", "--subset", "64", "--batch-size", "16", "--out-size", "16",
                         "--epochs", "1", "--max-steps", "1"]}


def test_a_checkpoint_without_its_probe_is_refused_in_one_line_and_left_as_it_is(finished_run, tmp_path, capsys):
    """A checkpoint of the format before `probe` was saved in it is not read (no legacy reader): eval_linear
    and --resume refuse it in one line, and the file stays as it was."""
    out, _ = finished_run
    old = tmp_path / "old"
    old.mkdir()
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    del ckpt["probe"]
    torch.save(ckpt, old / "checkpoint.pt")
    before = (old / "checkpoint.pt").read_bytes()
    code, _, err = call(eval_linear.main, ["--ckpt", str(old), *PROBE], capsys)
    one_error_line(code, err, "was not written by an effssl method script")
    code, _, err = call(emp_ssl.main, TINY + ["--epochs", "2", "--max-steps", "5", "--resume", "--out", str(old)],
                        capsys)
    one_error_line(code, err, "was not written by an effssl method script")
    assert (old / "checkpoint.pt").read_bytes() == before and not glob.glob(str(old / "eval-*"))


@pytest.mark.parametrize("method", METHODS)
def test_a_method_file_imports_nothing_of_the_project_but_common(method):
    """Forking a method is two files: a method file imports the standard library, torch, numpy and
    common.py, nothing else of this repository (read from its syntax tree)."""
    import ast
    tree = ast.parse(open(os.path.join(ROOT, f"{method}.py")).read())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    ours = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")} | {"tools", "bench", "tests"}
    assert names & ours == {"common"}, names
    assert names - ours <= {"torch", "numpy", "torchvision", *sys.stdlib_module_names}, names - ours


@pytest.mark.slow
def test_emp_ssl_py_and_common_py_alone_train_a_run(tmp_path):
    """Forking a method is two files: emp_ssl.py and common.py, copied alone into an empty folder, train
    and checkpoint (the other methods' imports are held by the test above)."""
    import shutil
    for f in ("emp_ssl.py", "common.py"):
        shutil.copy(os.path.join(ROOT, f), tmp_path / f)
    r = subprocess.run([sys.executable, "emp_ssl.py", *SMALL["emp_ssl"], "--max-steps", "2", "--out", "run",
                        "--workers", "0"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""})
    assert r.returncode == 0, r.stderr[-2000:]
    assert set(os.listdir(tmp_path)) - {"__pycache__"} == {"common.py", "emp_ssl.py", "run"}
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 2


def test_a_model_without_a_backbone_is_refused_at_run_before_any_step(tmp_path, capsys, monkeypatch):
    """The fork contract (README, 'Forking a method'): the model handed to common.Run has `.backbone`, the
    network eval_linear.py probes. A fork whose model names it otherwise is refused when its Run is made:
    one line naming `.backbone`, exit 2, no step taken, no run folder written."""

    class Renamed(emp_ssl.EMPNet):  # the same network, its backbone kept under another name
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.encoder = self.backbone
            del self.backbone

        def forward(self, x):
            return F.normalize(self.projector(self.encoder(x)), dim=1)

    steps = []
    monkeypatch.setattr(common.Run, "active", None)  # as in a fresh process
    monkeypatch.setattr(emp_ssl, "EMPNet", Renamed)
    monkeypatch.setattr(emp_ssl, "emp_loss", lambda *a, **k: steps.append(1))
    monkeypatch.setattr(common.Run, "step", lambda *a, **k: steps.append(1))
    out = tmp_path / "run"
    code, stdout, err = call(emp_ssl.main, TINY + ["--max-steps", "1", "--out", str(out)], capsys)
    one_error_line(code, err, ".backbone")
    assert "Renamed" in err[0] and not steps and "step" not in stdout
    assert not out.exists() and not (out / "checkpoint.pt").exists()
    assert common.Run.active is None  # refused before it became the run in progress


def test_probe_info_refuses_a_bag_without_its_patch_size():
    """represent "bag" is the mean embedding of patch_size patches: without a patch size it means nothing."""
    args = ("resnet18", "cifar", 32, (0.5,) * 3, (0.5,) * 3)
    for bad in ({"represent": "bag"}, {"represent": "bag", "patch_size": None}, {"represent": "bag", "patch_size": 0}):
        with pytest.raises(ValueError, match="patch_size"):
            common.probe_info(*args, **bad)
    with pytest.raises(ValueError, match="'image'"):
        common.probe_info(*args, represent="patches", patch_size=16)
    assert common.probe_info(*args, "bag", patch_size=16)["represent"] == "bag"
    assert common.probe_info(*args, "image")["represent"] == "image"


def _image_folder(root, size, per_class):
    from torchvision.io import write_png
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", per_class), ("test", per_class // 2)):
        for c in range(2):
            os.makedirs(root / split / f"c{c}")
            for i in range(n):
                write_png(torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8),
                          str(root / split / f"c{c}" / f"{i}.png"))


@pytest.mark.slow
def test_views_probe_takes_the_views_of_the_run_stl10_and_cifar(tmp_path, monkeypatch, capsys):
    """eval_linear --mode views draws the views the run trained on, saved in its checkpoint: an
    STL-10-shaped multiaug run (96 px) its 64 px crops of scale (0.2, 1) and grayscale 0.1 (the
    authors' STL-10 pipeline), a CIFAR-shaped one crops of scale (0.08, 1) at 32 px and grayscale 0.2."""
    import multiaug_ssl
    monkeypatch.setenv("EFFSSL_CACHE", str(tmp_path / "cache"))
    _image_folder(tmp_path / "stl", 96, 8)
    seen = []
    real_views, real_augment = common.sample_views, common.augment

    def views(images, m, out_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), generator=None):
        seen.append(("views", out_size, tuple(scale), tuple(ratio)))
        return real_views(images, m, out_size, scale, ratio, generator)

    def augment(x, cfg, generator=None):
        seen.append(("augment", cfg.p_gray, tuple(cfg.jitter), cfg.p_blur, cfg.p_solarize))
        return real_augment(x, cfg, generator)
    expected = {"stl10": [("views", 64, (0.2, 1.0), (3 / 4, 4 / 3)), ("augment", 0.1, (0.4, 0.4, 0.4, 0.0), 0.0, 0.0)],
                "synthetic": [("views", 32, (0.08, 1.0), (3 / 4, 4 / 3)), ("augment", 0.2, (0.4, 0.4, 0.4, 0.0), 0.0, 0.0)]}
    for ds, data in (("stl10", ["--data-dir", str(tmp_path / "stl")]), ("synthetic", ["--subset", "64"])):
        out = tmp_path / ds
        multiaug_ssl.main(["--dataset", ds, *data, "--arch", "resnet18", "--pdim", "16", "--batch-size", "8",
                           "--epochs", "1", "--max-steps", "1", "--workers", "0", "--out", str(out)])
        monkeypatch.setattr(common, "sample_views", views)
        monkeypatch.setattr(common, "augment", augment)
        seen.clear()
        eval_linear.main(["--ckpt", str(out), "--mode", "views", "--views", "3", "--probe", "knn", "--knn-k", "3",
                          "--subset", "16", "--test-subset", "8", "--workers", "0"])
        monkeypatch.undo()
        monkeypatch.setenv("EFFSSL_CACHE", str(tmp_path / "cache"))
        assert seen and set(seen) == set(expected[ds]), (ds, set(seen))


# --- cluster events: preemption signals, a lost worker, out of memory -------------------------------

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def _losses(out):
    return [r["loss"] for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "loss" in r]


def _children(pid):
    """PIDs of the processes whose parent is pid (torchrun's workers)."""
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return kids


def _start(cmd, out):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd + ["--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def _wait_for_step(p, step, timeout=240):
    """Read p's output until a progress line of step `step` or later."""
    deadline = time.time() + timeout
    for line in p.stdout:
        m = re.search(r"step (\d+)/", line)
        if (m and int(m.group(1)) >= step) or time.time() > deadline:
            return


def _stop(p, sig, to_worker, after):
    """Wait for a step after `after`, signal the process (or one of torchrun's workers); (stop step, stderr)."""
    _wait_for_step(p, after + 1)
    os.kill(max(_children(p.pid)) if to_worker else p.pid, sig)
    _, err = p.communicate(timeout=120)
    name = signal.Signals(sig).name
    stops = re.findall(rf"stopped by {name} at step (\d+); checkpoint saved at step (\d+): rerun with --resume", err)
    assert len(stops) == 1 and stops[0][0] == stops[0][1], err[-2000:]
    return int(stops[0][0]), err


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
def test_sigterm_saves_the_step_in_progress_and_the_resumed_run_equals_the_unstopped_one(ranks, tmp_path):
    """One process: SIGTERM. Two gloo workers: SIGUSR1 to ONE of them (SLURM's --signal). Every rank ends
    the same step, rank 0 saves it, one line names it, exit 128 + the signal; the resumed run's losses are
    those of the run never stopped, bit for bit, each step once in metrics.jsonl."""
    flags = [*TINY, "--epochs", "4", "--save-every", "100"]  # 16 steps; no checkpoint but the signal's
    cmd = (TORCHRUN if ranks == 2 else [sys.executable]) + ["emp_ssl.py", *flags]
    ref = _start(cmd, tmp_path / "ref")
    ref.communicate(timeout=300)
    assert ref.returncode == 0
    stops = [(signal.SIGTERM, False)] if ranks == 1 else [(signal.SIGUSR1, True)]
    step = 2
    for k, (sig, to_worker) in enumerate(stops):
        p = _start(cmd + ["--resume"] * k, tmp_path / "run")
        last, (step, err) = step, _stop(p, sig, to_worker, step)
        assert last < step < 16 and torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == step
        if ranks == 1:
            assert p.returncode == 128 + sig, err[-2000:]
        else:  # torchrun's report of its workers: both stopped so
            codes = dict(re.findall(r"rank\s*:\s*(\d)\s*\(local_rank: \d\)\s*exitcode\s*:\s*(-?\d+)", err))
            assert codes == {"0": str(128 + sig), "1": str(128 + sig)}, err[-2000:]
    r = _start(cmd + ["--resume"], tmp_path / "run")
    _, err = r.communicate(timeout=300)
    assert r.returncode == 0, err[-2000:]
    assert steps_logged(tmp_path / "run") == list(range(1, 17))
    assert _losses(tmp_path / "run") == _losses(tmp_path / "ref")


@pytest.mark.slow
def test_a_worker_killed_under_max_restarts_ends_in_a_finished_run(tmp_path):
    """SIGKILL of one of two workers: torchrun stops the other (its SIGTERM finds no peer to save with:
    one line), restarts both, they resume from the last checkpoint and finish; every step once."""
    flags = [*TINY, "--epochs", "3", "--save-every", "2", "--resume"]
    p = _start(TORCHRUN + ["--max-restarts", "1", "emp_ssl.py", *flags], tmp_path / "run")
    _wait_for_step(p, 5)
    os.kill(max(_children(p.pid)), signal.SIGKILL)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    assert "resumed from" in out and "done: ran steps" in out
    assert steps_logged(tmp_path / "run") == list(range(1, 13))
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 12


def test_cuda_out_of_memory_in_a_step_is_one_line_and_keeps_the_checkpoint(tmp_path, capsys, monkeypatch):
    real, calls = emp_ssl.emp_loss, []

    def loss(*a, **k):  # the second step's allocation fails, as CUDA reports it
        calls.append(1)
        if len(calls) == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(*a, **k)
    monkeypatch.setattr(emp_ssl, "emp_loss", loss)
    out = tmp_path / "run"
    code, _, err = call(emp_ssl.main, TINY + ["--max-steps", "3", "--save-every", "1", "--out", str(out)], capsys)
    one_error_line(code, err, "out of memory in step 2 (32 patches of 8 px per rank): use a smaller --batch-size")
    assert "more ranks, --grad-checkpoint" in err[0] and err[0].endswith("; the last checkpoint is untouched"), err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 1


# --- every numeric flag is checked -----------------------------------------------------------------

SCRIPTS = ("emp_ssl", "bag_ssl", "multiaug_ssl", "npid_sqrtkl", "eval_linear")
# flags for which 0 is a meaningful value (off, none, a weight of 0, a probability of 0); any other 0 is refused
ZERO_OK = {"--workers", "--eval-every", "--warmup-epochs", "--bank-chunk", "--seed", "--weight-decay", "--inv-weight",
           "--sim-coeff", "--std-coeff", "--cov-coeff", "--lam", "--linear-wd", "--jitter", "--p-gray", "--p-jitter",
           "--flip", "--tau-base", "--bank-momentum", "--label-smoothing"}
PROBABILITIES = {"--p-gray", "--p-jitter", "--flip", "--tau-base", "--bank-momentum", "--label-smoothing",
                 "--train-fraction", "--scale"}


def _parser(script, monkeypatch):
    """The argparse parser a script builds (its parse_args stopped before parsing)."""
    import importlib

    class Got(Exception):
        pass
    box = {}

    def grab(self, *a, **k):
        box["p"] = self
        raise Got
    monkeypatch.setattr(common.ArgParser, "parse_args", grab)
    with pytest.raises(Got):
        importlib.import_module(script).parse_args([])
    monkeypatch.undo()
    return box["p"]


def _bad_values(flag, kind):
    values = ["-1", str(10 ** 12) if kind is int else "inf"]
    if flag not in ZERO_OK:
        values.append("0")
    if flag in PROBABILITIES:
        values.append("2")
    return values


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_numeric_flag_refuses_zero_negative_and_absurd_values_in_one_line(script, tmp_path, capsys, monkeypatch):
    import importlib
    flags = [a for a in _parser(script, monkeypatch)._actions if a.option_strings and a.type is not None]
    assert not [a.option_strings for a in flags if a.type in (int, float)]  # every numeric flag has its range
    numeric = [a for a in flags if isinstance(a.type, common.Number)]
    assert len(numeric) >= 15
    main, out = importlib.import_module(script).main, tmp_path / "out"
    base = ["--ckpt", "random", "--out", str(out)] if script == "eval_linear" else ["--out", str(out)]
    tried = 0
    for a in numeric:
        flag = a.option_strings[0]
        for v in _bad_values(flag, a.type.kind):
            code, _, err = call(main, base + [flag] + [v] * (a.nargs if isinstance(a.nargs, int) else 1), capsys)
            one_error_line(code, err, flag)
            assert not out.exists(), (flag, v)
            tried += 1
    assert tried >= 3 * len(numeric) - len(ZERO_OK)


def test_eval_without_a_checkpoint_is_one_error_line(capsys):
    code, _, err = call(eval_linear.main, [], capsys)
    one_error_line(code, err, "the following arguments are required: --ckpt")


@pytest.mark.parametrize("script,flag", [("eval_linear", "--label-smoothing"), ("npid_sqrtkl", "--bank-momentum")])
def test_a_half_open_range_names_its_open_end(script, flag, tmp_path, capsys):
    """1 is outside [0, 1): the line says so (not "at most 1", which 1 is)."""
    import importlib
    base = ["--ckpt", "random"] if script == "eval_linear" else []
    code, _, err = call(importlib.import_module(script).main, base + ["--out", str(tmp_path / "o"), flag, "1"], capsys)
    one_error_line(code, err, f"{flag} must be in [0, 1), not 1")


@pytest.mark.parametrize("k", ["0", "-5", "20,x", "500"])
def test_knn_k_outside_one_to_the_probes_training_images_is_one_line(k, tmp_path, capsys):
    out = tmp_path / "probe"
    code, _, err = call(eval_linear.main, ["--ckpt", "random", "--dataset", "synthetic", "--probe", "knn",
                                           "--knn-k", k, "--subset", "100", "--test-subset", "50", "--out", str(out)],
                        capsys)
    one_error_line(code, err, "--knn-k")
    assert not out.exists()


@pytest.mark.slow
def test_a_step_between_log_lines_and_checkpoints_never_waits_for_the_device(tmp_path, monkeypatch):
    """Run.step keeps the first non-finite step on the device and looks at it only where the run must
    know it (a log line, a checkpoint, a stop): the steps in between call nothing that makes the host
    wait for the device (on a GPU: no sync), so the next step's work is queued while this one runs."""
    waits = {"nonzero", "item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy"}
    seen = {}

    class Calls(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.setdefault(self.step, set()).add(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))
    real = common.Run.step

    def step(run, terms, lr):
        mode = Calls()
        mode.step = run.steps + 1
        with mode:
            return real(run, terms, lr)
    monkeypatch.setattr(common.Run, "step", step)
    emp_ssl.main(TINY + ["--epochs", "2", "--max-steps", "6", "--log-every", "4", "--out", str(tmp_path / "run")])
    assert sorted(seen) == [1, 2, 3, 4, 5, 6]
    assert [s for s in seen if seen[s] & waits] == [1, 4, 6]  # the first, every 4th and the last log


def test_channels_last_is_on_by_default_with_cuda_and_no_channels_last_turns_it_off(tmp_path, monkeypatch):
    for cuda, flags, want in ((True, [], True), (True, ["--no-channels-last"], False), (False, [], False),
                              (False, ["--channels-last"], True)):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        args = emp_ssl.resolve_args(emp_ssl.parse_args(TINY + flags + ["--out", str(tmp_path / "run")]))
        assert args.channels_last is want, (cuda, flags)


# the loss function each method's loop calls, and how to make its loss non-finite
NAN_LOSS = {"emp_ssl": ("emp_loss", lambda out: (out[0] * math.nan, *out[1:])),
            "bag_ssl": ("global_loss", lambda out: {**out, "loss": out["loss"] * math.nan}),
            "multiaug_ssl": ("barlow_loss", lambda out: (out[0] * math.nan, *out[1:])),
            "npid_sqrtkl": ("instance_loss", lambda out: (out[0] * math.nan, *out[1:]))}


@pytest.mark.parametrize("method", METHODS)
def test_a_non_finite_loss_exits_3_naming_its_step_and_keeps_the_checkpoint(method, tmp_path, capsys, monkeypatch):
    import importlib
    mod, calls = importlib.import_module(method), []
    name, poison = NAN_LOSS[method]
    real = getattr(mod, name)

    def loss(*a, **k):  # the second step's loss is NaN
        calls.append(1)
        out = real(*a, **k)
        return poison(out) if len(calls) == 2 else out
    monkeypatch.setattr(mod, name, loss)
    out = tmp_path / "run"
    code, _, err = call(mod.main, SMALL[method] + ["--save-every", "1", "--max-steps", "3", "--workers", "0",
                                                          "--out", str(out)], capsys)
    assert code == 3 and err == [f"error: non-finite loss at step 2; stopping, last good checkpoint kept in {out}"], err
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_amp_fp16_is_refused_in_one_line(tmp_path, capsys):
    """fp16 needs a gradient scaler, which these scripts lack: --amp takes bf16 or off only."""
    code, _, err = call(emp_ssl.main, TINY + ["--amp", "fp16", "--out", str(tmp_path / "run")], capsys)
    one_error_line(code, err, "--amp invalid choice: 'fp16'")
    assert "bf16" in err[0] and "off" in err[0]
    assert not (tmp_path / "run").exists()


def test_a_resume_on_another_number_of_ranks_is_refused_in_one_line(tmp_path, capsys):
    """A checkpoint holds one random state per rank: resumed on another number of ranks, no rank would go on
    with its own state; the resume is refused in one line (exit 2) and the checkpoint is left as it is."""
    out = tmp_path / "run"
    emp_ssl.main(TINY + ["--max-steps", "1", "--out", str(out)])
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    torch.save({**ckpt, "rng": ckpt["rng"] * 2}, out / "checkpoint.pt")  # as two ranks write it
    before, metrics = (out / "checkpoint.pt").read_bytes(), (out / "metrics.jsonl").read_text()
    code, _, err = call(emp_ssl.main, TINY + ["--max-steps", "2", "--resume", "--out", str(out)], capsys)
    one_error_line(code, err, "was written by 2 ranks: resume it on 2, not 1")
    assert (out / "checkpoint.pt").read_bytes() == before and (out / "metrics.jsonl").read_text() == metrics
    assert not glob.glob(str(out / "*.tmp*"))


# --- every probe mode and option, each with an answer known without the code under test ----------------


def test_local_mode_is_the_pooled_grid_of_sliding_window_embeddings():
    """--mode local (BagSSL App. C.4): the embeddings of a sliding window of patches form a grid that is
    average-pooled (3, stride 2) and flattened. With an embedding that is the patch's mean pixel, the
    grid is a strided average pool of the image, known in closed form."""
    ds = common.synthetic_set("test", n=6)
    args = eval_linear.parse_args(["--ckpt", "x", "--mode", "local", "--patch-size", "16", "--stride", "4",
                                   "--batch-size", "4", "--workers", "0"])
    info = {"mean": [0.0] * 3, "std": [1.0] * 3, "out_size": 16, "patch_size": 16}
    f = eval_linear.extract(args, lambda x: x.mean((1, 2, 3))[:, None], ds, torch.device("cpu"), info)
    img = ds.images.float().div(255).mean(1, keepdim=True)  # [N,1,32,32]: the channel mean
    grid = F.avg_pool2d(img, 16, stride=4)  # 5 x 5 window means
    assert grid.shape[-1] == 5 and torch.allclose(f, F.avg_pool2d(grid, 3, stride=2).flatten(1), atol=1e-6)


def test_adam_probe_keeps_its_learning_rate_and_smooths_labels(capsys):
    """--linear-opt adam (the multi-view paper's probe): constant lr 1e-3, label smoothing 0.1 by default,
    top-1 of the last epoch; on two separated blobs it reaches 100 %."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 2
    f = torch.randn(200, 8, generator=g) + 4.0 * (2 * y[:, None].float() - 1)
    args = eval_linear.parse_args(["--ckpt", "x", "--linear-epochs", "30", "--linear-opt", "adam", "--linear-batch", "10"])
    accs = eval_linear.linear_probe(args, lambda idx: f[idx], y[:100], f[100:], y[100:], 2, torch.device("cpu"))
    assert len(accs) == 30 and accs[-1] == 100.0
    lines = re.findall(r"linear probe: \d+/30 epochs \(loss ([\d.]+), lr ([\d.e+-]+), top-1", capsys.readouterr().out)
    assert lines and all(float(lr) == 1e-3 for _, lr in lines)
    assert float(lines[-1][0]) > 0.1  # smoothed targets keep the cross-entropy away from 0


@pytest.mark.slow
def test_transfer_probe_and_a_repeated_setting_share_one_result_file(finished_run, tmp_path, capsys):
    """A checkpoint trained on the synthetic set, probed on another data set (an ImageFolder of dark and
    bright noise, which any backbone separates): the result names both, --train-dataset is checked, and
    probing the same setting again (k-NN, then linear) fills one result file with both."""
    out, _ = finished_run
    root = tmp_path / "folder"
    g = torch.Generator().manual_seed(0)
    from torchvision.io import write_png
    for split, n in (("train", 30), ("test", 10)):
        for c in range(2):
            os.makedirs(root / split / f"c{c}")
            for i in range(n):
                img = (torch.rand(3, 32, 32, generator=g) * 60 + 20 + 150 * c).to(torch.uint8)
                write_png(img, str(root / split / f"c{c}" / f"{i}.png"))
    probe = ["--ckpt", str(out), "--dataset", "folder", "--data-dir", str(root), "--image-size", "32",
             "--train-dataset", "synthetic", "--mode", "central", "--out", str(tmp_path / "res"), "--workers", "0"]
    code, _, err = call(eval_linear.main, probe + ["--probe", "knn", "--knn-k", "5"], capsys)
    assert code == 0, err
    code, _, err = call(eval_linear.main, probe + ["--probe", "linear", "--linear-epochs", "5"], capsys)
    assert code == 0, err
    files = glob.glob(str(tmp_path / "res" / "eval-*.json"))
    assert len(files) == 1 and files[0].endswith("-folder.json"), files
    res = json.load(open(files[0]))
    assert (res["dataset"], res["trained_on"], res["n_train"], res["n_test"]) == ("folder", "synthetic", 60, 20)
    assert res["knn"]["k5"] >= 90 and "linear" in res
    code, _, err = call(eval_linear.main, probe[:-4] + ["--train-dataset", "cifar10", "--probe", "knn"], capsys)
    one_error_line(code, err, "--train-dataset cifar10: the checkpoint was trained on synthetic")


def test_float32_extraction_is_its_own_probe_setting(monkeypatch):
    """--amp off turns the bf16 autocast of feature extraction off (the official EMP-SSL evaluation is float32)
    and names its result file apart; on CUDA the autocast is enabled only with --amp bf16 (recorded)."""
    names = {}
    for amp in ("bf16", "off"):
        args = eval_linear.parse_args(["--ckpt", "x", "--amp", amp])
        args.trained_on = args.dataset = "cifar10"
        names[amp] = eval_linear.setting_name(args)
    assert names["off"] == names["bf16"].replace("backbone", "backbone-fp32") != names["bf16"]
    seen = []

    class Autocast:
        def __init__(self, device_type, dtype=None, enabled=True):
            seen.append(enabled)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    monkeypatch.setattr(eval_linear.torch, "autocast", Autocast)
    class Extracted(Exception):
        pass

    def extract(*a, **k):
        raise Extracted

    monkeypatch.setattr(eval_linear, "extract", extract)
    for amp in ("bf16", "off"):
        args = eval_linear.parse_args(["--ckpt", "x", "--amp", amp])
        with pytest.raises(Extracted):
            eval_linear.probe_all(args, None, None, None, torch.device("cuda"), {}, [20], ["knn"], "t")
    assert seen == [True, False]


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_compile_and_no_sync_bn_reach_the_network_of_every_script(method, tmp_path, monkeypatch):
    """--compile hands the (wrapped) training network to torch.compile once; --no-sync-bn reaches
    wrap_ddp as sync_bn=False (the default True). Recorded, not compiled: inductor on a CPU takes
    minutes; bench/gpu.py's compile stage runs the real thing on a GPU."""
    import importlib
    mod = importlib.import_module(method)
    compiled, synced = [], []
    monkeypatch.setattr(torch, "compile", lambda net, *a, **k: compiled.append(net) or net)
    real_wrap = common.wrap_ddp
    monkeypatch.setattr(common, "wrap_ddp", lambda model, device, sync_bn=True: synced.append(sync_bn)
                        or real_wrap(model, device, sync_bn))
    base = ["--dataset", "synthetic", "--subset", "32", "--batch-size", "16", "--out-size", "8", "--epochs", "1",
            "--max-steps", "1", "--workers", "0"]
    extra = {"emp_ssl": ["--patches", "2", "--patch-size", "8"], "bag_ssl": ["--arch", "resnet18"],
             "multiaug_ssl": ["--arch", "resnet18", "--views", "2"], "npid_sqrtkl": []}[method]
    for flags, out in ((["--compile", "--no-sync-bn"], "a"), ([], "b")):
        mod.main(base + extra + ["--out", str(tmp_path / out), *flags])
    assert synced == [False, True] and len(compiled) == 1
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in compiled[0].modules())  # the network itself
