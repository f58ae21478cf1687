#!/usr/bin/env bash
# EMP-SSL's one-epoch CIFAR-10 tables and the GPU speed figures, on one CUDA GPU.
#
# Tong, Chen, Ma, LeCun, "EMP-SSL: Towards Self-Supervised Learning in One Training Epoch", 2023,
# arXiv:2304.03977. Stages, in the order they run (most wanted first):
#   control      the authors' code (github.com/tsb0601/EMP-SSL, --emp-code: a checkout at the commit
#                bench/emp_control.py pins), one epoch of 20 patches on our CIFAR-10 copy, through
#                bench/emp_control.py (its edits for one GPU and a current torch are in the log);
#                control-head1: our probe of it the authors' way (head1, augmented patches at random
#                positions per image), control-eval: our backbone bag probe, control-own (last of
#                the new stages): their evaluate.py with 16 test patches a bag
#   proj20       emp_ssl.py --epochs 1 --patches 20 --proj 4096-4096-1024 (the authors' projector),
#                proj20-head1, proj20-eval; proj20-fp32: the same in float32 (--amp off), and its probes
#   speed        bench/gpu.py: EMP-SSL step at 20 patches x batch 100 in fp32 / bf16 /
#                bf16+channels_last against the ResNet-18 fwd+bwd ceiling; peak memory and
#                epoch time at 20 and 200 patches, with and without --grad-checkpoint
#   t2           emp_ssl.py --epochs 1 --schedule-epochs 30 --patches 20 (Table 2, one-epoch column: 80.6 %)
#   t2-eval      its 128-patch bag of backbone embeddings (Sec. 3): linear probe + k-NN, full test split
#   cos20        emp_ssl.py --epochs 1 --patches 20 (cosine within the epoch; a public
#                reimplementation reports 82.1 % linear, 74.3 % k-NN), and cos20-eval
#   pipeline     bench/pipeline.py: our patch pipeline on the GPU against the per-patch PIL
#                pipeline of the authors' loader on every CPU core
#   t2-head1     the authors' evaluation of t2: --feature head1 --bag-augment; cos20-head1
#   compile      bench/gpu.py with torch.compile, beside the ceiling
#   t1           emp_ssl.py --epochs 1 --patches 200 (Table 1: 85.1 %; --grad-checkpoint on a GPU
#                under 70 GiB), t1-eval, t1-head1
#   pipe-rows    bench/gpu.py: EMP-SSL (20, 200 patches), BagSSL and multiaug steps alone, their view
#                pipelines alone, the steps with the pipelines, the ratio and the syncs in a step
#   methods      bench/methods.py: each method's step time and peak memory at its paper recipe, side by side
#   bag, multiaug, npid   one epoch of each other method at its paper recipe, and its probe
# Each stage writes OUT/<stage>.log and, when it ends well, OUT/<stage>.done; --resume skips the
# done ones (a training stage whose run folder holds a checkpoint resumes from it). --budget S
# starts no stage past S seconds and stops the one running at S, so that a wall-clock limit
# ends the script between stages; rerun with --resume to go on. --only A,B runs those stages, in
# that order.
#
#   bash bench/reproduce_gpu.sh --data cache/cifar10-jpeg.tar.gz            # everything, ~1.5 h
#   bash bench/reproduce_gpu.sh --resume --budget 540 --only speed,cos20,cos20-eval  # in this order
# The control and the projector in one 15-minute device session (about 570 s by the H200/H100 rows of
# docs/results.md), then a short second call:
#   bash bench/reproduce_gpu.sh --resume --budget 540 --only control,control-head1,proj20,proj20-head1
#   bash bench/reproduce_gpu.sh --resume --budget 240 --only proj20-fp32,proj20-fp32-head1
set -u
OUT=runs/gpu DATA=${EFFSSL_CIFAR10:-cache/cifar10} RESUME=0 BUDGET=0 ONLY="" PACK="" SMOKE=0 EMP_CODE=cache/EMP-SSL
while [ $# -gt 0 ]; do
  case $1 in
    --out) OUT=$2; shift 2;;
    --data) DATA=$2; shift 2;;  # an ImageFolder tree (train/, test/) or the .tar.gz holding one
    --resume) RESUME=1; shift;;
    --budget) BUDGET=$2; shift 2;;  # seconds; 0: none
    --only) ONLY=",$2,"; shift 2;;
    --pack) PACK=$2; shift 2;;  # after each stage, tar OUT's logs and results (no checkpoints) here
    --emp-code) EMP_CODE=$2; shift 2;;  # the authors' code for the control stages (bench/emp_control.py --help)
    --smoke) SMOKE=1; shift;;  # every stage at toy size (a CPU check of this script)
    -h|--help) sed -n '2,41p' "$0"; exit 0;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2;;
  esac
