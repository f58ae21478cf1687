"""bench/reproduce_gpu.sh's stage logic on the CPU, with `echo` standing in for python: --only runs
the stages it names in that order, --resume skips the done ones, a name that is no stage is one
error line and exit code 2. (The stages themselves need a GPU; `--smoke` runs them at toy size.)
The control (bench/emp_control.py): the authors' state dict mapped onto emp_ssl.EMPNet, and, with their
code fetched, the control stages' smoke (marked slow)."""
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def script(args, tmp_path):
    data = tmp_path / "cifar"
    for split in ("train", "test"):
        (data / split).mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHON": "echo"}  # each stage's command is then printed, not run
    return subprocess.run(["bash", "bench/reproduce_gpu.sh", "--data", str(data), "--out", str(tmp_path / "out"),
                           *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=60)


def ran(tmp_path):
    return [line.split()[0] for line in open(tmp_path / "out" / "stages.txt")]


def test_only_runs_the_named_stages_in_the_given_order_and_resume_skips_done_ones(tmp_path):
    r = script(["--only", "t1-head1,cos20,t1"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert ran(tmp_path) == ["t1-head1", "cos20", "t1"]
    cmds = open(tmp_path / "out" / "commands.txt").read().splitlines()
    assert cmds[0].startswith("== t1-head1: echo eval_linear.py") and "--feature head1" in cmds[0]
    # the stage's command reached the program word for word (echo wrote it to the stage's log)
    assert open(tmp_path / "out" / "cos20.log").read().split() == cmds[1].split()[3:]
    r = script(["--resume", "--only", "t1,speed"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "== t1: done before, skipped" in r.stdout
    assert ran(tmp_path) == ["t1-head1", "cos20", "t1", "speed"]


def test_an_empty_argument_survives_the_stage_list(tmp_path):
    r = script(["--only", "compile"], tmp_path)
    assert r.returncode == 0, r.stderr
    log = open(tmp_path / "out" / "compile.log").read()
    assert log.rstrip("\n").endswith("--memory-patches ")  # echo prints the empty word as nothing


def test_unknown_stage_is_one_error_line_and_exit_2(tmp_path):
    r = script(["--only", "cos20,tabel1"], tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --only names no stage 'tabel1'"), r.stderr
    assert not (tmp_path / "out").exists()


def test_the_control_and_the_authors_projector_run_first(tmp_path):
    """A GPU session's first minutes go to the control and the projector; --emp-code reaches the control."""
    r = script(["--emp-code", "/x/EMP-SSL"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert ran(tmp_path)[:4] == ["control", "control-head1", "proj20", "proj20-head1"]
    words = lambda stage: open(tmp_path / "out" / f"{stage}.log").read().split()  # noqa: E731
    ctl = words("control")
    assert ctl[0] == "bench/emp_control.py" and ctl[ctl.index("--code") + 1] == "/x/EMP-SSL"
    assert "--own-eval" in words("control-own") and "--own-eval" not in ctl
    for stage in ("control-head1", "proj20-head1", "proj20-fp32-head1"):
        w = words(stage)
        assert {"--feature", "head1", "--bag-augment", "random"} <= set(w), stage
    for stage in ("proj20", "proj20-fp32"):
        w = words(stage)
        assert w[w.index("--proj") + 1] == "4096-4096-1024" and ("--amp" in w) == stage.endswith("fp32"), stage


@pytest.mark.slow
def test_gpu_bench_smoke_runs_every_row_on_the_cpu():
    """bench/gpu.py --smoke: every section at toy size, so that a GPU session spends its minutes measuring."""
    import re
    import sys
    r = subprocess.run([sys.executable, "bench/gpu.py", "--smoke", "--device", "cpu"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stderr[-2000:]
    rows = re.findall(r"pipeline row (\w+) .*step alone +([\d,]+) patches/s.*with / alone = ([\d.]+)", r.stdout)
    assert [row[0] for row in rows] == ["emp20", "emp200", "bag", "multiaug"], r.stdout
    assert all(float(row[2]) > 0 for row in rows) and "fp32 step / ceiling" in r.stdout


# --- the control: the EMP-SSL authors' code (bench/emp_control.py) ---------------------------------

EMP_CODE = os.environ.get("EFFSSL_EMP_CODE", os.path.join(ROOT, "cache", "EMP-SSL"))


def authors_shaped_encoder():
    """A module named and shaped as the authors' encoder (github.com/tsb0601/EMP-SSL, model/model.py),
    built here from its description: `backbone` a torchvision ResNet-18 with a 3x3 stride-1 stem, no
    max-pool, no fc; `pre_feature` Linear(512, 4096), BatchNorm1d, ReLU; `projection` Linear(4096, 4096),
    BatchNorm1d, ReLU, Linear(4096, 1024); z = normalize(projection(pre_feature(backbone(x)))). BatchNorm
    statistics and affine parameters random, so that two BatchNorms swapped by a mapping show."""
    import torch
    import torch.nn as nn
    import torchvision
    torch.manual_seed(0)
    net = nn.Module()
    net.backbone = torchvision.models.resnet18()
    net.backbone.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.backbone.maxpool, net.backbone.fc = nn.Identity(), nn.Identity()
    net.pre_feature = nn.Sequential(nn.Linear(512, 4096), nn.BatchNorm1d(4096), nn.ReLU())
    net.projection = nn.Sequential(nn.Linear(4096, 4096), nn.BatchNorm1d(4096), nn.ReLU(), nn.Linear(4096, 1024))
    for m in net.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    return net.eval()


def test_authors_state_dict_maps_key_for_key_onto_empnet_and_its_head1_probe(tmp_path):
    """Their nn.DataParallel state dict ("module." names) loads strictly into emp_ssl.EMPNet --proj
    4096-4096-1024 and gives their z; the effssl checkpoint written from it gives eval_linear.py's
    --feature head1 their 4096-d pre_feature output (the feature of their evaluation)."""
    import torch
    import torch.nn.functional as F
    from bench import emp_control
    import eval_linear
    theirs = authors_shaped_encoder()
    state = {f"module.{k}": v for k, v in theirs.state_dict().items()}
    x = torch.randn(2, 3, 16, 16)  # the CIFAR stem takes any side; small for speed
    with torch.no_grad():
        want_h1 = theirs.pre_feature(theirs.backbone(x))
        want_z = F.normalize(theirs.projection(want_h1), dim=1)
        ours = emp_control.empnet_from_authors(state).eval()
        assert torch.allclose(ours(x), want_z, atol=1e-5)
        for name in ("main.py", "evaluate.py", "func.py", "dataset/datasets.py"):  # what --code must hold
            (tmp_path / "code" / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "code" / name).touch()
        args = emp_control.parse_args(["--code", str(tmp_path / "code"), "--data", str(tmp_path / "cifar"),
                                       "--out", str(tmp_path / "control")])
        path = emp_control.write_checkpoint(state, args, {"steps": 500})
        backbone, proj, info = eval_linear.load_backbone(eval_linear.parse_args(["--ckpt", path, "--feature", "head1"]))
        assert info["proj"] == "4096-4096-1024" and info["patch_size"] == 16 and info["out_size"] == 32
        assert torch.allclose(proj.eval()(backbone.eval()(x)), want_h1, atol=1e-5)


@pytest.mark.slow  # five Python processes, 60-90 CPU-seconds here: over the default run's budget
@pytest.mark.skipif(not os.path.isfile(os.path.join(EMP_CODE, "main.py")),
                    reason="the EMP-SSL authors' code is not fetched (git clone https://github.com/tsb0601/EMP-SSL "
                           "cache/EMP-SSL; bench/emp_control.py pins the commit)")
def test_control_stages_smoke_on_the_cpu(tmp_path):
    """bench/reproduce_gpu.sh --smoke --only control,control-head1,control-own: the authors' code copied,
    edited and trained for one step on the CPU, its model probed by eval_linear.py and by their own
    evaluate.py, on a tiny CIFAR-10 ImageFolder."""
    import json
    import sys
    from test_tools import image_folder
    image_folder(tmp_path / "cifar", per_class=10)  # 100 train (their linear probe's one batch), 50 test
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "EFFSSL_CACHE": str(tmp_path / "decoded"), "OMP_NUM_THREADS": "2"}
    r = subprocess.run(["bash", "bench/reproduce_gpu.sh", "--smoke", "--data", str(tmp_path / "cifar"), "--out",
                        str(out), "--emp-code", EMP_CODE, "--only", "control,control-head1,control-own"],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert [line.split()[:3] for line in open(out / "stages.txt")] == \
        [[s, "rc", "0"] for s in ("control", "control-head1", "control-own")], r.stdout[-3000:]
    ctl = json.load(open(out / "control" / "control.json"))
    assert ctl["steps"] == 1 and any("md5" in e for e in ctl["edits"]) and ctl["log"], ctl
    head1 = json.load(open(out / "control" / "eval-bag-p1-s16-random-aug-head1-n200-100.json"))
    assert head1["dim"] == 4096 and 0 <= head1["linear"]["last"] <= 100
    own = json.load(open(out / "control" / "eval-authors-p1.json"))
    assert set(own) >= {"linear", "knn"}, own
