"""tools/requeue.sbatch, the README's self-requeueing job, on a real one-node SLURM cluster that the test
starts on localhost (Debian's slurm-wlm and munge; root): SLURM's USR1 reaches the script mid-run, the
trap's SIGTERM makes torchrun's workers save the step in progress, `scontrol requeue` puts the job back,
and the next allocation resumes; the finished run equals an uninterrupted one bit for bit.

Only the sizing of the script changes: no GPUs, 2 CPU ranks, a two-minute limit, a tiny synthetic run.
SLURM checks time limits in rounds of about 30 s and sends --signal early (sbatch(1): up to 60 s):
with --time=1 and USR1@1 the signal came 30-54 s into an allocation here, with --time=2 and USR1@31
(used here) 84-87 s in, the kill at the time limit a round later, time enough for the trap. An
allocation trains for what is left after torchrun's start, which took 15-40 s on 2 busy cores (a
one-minute limit left too little), and the run is sized, by a measured step, to outlast the 89 s.
"""
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "requeue.sbatch")
TRAIN = ("--dataset synthetic --subset 256 --batch-size 32 --patches 2 --patch-size 16 --out-size 16 "
         "--log-every 1 --save-every 1000 --workers 0")
STEPS_PER_EPOCH = 256 // 32
RUN_SECONDS = 105  # of training, uninterrupted: longer than an allocation lasts before its USR1 (89 s)


def test_readme_shows_the_requeue_script():
    with open(os.path.join(ROOT, "README.md")) as f:
        blocks = re.findall(r"^```\n(#!/bin/bash\n.*?)^```$", f.read(), re.M | re.S)
    with open(SCRIPT) as f:
        assert blocks == [f.read()]


def submitted_script(run_dir, epochs):
    """tools/requeue.sbatch with only its sizing changed; each change must apply exactly once."""
    with open(SCRIPT) as f:
        text = f.read()
    for old, new in ((" --gpus-per-node=4", ""), ("--time=24:00:00", "--time=2"),
                     ("--signal=B:USR1@120", "--signal=B:USR1@31"), ("--nproc_per_node=4", "--nproc_per_node=2"),
                     ("--dataset in100 --out runs/emp-in100", f"{TRAIN} --epochs {epochs} --out {run_dir}")):
        assert text.count(old) == 1, f"tools/requeue.sbatch changed: no single '{old}' left to resize"
        text = text.replace(old, new)
    return text


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(d):
    return "\n".join(f"--- {n}\n" + open(os.path.join(d, n), errors="replace").read()[-1500:]
                     for n in sorted(os.listdir(d)) if n.endswith(".log"))


@pytest.fixture
def slurm():
    """A one-node cluster (munged, slurmctld, slurmd) in a temporary folder: the environment for its
    commands. A requeued job may start again 6 s later: AuthInfo cred_expire=5 (slurm.conf(5): 'how long
    a requeued job must wait before starting again', default 120 s) and a scheduler pass every second."""
    needed = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo")
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    missing = [n for n in needed if not shutil.which(n, path=path)]
    if missing:
        pytest.skip(f"SLURM is not installed (no {', '.join(missing)}): apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("the SLURM test starts slurmd, which runs jobs as root")
    d = tempfile.mkdtemp(prefix="effssl-slurm-")  # short: munge's socket path must fit a sockaddr
    os.chmod(d, 0o755)  # munged wants its socket's folder searchable by all
    with open(os.path.join(d, "munge.key"), "wb") as f:
        f.write(os.urandom(1024))
    os.chmod(os.path.join(d, "munge.key"), 0o400)
    host = socket.gethostname().split(".")[0]
    with open("/proc/meminfo") as f:
        mem = int(re.search(r"MemAvailable:\s+(\d+)", f.read()).group(1)) // 1024 * 9 // 10
    conf = f"""ClusterName=effssl
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge.socket,cred_expire=5
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
ReturnToService=2
SlurmdParameters=config_overrides
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={mem} State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""
    with open(os.path.join(d, "slurm.conf"), "w") as f:
        f.write(conf)
    # every command and run: this cluster, this venv's torchrun, one thread a rank (the same float reductions)
    env = {**os.environ, "SLURM_CONF": os.path.join(d, "slurm.conf"), "PATH": path, "OMP_NUM_THREADS": "1"}
    procs = []
    try:
        for cmd in (["munged", "-F", f"--socket={d}/munge.socket", f"--key-file={d}/munge.key",
                     f"--pid-file={d}/munged.pid", f"--seed-file={d}/munged.seed"],
                    ["slurmctld", "-D"], ["slurmd", "-D", "-N", host]):
            with open(os.path.join(d, f"{cmd[0]}.out.log"), "w") as log:
                procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
            if cmd[0] == "munged":  # the slurm daemons authenticate through its socket from their start
                wait_until(lambda: os.path.exists(f"{d}/munge.socket"), 10)
        if not wait_until(lambda: sinfo(env) == "idle", 30):
            pytest.skip(f"the SLURM daemons did not come up within 30 s:\n{log_tail(d)}")
        yield env
    finally:
        try:
            if procs and squeue(env):  # a failed test's job: cancelled, and its processes gone, before slurmd
                subprocess.run(["scancel", *squeue(env).split()], env=env, timeout=30)
                wait_until(lambda: not squeue(env, "-t", "R,CG"), 30)
        finally:
            for p in reversed(procs):
                p.terminate()
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            shutil.rmtree(d, ignore_errors=True)


def wait_until(ready, seconds):
    """Poll ready() until it holds (True) or seconds have passed (False)."""
    deadline = time.time() + seconds
    while not ready():
        if time.time() > deadline:
            return False
        time.sleep(0.2)
    return True


def sinfo(env):
    return subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True,
                          timeout=30).stdout.strip()


def squeue(env, *flags):
    """The ids of the cluster's jobs (squeue's default: pending and running), one a line."""
    return subprocess.run(["squeue", "-h", "-o", "%i", *flags], env=env, capture_output=True, text=True,
                          timeout=30).stdout.strip()


def job_state(job, env):
    """(JobState, Restarts) of a job, from scontrol (no accounting needed)."""
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True,
                         timeout=30).stdout
    state, restarts = re.search(r"JobState=(\S+)", out), re.search(r"Restarts=(\d+)", out)
    return (state.group(1), int(restarts.group(1))) if state and restarts else ("UNKNOWN", 0)


def torchrun_line(script, run_dir):
    """The script's training command, run in the foreground into run_dir."""
    line = next(line for line in script.splitlines() if line.startswith("torchrun "))
    return re.sub(r"--out \S+", f"--out {run_dir}", line).removesuffix(" &")