done
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 EFFSSL_CACHE=${EFFSSL_CACHE:-cache/decoded}
if [ -f "$DATA" ]; then  # the tarball: extract once beside it
  dir=cache/cifar10
  if [ ! -d $dir/train ]; then
    mkdir -p cache && tar xzf "$DATA" -C cache || { echo "error: cannot extract $DATA" >&2; exit 2; }
    [ -d $dir/train ] || { echo "error: $DATA does not hold cifar10/train" >&2; exit 2; }
  fi
  DATA=$dir
fi
[ -d "$DATA/train" ] && [ -d "$DATA/test" ] || { echo "error: '$DATA' is not a CIFAR-10 ImageFolder tree (train/, test/)" >&2; exit 2; }
T0=$(date +%s)
D="--dataset cifar10 --data-dir $DATA"

pack() {
  [ -n "$PACK" ] && tar czf "$PACK" --exclude='*.pt' --exclude='*.tmp*' -C "$OUT" . 2>/dev/null
  return 0
}

# stage NAME SECONDS_IT_NEEDS COMMAND...: register a stage; they run after the list below, in its
# order, or in the order --only names them
NAMES=()
declare -A NEED CMD
stage() {
  NAMES+=("$1"); NEED[$1]=$2; CMD[$1]=$(printf '%q ' "${@:3}")
}

# run_stage NAME: run its COMMAND unless done before (--resume) or out of budget
run_stage() {
  local name=$1 need=${NEED[$1]}
  eval "set -- ${CMD[$1]}"
  if [ $RESUME = 1 ] && [ -f "$OUT/$name.done" ]; then echo "== $name: done before, skipped"; return 0; fi
  local left=0
  if [ "$BUDGET" -gt 0 ]; then
    left=$(( BUDGET - $(date +%s) + T0 ))
    if [ $left -lt "$need" ]; then echo "== $name: needs ~${need} s, ${left} s of --budget left: not started (--resume runs it)"; return 0; fi
  fi
  echo "== $name: $*" | tee -a "$OUT/commands.txt"
  local t=$(date +%s) rc
  if [ "$BUDGET" -gt 0 ]; then timeout --signal=INT --kill-after=20 $left "$@" > "$OUT/$name.log" 2>&1; rc=$?
  else "$@" > "$OUT/$name.log" 2>&1; rc=$?; fi
  local dt=$(( $(date +%s) - t ))
  tail -n 12 "$OUT/$name.log"
  if [ $rc = 0 ]; then touch "$OUT/$name.done"; echo "== $name: ok in $dt s"
  else echo "== $name: FAILED (exit $rc) after $dt s; log $OUT/$name.log"; fi
  echo "$name rc $rc wall_s $dt" >> "$OUT/stages.txt"
  pack
}

run_dir() {  # the run folder OUT/NAME, and --resume when asked for and it holds a checkpoint
  echo "--out $OUT/$1"; [ $RESUME = 1 ] && [ -f "$OUT/$1/checkpoint.pt" ] && echo --resume; return 0
}

TR="" TRE="" EV="" SG="" SP="" CS=""  # --smoke: toy sizes (the last of a repeated flag wins)
if [ $SMOKE = 1 ]; then
  CS="--smoke --test-patches 1"
  TR="--max-steps 2 --subset 200 --batch-size 20 --workers 0" TRE="--patches 2"
  EV="--subset 200 --test-subset 100 --linear-epochs 1 --batch-size 50 --workers 0 --patches 1 --knn-k 20"
  SG="--device cpu --smoke"
  SP="--device cpu --images 16 --batch-size 8 --patches 2 --step-batch 2 --steps 1 --workers 1"
