"""The EMP-SSL authors' own code as a control: their training script for one epoch on our CIFAR-10
copy, scored by our probe and, optionally, by their own evaluation script.

Tong, Chen, Ma, LeCun, "EMP-SSL: Towards Self-Supervised Learning in One Training Epoch", 2023,
arXiv:2304.03977; the authors' code is github.com/tsb0601/EMP-SSL. It never enters this repository:
fetch it beside the data (cache/ is git-ignored), at the commit these edits were written for,

    git clone https://github.com/tsb0601/EMP-SSL cache/EMP-SSL
    git -C cache/EMP-SSL checkout 8fc3758617e09b88c8579b9bdfa5d219b41cd456

then, on one CUDA GPU (bench/reproduce_gpu.sh runs the same as its stages control, control-head1,
control-eval and control-own):

    python bench/emp_control.py --code cache/EMP-SSL --data cache/cifar10 --out runs/gpu/control
    python eval_linear.py --ckpt runs/gpu/control --mode bag --patches 128 --feature head1 --bag-augment \
        --positions random
    python bench/emp_control.py --code cache/EMP-SSL --data cache/cifar10 --out runs/gpu/control \\
        --own-eval --test-patches 16

What it does, each step printed:
  1. data: tools/cifar_batches.py writes our ImageFolder copy as torchvision's cifar-10-batches-py
     (the same decoded pixels our runs train on), once, under --work (outside OUT: no file of theirs,
     nor the data, travels with OUT's results);
  2. a fresh copy of --code in WORK/code, edited by EDITS below (each edit is printed with its reason):
     the md5 check of the original CIFAR-10 files, the device (CUDA when there is one, else the CPU),
     loader workers, a step limit for the CPU smoke, torchmetrics' current signature; a package the
     copy imports but this Python lacks (tqdm, matplotlib, scikit-learn, torchmetrics: none of them
     on the training path) gets a stub, printed too;
  3. their main.py: --epochs epochs of --patches patches, batch 100, lr 0.3, a cosine over
     --schedule-epochs epochs (default --epochs; their README's one-epoch command runs --epoch 2);
  4. their state dict (OUT/authors.pt, as saved) mapped key for key onto emp_ssl.EMPNet with the
     authors' projector 4096-4096-1024 (KEY_MAP) and written as an effssl checkpoint, OUT/checkpoint.pt,
     which eval_linear.py probes as it probes our own runs;
  --own-eval: their evaluate.py on OUT/authors.pt with --test-patches patches a bag (their default 128
     costs about 7.7M PIL augmentations on the CPU), linear and k-NN; the figures in
     OUT/eval-authors-p<N>.json.
--smoke (bench/reproduce_gpu.sh --smoke): the same steps at toy size, on the CPU where there is no GPU.
"""
import argparse
import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import emp_ssl  # noqa: E402
from common import fail  # noqa: E402
from tools import cifar_batches  # noqa: E402

PINNED = "8fc3758617e09b88c8579b9bdfa5d219b41cd456"  # tsb0601/EMP-SSL, 2023-08-03: the commit EDITS fit
URL = "https://github.com/tsb0601/EMP-SSL"
PROJ = "4096-4096-1024"  # their encoder: 512 -> 4096 (BN, ReLU) -> 4096 (BN, ReLU) -> 1024

# their encoder's parameter names (under nn.DataParallel's "module.") -> emp_ssl.EMPNet's with
# --proj 4096-4096-1024: their pre_feature (Linear, BN, ReLU) is our projector's first block, the
# 4096-d feature of their evaluation (our --feature head1); their projection (Linear, BN, ReLU,
# Linear) our second block and last Linear. The backbones are the same torchvision ResNet-18.
KEY_MAP = (("backbone.", "backbone."), ("pre_feature.0.", "projector.0."), ("pre_feature.1.", "projector.1."),
           ("projection.0.", "projector.3."), ("projection.1.", "projector.4."), ("projection.3.", "projector.6."))

ENV_WORKERS, ENV_MAX_STEPS, ENV_STOP_EPOCH, ENV_LINEAR_WORKERS = \
    "EMP_WORKERS", "EMP_MAX_STEPS", "EMP_STOP_EPOCH", "EMP_LINEAR_WORKERS"

