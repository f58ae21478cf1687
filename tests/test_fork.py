"""The fork contract (README, "Forking a method"): a method file and common.py, alone in an empty
folder, train, resume and are probed; the README's walk-through turns a copy of emp_ssl.py into a
new loss that trains and is probed with no other edit."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the full run only (python -m pytest -q --full)

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "synthetic", "--subset", "64", "--batch-size", "16", "--patches", "2", "--patch-size", "16",
        "--out-size", "16", "--proj", "64-32", "--epochs", "1", "--log-every", "1"]


def run(folder, *argv):
    r = subprocess.run([sys.executable, *argv], cwd=folder, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def steps(run_dir):
    return [json.loads(line)["step"] for line in open(run_dir / "metrics.jsonl") if "step" in line]


def test_a_copy_of_emp_ssl_and_common_alone_trains_resumes_and_is_probed(tmp_path):
    for f in ("emp_ssl.py", "common.py", "eval_linear.py"):
        shutil.copy(ROOT / f, tmp_path / f)
    run(tmp_path, "emp_ssl.py", *TINY, "--max-steps", "2", "--out", "runs/a")
    out = run(tmp_path, "emp_ssl.py", *TINY, "--max-steps", "4", "--resume", "--out", "runs/a")
    assert "resumed from" in out and steps(tmp_path / "runs/a") == [1, 2, 3, 4]
    out = run(tmp_path, "eval_linear.py", "--ckpt", "runs/a", "--probe", "knn", "--knn-k", "5", "--patches", "2",
              "--subset", "100", "--test-subset", "50", "--workers", "0")
    assert re.search(r"k-NN k=5\s+\d+\.\d\d", out)


def test_the_readme_walk_through_makes_a_new_loss_that_trains_and_is_probed(tmp_path):
    readme = (ROOT / "README.md").read_text()
    assert "def mmcr_loss(Z):" in readme and "cp emp_ssl.py mmcr.py" in readme
    src = (ROOT / "emp_ssl.py").read_text().replace('METHOD = "emp_ssl"', 'METHOD = "mmcr"')
    src = src.replace("def emp_loss(", '''def mmcr_loss(Z):  # Z [n, B, d], L2-normalised
    return -torch.linalg.matrix_norm(Z.mean(0), ord="nuc")


def emp_loss(''')
    loop = "        loss, R, D = emp_loss(Z, args.eps2, args.inv_weight)\n"
    assert loop in src
    src = src.replace(loop, "        loss = mmcr_loss(Z)\n")
    src = src.replace('run.step({"loss": loss.detach(), "R": R.detach(), "D": D.detach()}, lr)',
                      'run.step({"loss": loss.detach()}, lr)')
    (tmp_path / "mmcr.py").write_text(src)
    for f in ("common.py", "eval_linear.py"):
        shutil.copy(ROOT / f, tmp_path / f)
    run(tmp_path, "mmcr.py", *TINY, "--max-steps", "2", "--out", "runs/mmcr")
    ckpt_method = json.load(open(tmp_path / "runs/mmcr/args.json"))["method"]
    assert ckpt_method == "mmcr" and steps(tmp_path / "runs/mmcr") == [1, 2]
    out = run(tmp_path, "eval_linear.py", "--ckpt", "runs/mmcr", "--probe", "knn", "--knn-k", "5", "--patches", "2",
              "--subset", "100", "--test-subset", "50", "--workers", "0", "--compare-random")
    assert re.search(r"k-NN k=5\s+\d+\.\d\d\s+\d+\.\d\d", out)
