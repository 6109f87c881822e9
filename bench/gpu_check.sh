#!/usr/bin/env bash
# The GPU path, checked on a machine with a CUDA GPU and no network, in under 8 minutes (GPU_CHECK_BUDGET_S):
#
#   bench/gpu_check.sh OUTDIR
#
#   1. environment: nvidia-smi, Python, torch, triton, transformers versions          -> OUTDIR/env.txt
#   2. what the server and tests need and the machine lacks (fastapi, uvicorn, pydantic-settings, python-multipart,
#      gguf),
#      installed from the wheelhouse .whl/ (build it beforehand with bench/gpu_wheelhouse.sh and carry it)
#   3. tests/gpu: compiled Triton kernels against the references, CUDA-graph replay, the engine's greedy
#      tokens through Triton against the torch references on every schedule shape and against transformers
#      -> OUTDIR/tests-gpu.{txt,xml}
#   4. bench/gpu_smoke.py: engine (bf16; fp8 weights + KV on sm_89+), server and batch-1 decode on a random-weight
#      Llama-3-8B-shaped model of 4 layers -> OUTDIR/smoke.json
#   5. bench/kernels.py: kernel times and bandwidth against the peers               -> OUTDIR/kernels-*.json
#   6. bench/gpu_smoke.py --steps decode on all 32 layers, when 120 s are left     -> OUTDIR/decode-32.json
#
# Every step has its own time limit; OUTDIR/summary.txt says PASS, FAIL or SKIP for each, and the script exits 1
# when any step failed. Without a CUDA GPU it is a dry run: steps 3, 5 and 6 are skipped (and say so), the tests under
# tests/gpu are only collected, and the smoke test runs its tiny CPU variant to prove the script itself.
# PYTHON picks the interpreter (default: .venv/bin/python if present, else python3).
set -uo pipefail

OUT="${1:?usage: bench/gpu_check.sh OUTDIR}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-480}  # the whole run; each step gets its own limit within what is left
FAILED=0
: > "$OUT/summary.txt"

say() { echo "[gpu_check $(( $(date +%s) - START ))s] $*" | tee -a "$OUT/summary.txt"; }

# run NAME LIMIT_S LOGFILE CMD...: runs CMD with a time limit, its output in LOGFILE, and records the outcome.
run() {
  local name=$1 limit=$2 logfile=$3; shift 3
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if [ "$left" -lt 20 ]; then say "SKIP $name: the ${BUDGET}s budget is spent"; FAILED=1; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  local began=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$logfile" 2>&1
  local rc=$?
  local took=$(( $(date +%s) - began ))
  if [ $rc -eq 0 ]; then
    say "PASS $name (${took}s)"
  else
    [ $rc -eq 124 ] && say "FAIL $name: over its ${limit}s limit (log: $(basename "$logfile"))" \
                    || say "FAIL $name: exit $rc after ${took}s (log: $(basename "$logfile"))"
    tail -n 15 "$logfile" | sed 's/^/    /' | tee -a "$OUT/summary.txt"
    FAILED=1
  fi
}

# 1. environment
{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  command -v nvidia-smi > /dev/null && nvidia-smi || echo "nvidia-smi: not found"
  "$PY" - <<'EOF'
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "triton", "transformers", "fastapi", "uvicorn", "pydantic", "pydantic_settings", "httpx"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"))
    except ImportError:
        print(name, "MISSING")
import torch
print("cuda available", torch.cuda.is_available(), torch.version.cuda)
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
EOF
} > "$OUT/env.txt" 2>&1
GPU=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [ "$GPU" = 1 ]; then
  say "GPU: $("$PY" -c "import torch; print(torch.cuda.get_device_name(0))")"
else
  say "no CUDA GPU: dry run (tests/gpu only collected, kernel benchmark skipped, smoke test on a tiny CPU model)"
fi

# 2. the server's dependencies, from the wheelhouse when the machine lacks them
MISSING=$("$PY" - <<'EOF'
import importlib.util
wanted = {"fastapi": "fastapi", "uvicorn": "uvicorn", "pydantic_settings": "pydantic-settings",
          "multipart": "python-multipart", "gguf": "gguf"}
print(" ".join(package for module, package in wanted.items() if importlib.util.find_spec(module) is None))
EOF
)
if [ -z "$MISSING" ]; then
  say "PASS dependencies: all present"
elif [ -d .whl ]; then
  pins=()
  for package in $MISSING; do pins+=("$(grep -oE "\"$package==[^\"]+\"" pyproject.toml | tr -d '"')"); done
  run "dependencies: install ${pins[*]} from .whl" 120 "$OUT/pip.txt" \
    "$PY" -m pip install --no-index --find-links .whl "${pins[@]}"
else
  say "FAIL dependencies: missing $MISSING and no .whl/ wheelhouse (run bench/gpu_wheelhouse.sh and carry .whl)"
  FAILED=1
fi

if [ "$GPU" = 1 ]; then
  # 3-6 on the GPU, correctness first. The tests run in 4 processes, a file each at a time (the machine has the
  # cores, and the GPU the memory), each test within 150 s so one hang cannot take the budget. On the first H200
  # run (2026-12-04) they took 130-200 s with Triton's cache cold, the engine file the longest (about 125 s).
  run "tests/gpu" 300 "$OUT/tests-gpu.txt" \
    "$PY" -m pytest tests/gpu -q -p no:cacheprovider -n 4 --dist loadfile --timeout 150 --durations 15 \
    --junitxml="$OUT/tests-gpu.xml"
  run "bench/gpu_smoke.py (Llama-3-8B shape, 4 layers)" 150 "$OUT/smoke.txt" \
    "$PY" bench/gpu_smoke.py --out "$OUT" --layers 4
  run "bench/kernels.py" 120 "$OUT/kernels.txt" env BENCH_RESULTS_DIR="$OUT" "$PY" bench/kernels.py --no-sweep
  # 6. batch-1 decode on the whole 32-layer shape (16 GB of weights), only with time to spare.
  if [ $(( BUDGET - ($(date +%s) - START) )) -ge 120 ]; then
    run "bench/gpu_smoke.py decode (Llama-3-8B shape, 32 layers)" 150 "$OUT/decode-32.txt" \
      "$PY" bench/gpu_smoke.py --out "$OUT" --layers 32 --steps decode --report decode-32.json
  else
    say "SKIP bench/gpu_smoke.py decode (32 layers): under 120 s of the budget left"
  fi
else
  say "SKIP tests/gpu: no CUDA GPU (collecting them only)"
  run "tests/gpu collected" 120 "$OUT/tests-gpu.txt" \
    "$PY" -m pytest tests/gpu -q --collect-only -p no:cacheprovider
  say "SKIP bench/kernels.py: no CUDA GPU"
  run "bench/gpu_smoke.py --tiny (CPU)" 300 "$OUT/smoke.txt" "$PY" bench/gpu_smoke.py --out "$OUT" --tiny
fi

say "done in $(( $(date +%s) - START ))s: $([ $FAILED = 0 ] && echo 'all steps passed or were skipped' || echo 'FAILURES above')"
exit $FAILED