# (file, text, replacement, how many places (0: all), why): exact edits of the pinned commit, each
# anchored on a few characters of it (no line of their code is kept here)
EDITS = (
    ("dataset/datasets.py", "import torchvision\n",
     "import torchvision\nimport torchvision.datasets.cifar\n"
     "torchvision.datasets.CIFAR10._check_integrity = lambda self: True  # effssl control edit\n"
     "torchvision.datasets.cifar.check_integrity = lambda *args, **kwargs: True  # effssl control edit\n", 1,
     "CIFAR-10's md5 checks bypassed: the batches hold our JPEG copy (tools/cifar_batches.py), not the original files"),
    ("dataset/datasets.py", "download=True", "download=False", 0,
     "download=False: the converted batches are in place under data/CIFAR10 (and a GPU machine may have no internet)"),
    ("main.py", "use_cuda = True", "use_cuda = torch.cuda.is_available()", 1,
     "device: CUDA when there is one, else the CPU (the smoke); nn.DataParallel kept (one GPU: the module as is)"),
    ("main.py", "net.cuda()", "net.to(device)", 1, "device: the model on `device`"),
    ("main.py", "data.cuda()", "data.to(device)", 1, "device: the batch on `device`"),
    ("main.py", "num_workers=16", f"num_workers=int(os.environ.get('{ENV_WORKERS}', 16))", 0,
     f"loader workers from ${ENV_WORKERS} (their 16 when unset; 0 in the smoke)"),
    ("main.py", "range(args.epoch)", f"range(int(os.environ.get('{ENV_STOP_EPOCH}') or args.epoch))", 1,
     f"stop after ${ENV_STOP_EPOCH} epochs of the --epoch-long cosine (unset: all of them)"),
    ("main.py", "scheduler.step()\n",
     f"scheduler.step()\n            if step + 1 == int(os.environ.get('{ENV_MAX_STEPS}') or 0):\n"
     "                break  # effssl control edit\n", 1,
     f"a step limit per epoch from ${ENV_MAX_STEPS} for the CPU smoke (unset: the whole epoch)"),
    ("evaluate.py", "import argparse\n", "import argparse\nimport os\n", 1, "import os (for the edits below)"),
    ("evaluate.py", "use_cuda = True", "use_cuda = torch.cuda.is_available()", 1,
     "device: CUDA when there is one, else the CPU"),
    ("evaluate.py", "net.cuda()", "net.to(device)", 1, "device: the model on `device`"),
    ("evaluate.py", "num_workers=8", f"num_workers=int(os.environ.get('{ENV_WORKERS}', 8))", 0,
     f"loader workers from ${ENV_WORKERS} (their 8 when unset)"),
    ("func.py", "import numpy as np\n", "import os\nimport numpy as np\n", 1, "import os (for the edit below)"),
    ("func.py", "num_workers=2", f"num_workers=int(os.environ.get('{ENV_LINEAR_WORKERS}', 2))", 0,
     f"linear probe loader workers from ${ENV_LINEAR_WORKERS} (their 2 when unset; 0 in the smoke)"),
    ("func.py", ", compute_on_step=False", "", 1,
     "torchmetrics 1.x refuses compute_on_step (deprecated in 0.8, then removed); their k-NN calls compute() itself"),
)

# modules the copy imports that the training and evaluation paths do not use (or, tqdm, only wrap):
# written as stubs when this Python lacks them (the CPU smoke's environment), never over a real one
STUBS = {
    "tqdm": {"tqdm.py": "def tqdm(iterable=None, *args, **kwargs):\n    return iterable\n"},
    "matplotlib": {"matplotlib/__init__.py": "", "matplotlib/pyplot.py": ""},
    "sklearn": {"sklearn/__init__.py": "",
                "sklearn/metrics.py": "def normalized_mutual_info_score(*args, **kwargs):\n"
                                      "    raise NotImplementedError\n\n\n"
                                      "def adjusted_rand_score(*args, **kwargs):\n    raise NotImplementedError\n"},
    "torchmetrics": {"torchmetrics/__init__.py": "", "torchmetrics/metric.py": '''class Metric:
    """The little of torchmetrics.Metric their WeightedKNNClassifier uses: list states and reset()."""

    def __init__(self, **kwargs):
        self._defaults = {}

    def add_state(self, name, default, **kwargs):
        self._defaults[name] = default
        setattr(self, name, list(default))

    def reset(self):
        for name, default in self._defaults.items():
            setattr(self, name, list(default))
'''},
}