def seconds_per_step(tmp, env):
    """This machine's step time now, under the script's torchrun: a long run stopped after 5 steps."""
    cal = os.path.join(tmp, "calibrate")
    cmd = torchrun_line(submitted_script(cal, 1000), cal) + " --max-steps 5"
    r = subprocess.run(cmd, shell=True, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(os.path.join(cal, "metrics.jsonl")) as f:
        t = {rec["step"]: rec["elapsed_s"] for rec in map(json.loads, f)}
    return (t[5] - t[2]) / 3  # the first step warms up


@pytest.mark.slow
def test_requeue_script_resumes_under_slurm_and_equals_the_uninterrupted_run(slurm, tmp_path):
    env = slurm
    step_s = seconds_per_step(tmp_path, env)
    epochs = max(3, math.ceil(RUN_SECONDS / step_s / STEPS_PER_EPOCH))
    total = epochs * STEPS_PER_EPOCH
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    script = submitted_script(run_dir, epochs)
    (tmp_path / "job.sbatch").write_text(script)
    r = subprocess.run(["sbatch", "--parsable", f"--chdir={ROOT}", f"--output={out}", str(tmp_path / "job.sbatch")],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    start = time.time()
    deadline = start + 900  # generous: on busy cores torchrun's start takes a good part of each allocation
    state, restarts = job_state(job, env)
    while state not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
        assert time.time() < deadline, f"job {job} still {state} after 15 min:\n{out.read_text()[-3000:]}"
        time.sleep(2)
        state, restarts = job_state(job, env)
    log, job_s = out.read_text(), time.time() - start
    assert state == "COMPLETED", f"job {job} ended {state}:\n{log[-3000:]}"
    stops = [int(a) for a, b in re.findall(r"stopped by SIGTERM at step (\d+); checkpoint saved at step (\d+)", log)
             if a == b]
    resumes = [int(k) for k in re.findall(r"resumed from \S+ at step (\d+)", log)]
    assert restarts >= 1 and stops and resumes, \
        f"never requeued mid-run ({total} steps, {step_s:.2f} s each by measure):\n{log[-3000:]}"
    assert set(stops) <= set(resumes) and max(stops) < total, log[-3000:]  # each stop's step is where one resumed
    with open(run_dir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [rec["step"] for rec in records] == list(range(1, total + 1)) and all("loss" in rec for rec in records)

    ref_dir = tmp_path / "uninterrupted"
    r = subprocess.run(torchrun_line(script, ref_dir), shell=True, cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    got, want = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (run_dir, ref_dir))
    assert got["step"] == want["step"] == total
    assert got["model"].keys() == want["model"].keys()
    for k in want["model"]:
        assert torch.equal(got["model"][k], want["model"][k]), k
    print(f"{total} steps ({step_s:.2f} s each by measure), the job {job_s:.0f} s, requeued {restarts} times: "
          f"stopped at steps {stops}, resumed at {resumes}")
