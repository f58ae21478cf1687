"""bench/reproduce_gpu.sh's stage logic on the CPU, with `echo` standing in for python: --only runs
the stages it names in that order, --resume skips the done ones, a name that is no stage is one
error line and exit code 2. (The stages themselves need a GPU; `--smoke` runs them at toy size.)"""
import os
import subprocess

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