def authors_to_empnet(state):
    """The authors' encoder state dict (their main.py saves nn.DataParallel(encoder).state_dict())
    as emp_ssl.EMPNet's state dict (--proj 4096-4096-1024), key for key (KEY_MAP)."""
    out = {}
    for key, value in state.items():
        k = key[len("module."):] if key.startswith("module.") else key
        for theirs, ours in KEY_MAP:
            if k.startswith(theirs):
                out[ours + k[len(theirs):]] = value
                break
        else:
            fail(f"the authors' state dict holds '{key}', which KEY_MAP does not map (not their encoder?)")
    return out


def empnet_from_authors(state):
    """An emp_ssl.EMPNet (ResNet-18, CIFAR stem, projector 4096-4096-1024) holding the authors'
    weights; loading is strict, so a key or a shape that does not map is an error."""
    with torch.device("meta"):  # no random init: every tensor comes from `state`
        model = emp_ssl.EMPNet("resnet18", "cifar", PROJ)
    try:
        model.load_state_dict(authors_to_empnet(state), assign=True)
    except RuntimeError as e:
        fail(f"the authors' state dict does not fit emp_ssl.EMPNet --proj {PROJ}: {str(e).splitlines()[0]}")
    return model


def run_args(args):
    """The emp_ssl arguments of the run the control stands for (its probe reads dataset, data_dir,
    the patch and input sides, the normalisation, the projector and the augmentation from them)."""
    argv = ["--dataset", "cifar10", "--data-dir", args.data, "--out", args.out, "--resume", "--proj", PROJ,
            "--patches", str(args.patches), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
            "--lr", str(args.lr), "--patch-sampler", "official", "--amp", "off"]
    if args.schedule_epochs:
        argv += ["--schedule-epochs", str(args.schedule_epochs)]
    return emp_ssl.resolve_args(emp_ssl.parse_args(argv))


def write_checkpoint(state, args, info):
    """OUT/checkpoint.pt in effssl's format (common.Run.save's keys), from the authors' state dict."""
    model = empnet_from_authors(state)
    targs = run_args(args)
    probe = common.probe_info(targs.arch, targs.stem, targs.out_size, targs.norm_mean, targs.norm_std, "bag",
                              patch_size=targs.patch_size, proj=targs.proj, aug=vars(emp_ssl.augmentation(targs)))
    targs = {**vars(targs), "control": info}
    path = os.path.join(args.out, "checkpoint.pt")
    os.makedirs(args.out, exist_ok=True)
    common.atomic_save({"method": "emp_ssl", "args": targs, "step": info.get("steps"),
                        "backbone": model.backbone.state_dict(), "model": model.state_dict(), "probe": probe}, path)
    return path