fi
EMP="$PY emp_ssl.py $D --channels-last"
EVAL="$PY eval_linear.py --ckpt"
BAG128="--mode bag --patches 128 --probe linear,knn --knn-k 20,200"
# the authors' evaluation (their evaluate.py): the 4096-d first projector block of 128 training-augmented
# patches at random positions per image, extracted in float32 (--amp off).
AUTH="--feature head1 --bag-augment --positions random --amp off"
# The control and the projector first. Sizes: the authors' per-patch PIL pipeline on 16
# workers 16,600 patches/s (stage pipeline, H200) against a float32 step of 21,800 (speed): ~60 s of
# training for 1M patches, ~20 s of start-up and data conversion; a head1 probe 125 s of features (H100)
# and its linear probe; one epoch of ours 37-43 s with start-up in bf16, about 2.7x the step in float32.
CTRL="$PY bench/emp_control.py --code $EMP_CODE --data $DATA --out $OUT/control"
stage control 150 $CTRL $CS
stage control-head1 180 $EVAL "$OUT/control" $BAG128 $AUTH $EV
stage proj20 90 $EMP --epochs 1 --patches 20 --proj 4096-4096-1024 $(run_dir proj20) $TR $TRE
stage proj20-head1 180 $EVAL "$OUT/proj20" $BAG128 $AUTH $EV
stage control-eval 90 $EVAL "$OUT/control" $BAG128 $EV
stage proj20-eval 90 $EVAL "$OUT/proj20" $BAG128 $EV
stage proj20-fp32 120 $EMP --epochs 1 --patches 20 --proj 4096-4096-1024 --amp off $(run_dir proj20-fp32) $TR $TRE
stage proj20-fp32-head1 180 $EVAL "$OUT/proj20-fp32" $BAG128 $AUTH $EV
stage proj20-fp32-eval 90 $EVAL "$OUT/proj20-fp32" $BAG128 $EV
# their own evaluation at 16 patches a bag (128: ~7.7M PIL augmentations, far past a session), then
# their linear probe: 100 epochs on the CPU through a DataLoader
stage control-own 300 $CTRL --own-eval --test-patches 16 $CS
stage speed 60 $PY bench/gpu.py --iters 20 --pipeline-rows "" $SG
stage t2 90 $EMP --epochs 1 --schedule-epochs 30 --patches 20 $(run_dir t2) $TR $TRE
stage t2-eval 90 $EVAL "$OUT/t2" $BAG128 $EV
stage cos20 90 $EMP --epochs 1 --patches 20 $(run_dir cos20) $TR $TRE
stage cos20-eval 90 $EVAL "$OUT/cos20" $BAG128 $EV
stage pipeline 45 $PY bench/pipeline.py --device cuda --images 2000 --patches 20 --step-batch 100 --steps 5 $SP
stage t2-head1 90 $EVAL "$OUT/t2" $BAG128 --feature head1 --bag-augment $EV
stage cos20-head1 90 $EVAL "$OUT/cos20" $BAG128 --feature head1 --bag-augment $EV
stage compile 120 $PY bench/gpu.py --iters 20 --configs bf16+channels_last+compile --memory-patches "" $SG
# 200 patches x batch 100 peak at 45.4 GiB without --grad-checkpoint (bench/gpu.py, H200): an
# 80 GB card runs them as they are (about 1.4x faster), a smaller one recomputes activations.
GC=--grad-checkpoint
mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
[ "${mib:-0}" -ge 70000 ] 2>/dev/null && GC=""
stage t1 330 $EMP --epochs 1 --patches 200 $GC $(run_dir t1) $TR $TRE
stage t1-eval 120 $EVAL "$OUT/t1" $BAG128 $EV
stage t1-head1 150 $EVAL "$OUT/t1" $BAG128 --feature head1 --bag-augment $EV
# each method's step with and without its view pipeline, and the syncs in it (target: 0.9 or more)
stage pipe-rows 150 $PY bench/gpu.py --iters 20 --configs "" --memory-patches "" $SG
stage methods 120 $PY bench/methods.py $SG
# one epoch of the other methods at their paper recipes (docs/recipes.md), probed as their papers do
stage bag 600 $PY bag_ssl.py $D --epochs 1 --channels-last $(run_dir bag) $TR
stage bag-eval 300 $EVAL "$OUT/bag" --mode bag --patches 16 --positions random --probe linear,knn $EV
stage multiaug 600 $PY multiaug_ssl.py $D --epochs 1 --views 4 --channels-last $(run_dir multiaug) $TR
stage multiaug-eval 300 $EVAL "$OUT/multiaug" --mode views --views 16 --linear-opt adam --probe linear,knn $EV
stage npid 600 $PY npid_sqrtkl.py $D --epochs 1 --channels-last $(run_dir npid) $TR
stage npid-eval 200 $EVAL "$OUT/npid" --mode central --probe linear,knn $EV
ORDER=("${NAMES[@]}")
if [ -n "$ONLY" ]; then
  IFS=, read -r -a ORDER <<< "${ONLY:1:-1}"
  for n in "${ORDER[@]}"; do
    [ -n "${NEED[$n]+x}" ] || { echo "error: --only names no stage '$n' (stages: ${NAMES[*]})" >&2; exit 2; }
  done
fi
mkdir -p "$OUT"
{ echo "# $(date -u +%FT%TZ) $(hostname)"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  $PY -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__, "cuda", torch.version.cuda)'
  echo "cpus $(nproc)"; git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | head -5; } >> "$OUT/env.txt"
for n in "${ORDER[@]}"; do run_stage "$n"; done
echo "== all stages tried in $(( $(date +%s) - T0 )) s; results: $OUT/stages.txt, $OUT/*/eval-*.json"
pack
