"""tools/export.py: the exported backbone, loaded by the lines the tool prints into a model built by
torch and torchvision alone, gives the features of the effssl backbone, for every architecture."""
import os
import subprocess
import sys

import pytest
import torch

import common
from cli_util import call
from tools import export

pytestmark = pytest.mark.slow  # the full run only (python -m pytest -q --full)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_run(folder, arch, stem, size):
    """A run folder holding checkpoint.pt as a method script writes it, with a common.backbone whose
    batch norms are off their init (random affine and statistics); returns the backbone in eval mode."""
    torch.manual_seed(0)
    bb = common.backbone(arch, stem)
    for m in bb.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            for t in (m.weight, m.running_var):
                t.data.uniform_(0.5, 1.5)
            for t in (m.bias, m.running_mean):
                t.data.uniform_(-0.2, 0.2)
    os.makedirs(folder)
    probe = {"arch": arch, "stem": stem, "out_size": size, "mean": [0.5] * 3, "std": [0.5] * 3}
    torch.save({"method": "emp_ssl", "step": 1, "epoch": 0, "backbone": bb.state_dict(), "model": {},
                "args": {"arch": arch, "stem": stem, "dataset": "synthetic"}, "probe": probe},
               os.path.join(folder, "checkpoint.pt"))
    return bb.eval()


def assert_same_features(printed, bb, size):
    """Run what the tool printed (valid Python as a whole) and compare its model with bb in eval mode."""
    scope = {}
    exec(printed, scope)
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(scope["m"].eval()(x), bb(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch,stem,size", [(a, "cifar", 32) for a in common.ARCHS] + [("resnet50", "imagenet", 64)])
def test_export_loads_strictly_into_torchvision_with_the_same_features(tmp_path, capsys, arch, stem, size):
    bb = fake_run(tmp_path / "run", arch, stem, size)
    code, out, err = call(export.main, ["--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "bb.pt")], capsys)
    assert (code, err) == (0, [])
    assert sorted(os.listdir(tmp_path)) == ["bb.pt", "run"]  # no temporary file left
    assert_same_features(out, bb, size)


def test_command_line_prints_the_readme_snippet(tmp_path, monkeypatch):
    """The command as the README gives it (a CIFAR ResNet-18), in a process of its own; the lines it
    prints are the README's."""
    bb = fake_run(tmp_path / "run", "resnet18", "cifar", 32)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "export.py"), "--ckpt", "run",
                        "--out", "resnet18-cifar.pt"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    monkeypatch.chdir(tmp_path)
    assert_same_features(r.stdout, bb, 32)
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    for line in r.stdout.splitlines()[1:]:
        assert line in readme, line


@pytest.mark.parametrize("kind", ["missing", "foreign", "text"])
def test_bad_input_is_one_error_line(tmp_path, capsys, kind):
    path = tmp_path / "checkpoint.pt"
    if kind == "foreign":
        torch.save({"state_dict": {}}, path)
    elif kind == "text":
        path.write_text("not a checkpoint\n")
    code, out, err = call(export.main, ["--ckpt", str(path), "--out", str(tmp_path / "bb.pt")], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert not (tmp_path / "bb.pt").exists()