def code_commit(code):
    """The commit of a git checkout at `code`, or None (a copy without .git)."""
    try:
        r = subprocess.run(["git", "-C", code, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30)
        return r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def prepare_data(args):
    """(a folder of --work holding cifar-10-batches-py from --data, converted once (a stamp records
    source and size), the number of training images)."""
    root = os.path.join(args.work, "cifar10-batches" + (f"-limit{args.limit}" if args.limit else ""))
    stamp = os.path.join(root, "source.json")
    want = {"data": os.path.realpath(args.data), "limit": args.limit}
    if os.path.exists(stamp):
        with open(stamp) as f:
            done = json.load(f)
        if {k: done.get(k) for k in want} == want:
            print(f"data: {root}/{cifar_batches.BASE} converted before, reused", flush=True)
            return root, done["train"]
    t = time.time()
    made = cifar_batches.convert(args.data, root, limit=args.limit, workers=max(args.workers, 2))
    with open(stamp, "w") as f:
        json.dump({**want, "train": made["train"], "test": made["test"]}, f)
    print(f"data: converted in {time.time() - t:.1f} s", flush=True)
    return root, made["train"]


def prepare_code(args, data_root):
    """A fresh, edited copy of --code in WORK/code: (its folder, the edits made, the stub folder, --code's commit)."""
    commit = code_commit(args.code)
    if commit != PINNED:
        print(f"warning: --code is at {commit or 'an unknown commit'}, the edits were written for {PINNED}",
              file=sys.stderr, flush=True)
    dst = os.path.join(args.work, "code")
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(args.code, dst, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.pyc", "logs", "data"))
    made = []
    for name, old, new, count, why in EDITS:
        path = os.path.join(dst, name)
        with open(path) as f:
            text = f.read()
        n = text.count(old)
        if n == 0 or (count and n < count):
            fail(f"{name} of --code has no '{old.strip()}' to edit: not the commit {PINNED} these edits fit")
        with open(path, "w") as f:
            f.write(text.replace(old, new, count or -1))
        made.append(f"{name}: {why} ({count or n} place{'s' if (count or n) > 1 else ''})")
    stubs = os.path.join(args.work, "stubs")
    shutil.rmtree(stubs, ignore_errors=True)
    for module, files in STUBS.items():
        if importlib.util.find_spec(module) is None:
            for rel, text in files.items():
                os.makedirs(os.path.dirname(os.path.join(stubs, rel)), exist_ok=True)
                with open(os.path.join(stubs, rel), "w") as f:
                    f.write(text)
            made.append(f"stub {module}: not installed here, imported by the copy, unused on its training "
                        f"and evaluation paths" + (" (a pass-through progress bar)" if module == "tqdm" else ""))
    os.makedirs(os.path.join(dst, "data"), exist_ok=True)
    os.symlink(os.path.abspath(data_root), os.path.join(dst, "data", "CIFAR10"))  # their path: ./data/CIFAR10
    made.append(f"data/CIFAR10 -> {data_root} (their dataset path, holding the converted batches)")
    print(f"code: {args.code} (commit {commit or 'unknown'}) copied to {dst}; edits:", flush=True)
    for line in made:
        print(f"  edit: {line}", flush=True)
    return dst, made, stubs, commit


def child_env(args, stubs, stop_epoch=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", ENV_WORKERS: str(args.workers), "TQDM_MININTERVAL": "30",
           ENV_LINEAR_WORKERS: "0" if args.smoke else "2"}
    if args.max_steps:
        env[ENV_MAX_STEPS] = str(args.max_steps)
    if stop_epoch:
        env[ENV_STOP_EPOCH] = str(stop_epoch)
    if os.path.isdir(stubs):
        env["PYTHONPATH"] = os.path.abspath(stubs) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_logged(cmd, cwd, env):
    """Run cmd in cwd, its output through to ours; (exit code, its output, wall seconds)."""
    print(f"$ (cd {cwd} && {' '.join(cmd)})", flush=True)
    t = time.time()
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in p.stdout:
        lines.append(line)
        sys.stdout.write(line)
        sys.stdout.flush()
    return p.wait(), "".join(lines), time.time() - t


def train(args):
    data_root, n_train = prepare_data(args)
    code, edits, stubs, commit = prepare_code(args, data_root)
    schedule = args.schedule_epochs or args.epochs
    cmd = [args.python, "main.py", "--data", "cifar10", "--arch", "resnet18-cifar", "--epoch", str(schedule),
           "--num_patches", str(args.patches), "--bs", str(args.batch_size), "--lr", str(args.lr), "--patch_sim", "200"]
    rc, out, wall = run_logged(cmd, code, child_env(args, stubs, args.epochs if schedule > args.epochs else None))
    if rc != 0:
        fail(f"their main.py exited with {rc} after {wall:.0f} s (its output is above)")
    saved = sorted(glob.glob(os.path.join(code, "logs", "*", "*", "save_models", "*.pt")),
                   key=lambda p: int(re.sub(r"\D", "", os.path.basename(p)) or -1))
    if not saved:
        fail(f"their main.py saved no model under {code}/logs")
    authors = os.path.join(args.out, "authors.pt")
    shutil.copyfile(saved[-1], authors)
    state = torch.load(authors, map_location="cpu", weights_only=True)
    per_epoch = n_train // args.batch_size  # their loader drops the last partial batch
    info = {"code": URL, "commit": commit, "pinned": PINNED, "edits": edits, "command": " ".join(cmd),
            "steps": min(per_epoch, args.max_steps or per_epoch) * args.epochs,
            "epochs": args.epochs, "schedule_epochs": schedule, "wall_s": round(wall, 1),
            "saved": os.path.relpath(saved[-1], code), "log": re.findall(r"At epoch:.*", out)}
    path = write_checkpoint(state, args, info)
    with open(os.path.join(args.out, "control.json"), "w") as f:
        json.dump(info, f, indent=1)
    print(f"their training: {wall:.1f} s; {info['log'][-1] if info['log'] else ''}\n"
          f"their state dict: {authors}; as an effssl checkpoint (emp_ssl.EMPNet --proj {PROJ}): {path}", flush=True)


def own_eval(args):
    authors = os.path.join(args.out, "authors.pt")
    if not os.path.isfile(authors):
        fail(f"{authors} not found: run the control's training first (this script without --own-eval)")
    data_root, _ = prepare_data(args)
    code, _, stubs, _ = prepare_code(args, data_root)
    cmd = [args.python, "evaluate.py", "--data", "cifar10", "--arch", "resnet18-cifar", "--model_path",
           os.path.abspath(authors), "--test_patches", str(args.test_patches), "--knn"]
    rc, out, wall = run_logged(cmd, code, child_env(args, stubs))
    if rc != 0:
        fail(f"their evaluate.py exited with {rc} after {wall:.0f} s (its output is above)")
    result = {"test_patches": args.test_patches, "wall_s": round(wall, 1), "command": " ".join(cmd)}
    m = re.search(r"best linear test acc ([\d.]+), last acc ([\d.]+)", out)
    if m:
        result["linear"] = {"best": float(m.group(1)), "last": float(m.group(2))}
    m = re.search(r"KNN \(top1/top5\): ([\d.]+) ([\d.]+)", out)
    if m:
        result["knn"] = {"top1": float(m.group(1)), "top5": float(m.group(2))}
    path = os.path.join(args.out, f"eval-authors-p{args.test_patches}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"their evaluation ({args.test_patches} patches, {wall:.0f} s): linear {result.get('linear')}, "
          f"k-NN {result.get('knn')}; wrote {path}", flush=True)


def parse_args(argv=None):
    p = common.ArgParser(description=__doc__)
    a = p.add_argument
    a("--code", required=True, help=f"the authors' code: a checkout of {URL} at {PINNED[:12]}")
    a("--data", default=os.environ.get("EFFSSL_CIFAR10", "cache/cifar10"), help="our CIFAR-10 ImageFolder tree")
    a("--out", required=True, help="folder for their model (authors.pt), its effssl checkpoint and the results")
    a("--work", default=None, help="folder for the edited copy of --code and the converted data (default: "
                                   "$EFFSSL_CACHE/emp-control, else cache/emp-control): outside --out, so that "
                                   "no file of theirs travels with the results")
    a("--patches", type=common.COUNT, default=20, help="patches per image (their --num_patches)")
    a("--epochs", type=common.COUNT, default=1, help="epochs trained")
    a("--schedule-epochs", type=common.COUNT, default=None,
      help="length of their cosine in epochs (their --epoch; default --epochs; their README's one-epoch command: 2)")
    a("--batch-size", type=common.COUNT, default=100, help="their --bs")
    a("--lr", type=common.POSITIVE, default=0.3, help="their --lr")
    a("--workers", type=common.COUNT0, default=min(16, os.cpu_count() or 1), help="loader workers (theirs: 16 / 8)")
    a("--limit", type=common.COUNT, default=None, help="convert only N images of each split (toy sizes)")
    a("--max-steps", type=common.COUNT, default=None, help="stop each epoch after N steps (toy sizes)")
    a("--own-eval", action="store_true", help="run their evaluate.py on the trained model instead of training")
    a("--test-patches", type=common.COUNT, default=128, help="--own-eval: patches a bag (their --test_patches)")
    a("--smoke", action="store_true", help="toy size: --limit 100 --max-steps 1 --patches 2 --batch-size 2 "
                                           "--workers 0 --test-patches 1 unless given (their probe needs 100 images)")
    a("--python", default=sys.executable, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.work = args.work or os.path.join(os.environ.get("EFFSSL_CACHE") or "cache", "emp-control")
    if args.smoke:
        given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:])}
        for flag, value in (("--limit", 100), ("--max-steps", 1), ("--patches", 2), ("--batch-size", 2),
                            ("--workers", 0), ("--test-patches", 1)):
            if flag not in given:
                setattr(args, flag[2:].replace("-", "_"), value)
    if args.schedule_epochs and args.schedule_epochs < args.epochs:
        fail(f"--schedule-epochs {args.schedule_epochs} is shorter than --epochs {args.epochs}")
    for name in ("main.py", "evaluate.py", "func.py", "dataset/datasets.py"):
        if not os.path.isfile(os.path.join(args.code, name)):
            fail(f"--code {args.code} does not hold the EMP-SSL authors' code (no {name}); fetch it: "
                 f"git clone {URL} {args.code} && git -C {args.code} checkout {PINNED}")
    return args


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.own_eval:
        own_eval(args)
    else:
        train(args)


if __name__ == "__main__":
    common.run_cli(main, training=False)
