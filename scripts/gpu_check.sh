#!/usr/bin/env bash
# The prepared GPU check (docs/gpu_check.md): on a machine with a CUDA GPU and no network,
# run the tests marked `cuda`, then time the CUDA path on Qwen2-shaped random models, within
# GPU_CHECK_TOTAL_S seconds in all. Results go to OUTDIR: cuda_tests.log, tests.json,
# gpu_timing.json, gpu_timing.md, gpu_timing.log (partial when a step runs out of time), and
# the same three for a torch draft on the GPU in OUTDIR/draft-torch.
#
#   scripts/gpu_check.sh OUTDIR          # or: make gpu-check [GPU_CHECK_OUT=...]
#   scripts/gpu_check.sh --vendor-deps   # copy the pure-Python dependencies a bare GPU
#                                        # machine may lack into build/gpu_check_deps
#
# Without a CUDA GPU it says so and exits 0. Exit status otherwise: 0 all passed, 1 a test
# or a timing step failed or ran out of time, 2 usage or missing modules.
set -uo pipefail

TOTAL_S=${GPU_CHECK_TOTAL_S:-480}  # everything, tests and timing (the machine's lease allows ~15 min)
TESTS_S=${GPU_CHECK_TESTS_S:-150}  # the cuda tests; the timing gets what is left
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEPS="$ROOT/build/gpu_check_deps"
# modules the project imports at module level, then pytest's; torch etc. are not vendorable
PURE="networkx yaml tqdm pytest _pytest py pluggy iniconfig pygments"
NEEDED="torch transformers tokenizers safetensors numpy onnx onnxscript onnxruntime networkx yaml tqdm"

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"
else PY=python3; fi

if [ "${1:-}" = "--vendor-deps" ]; then
  rm -rf "$DEPS" && mkdir -p "$DEPS"
  "$PY" - "$DEPS" $PURE <<'EOF' || exit 2
import importlib, shutil, sys
from pathlib import Path
dst = Path(sys.argv[1])
skip = shutil.ignore_patterns("tests", "__pycache__", "*.so", "*.pyd")
for name in sys.argv[2:]:
    try:
        mod = importlib.import_module(name)
    except ImportError:
        continue  # e.g. `py` (pytest's shim) in older pytest
    src = Path(mod.__file__)
    if src.name == "__init__.py":
        shutil.copytree(src.parent, dst / name, ignore=skip)
    else:
        shutil.copy2(src, dst / src.name)
print(f"copied into {dst}: {', '.join(sorted(p.name for p in dst.iterdir()))}")
EOF
  du -sh "$DEPS"
  echo "carry build/gpu_check_deps along with the working tree; scripts/gpu_check.sh uses it only for modules the machine lacks"
  exit 0
fi

OUT=${1:-}
if [ -z "$OUT" ]; then echo "usage: scripts/gpu_check.sh OUTDIR | --vendor-deps" >&2; exit 2; fi
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "gpu-check: $PY cannot import torch; set PYTHON=/path/to/python (one with torch)" >&2
  exit 2
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu-check: no CUDA GPU visible to torch on this machine; nothing to check (exit 0)."
  echo "gpu-check: run it on a machine with an NVIDIA GPU; docs/gpu_check.md"
  exit 0
fi

mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)

# Importable offline: the checkout on PYTHONPATH (no pip, no build), vendored modules last.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
missing() { "$PY" -c "import importlib.util as u, sys; print(' '.join(m for m in sys.argv[1:] if u.find_spec(m) is None))" "$@"; }
lacking=$(missing $NEEDED pytest)
if [ -n "$lacking" ] && [ -d "$DEPS" ]; then
  export PYTHONPATH="$PYTHONPATH:$DEPS"
  lacking=$(missing $NEEDED pytest)
fi
for m in $lacking; do
  if [ "$m" != pytest ]; then
    echo "gpu-check: missing Python modules: $lacking" >&2
    echo "gpu-check: this machine has no package index. On a machine with the project's .venv run" >&2
    echo "  scripts/gpu_check.sh --vendor-deps   (pure-Python ones: $PURE)" >&2
    echo "and carry build/gpu_check_deps along; torch, transformers, onnx* must be installed" >&2
    exit 2
  fi
done
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export MIRROR_SD_CACHE="${MIRROR_SD_CACHE:-$(mktemp -d)}"
cd "$ROOT" || exit 2
"$PY" -c "import torch, onnxruntime as o; print('gpu-check:', torch.cuda.get_device_name(0), '| torch', torch.__version__, '| onnxruntime', o.__version__, o.get_available_providers())"

status=0
if [[ " $lacking " == *" pytest "* ]]; then
  echo "gpu-check: pytest is not installed: skipping the cuda tests (scripts/gpu_check.sh --vendor-deps)"
  printf '{"exit_code": null, "summary": "skipped: pytest not installed"}\n' > "$OUT/tests.json"
else
  echo "gpu-check: cuda tests (at most ${TESTS_S} s)"
  timeout -k 5 "$TESTS_S" "$PY" -m pytest -p no:cacheprovider -m cuda -v -ra tests/test_cuda.py 2>&1 | tee "$OUT/cuda_tests.log"
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || status=1
  summary=$(grep -E '^=+ .*(passed|failed|error|skipped).* =+$' "$OUT/cuda_tests.log" | tail -1 | tr -d '=' | sed 's/^ *//; s/ *$//; s/"/'"'"'/g')
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then summary="timed out after ${TESTS_S} s; see cuda_tests.log"; fi
  printf '{"exit_code": %s, "summary": "%s", "log": "cuda_tests.log"}\n' "$rc" "${summary:-see cuda_tests.log}" > "$OUT/tests.json"
fi

# the timing twice: the draft in ONNX Runtime on the host cores (OUT), then in torch beside
# the target on the GPU (OUT/draft-torch); the first gets 60 % of what is left
for draft in ort-cpu torch; do
  left=$(( TOTAL_S - $(elapsed) - 15 ))  # 15 s: timeout's -k grace and the last words
  dir="$OUT"; [ "$draft" = torch ] && dir="$OUT/draft-torch"
  [ "$draft" = ort-cpu ] && left=$(( left * 60 / 100 ))
  if [ "$left" -lt 60 ]; then
    echo "gpu-check: only ${left} s left of ${TOTAL_S} s: skipping the $draft-draft timing"; status=1
    continue
  fi
  echo "gpu-check: timing, $draft draft (at most ${left} s)"
  mkdir -p "$dir"
  timeout -k 5 "$left" "$PY" scripts/gpu_timing.py "$dir" --draft "$draft" --tests-json "$OUT/tests.json" 2>&1 | tee "$dir/gpu_timing.log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "gpu-check: timing stopped after ${left} s; $dir/gpu_timing.json has what it measured"
  fi
  [ "$rc" -eq 0 ] || status=1
done
echo "gpu-check: done in $(elapsed) s, exit $status; results in $OUT"
exit $status
