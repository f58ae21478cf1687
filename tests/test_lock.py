"""One process per run folder (common.lock_run_folder): a second process on a folder in use is one
line naming the holder, exit 2, and changes nothing; a holder killed with SIGKILL leaves no stale
lock. (Under torchrun --max-restarts the restarted group takes the lock again: the restart tests of
test_emp_ssl.py and test_multiaug_ssl.py kill a worker and finish the run.)"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the full run only (python -m pytest -q --full)

ROOT = Path(__file__).resolve().parents[1]
RUN = [sys.executable, "emp_ssl.py", "--dataset", "synthetic", "--subset", "256", "--batch-size", "32",
       "--patches", "2", "--patch-size", "16", "--out-size", "16", "--proj", "64-32", "--log-every", "1",
       "--save-every", "1", "--workers", "0"]


def start(out, *flags):
    return subprocess.Popen([*RUN, *flags, "--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_step(out, step, proc, timeout=900):
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        try:
            if any(json.loads(line).get("step", 0) >= step for line in open(out / "metrics.jsonl")) \
                    and (out / "checkpoint.pt").exists():
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"no step {step} in {timeout} s")


def test_a_second_process_on_a_folder_in_use_is_refused_and_changes_nothing(tmp_path):
    out = tmp_path / "run"
    holder = start(out, "--epochs", "40")
    try:
        wait_for_step(out, 2, holder)
        before = (out / "checkpoint.pt").stat().st_mtime_ns, (out / "args.json").read_text()
        holder.send_signal(signal.SIGSTOP)  # nothing moves while the second process tries
        try:
            second = subprocess.run([*RUN, "--epochs", "40", "--resume", "--out", str(out)], cwd=ROOT,
                                    capture_output=True, text=True, timeout=900)
            after = (out / "checkpoint.pt").stat().st_mtime_ns, (out / "args.json").read_text()
        finally:
            holder.send_signal(signal.SIGCONT)
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 2 and len(lines) == 1, second.stderr
        assert "in use by another run" in lines[0] and f"pid {holder.pid}" in lines[0] and "host " in lines[0]
        assert after == before and "resumed" not in second.stdout
    finally:
        holder.kill()
        holder.communicate()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "run"
    holder = start(out, "--epochs", "40")
    wait_for_step(out, 2, holder)
    os.kill(holder.pid, signal.SIGKILL)
    holder.communicate()
    saved = int(json.loads((out / "args.json").read_text())["save_every"])
    assert saved == 1
    resumed = subprocess.run([*RUN, "--epochs", "40", "--max-steps", "4", "--resume", "--out", str(out)], cwd=ROOT,
                             capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl") if '"loss"' in line]
    assert steps == sorted(set(steps)) and steps[-1] == 4
