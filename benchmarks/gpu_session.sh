#!/usr/bin/env bash
# Issue 9's GPU measurements, in order, each step under its own time limit (sum 880 s, plus at most 90 s a folder for bytecode):
#   1. the GPU tests          -> $OUT/pytest.log, $OUT/pytest.xml
#   2. the decoder at 720p    -> $OUT/bench_decoder.json, .log
#   3. product vs old path    -> $OUT/bench_product.json, .log
#   4. cold worker start-up   -> $OUT/importtime.log (python -X importtime of the worker's
#                                modules), $OUT/bench_coldstart.json, .log
# plus $OUT/session.txt (each step's exit status and seconds, the card, versions) and
# $OUT/nvidia-smi.csv (utilization and memory every 0.5 s over the whole session).
#
# Run from the repository root after the device bundle is unpacked (../shared/device/README.md):
#   mkdir -p /tmp/site && tar -xJf .device-bundle/site.tar.xz -C /tmp/site && export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 || exit; bash benchmarks/gpu_session.sh
# A step that fails or runs past its limit is recorded and the next one still runs. Named steps
# run alone: the device allows 10 minutes a call, so run it as two calls,
#   bash benchmarks/gpu_session.sh pytest bench_decoder          # at most 440 s
#   bash benchmarks/gpu_session.sh bench_product importtime bench_coldstart # at most 470 s
# Before any step, each unpacked site folder without bytecode is compiled (see bytecode()).
set -u
OUT=${OUT:-$PWD/gpu-session-out}
mkdir -p "$OUT"
export RAY_TMPDIR=${RAY_TMPDIR:-/tmp/ray-gpu-session}
mkdir -p "$RAY_TMPDIR"
STATUS="$OUT/session.txt"
: > "$STATUS"

{
  date -u +"start %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  python -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)" 2>&1
  echo "cpus $(nproc)"
} >> "$STATUS"

# Bytecode first, as a production node has it: pip compiles .pyc files at install, but the
# device bundle's site folder (unpacked from .device-bundle/site.tar.xz) ships without them,
# and a cold worker would compile every module it imports (diffusers, ray, av...) itself.
# Each PYTHONPATH folder outside the repository, the interpreter's torch and the worker's own
# packages, where one has no __pycache__, is compiled here, timed, before any step runs.
bytecode() {
  local dirs=() d
  IFS=: read -r -a entries <<< "${PYTHONPATH:-}"
  for d in "${entries[@]}"; do
    [[ -d "$d" && "$(cd "$d" && pwd)" != "$PWD" ]] && dirs+=("$d")
  done
  d=$(python -c "import importlib.util as u, os; s = u.find_spec('torch'); print(os.path.dirname(os.path.dirname(s.origin)) if s else '')" 2>/dev/null)
  [[ -n "$d" ]] && dirs+=("$d/torch")
  dirs+=("$PWD/actors" "$PWD/infra")  # the worker's own code, as an installed wheel has it
  for d in "${dirs[@]}"; do
    if [[ -n "$(find "$d" -maxdepth 3 -name __pycache__ -print -quit 2>/dev/null)" ]]; then
      echo "bytecode: $d already has __pycache__"
    elif [[ ! -w "$d" ]]; then
      echo "bytecode: $d has no __pycache__ and is read-only: every cold worker compiles what it imports"
    else
      local t0=$SECONDS
      timeout -k 10 90 python -m compileall -q -j 8 "$d" > /dev/null 2>&1
      local rc=$?
      echo "bytecode: $d had no __pycache__: python -m compileall -q -j 8 took $((SECONDS - t0)) s (rc=$rc)"
    fi
  done
}
bytecode 2>&1 | tee -a "$STATUS"

nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -lms 500 > "$OUT/nvidia-smi.csv" 2>/dev/null &
SMI_PID=$!

WANTED=" ${*:-pytest bench_decoder bench_product importtime bench_coldstart} "

step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  [[ "$WANTED" == *" $name "* ]] || return 0
  local t0=$SECONDS
  echo "== $name (limit ${limit}s): $*" | tee -a "$STATUS"
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$((SECONDS - t0))" | tee -a "$STATUS"
  tail -n 25 "$OUT/$name.log"
}

# The GPU tests only (tests/test_wan.py is CPU-only: CI runs it); compiling the tiny decoder's
# regions for fp32, bf16 and the Wan 2.2 shapes takes most of this step.
step pytest 300 python -m pytest -o addopts=-ra -q --junitxml="$OUT/pytest.xml" tests/test_gpu.py tests/test_wan_weights.py
step bench_decoder 140 python -m benchmarks.bench_decoder --sizes 1280x720 --frames 10 \
  --time-budget-s 120 --out "$OUT/bench_decoder.json"
step bench_product 180 python -m benchmarks.bench_product --size 1280x720 --latent-frames 81 --dtype bf16 \
  --device cuda --runs 2 --out "$OUT/bench_product.json"
step importtime 60 python -X importtime -c "import actors.ray_actors, actors.service"
step bench_coldstart 200 python -m benchmarks.bench_coldstart --size 1280x720 --dtype bf16 --device cuda \
  --runs no-cache,cache,cache-inline,cache --out "$OUT/bench_coldstart.json"

kill "$SMI_PID" 2>/dev/null
wait "$SMI_PID" 2>/dev/null
date -u +"end %Y-%m-%dT%H:%M:%SZ" >> "$STATUS"
cat "$STATUS"
