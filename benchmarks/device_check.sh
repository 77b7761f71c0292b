#!/usr/bin/env bash
# The GPU check (`make device-check`), on a machine with one CUDA GPU: installs the wheels that
# `make device-kit` put in .whl/ (when there are any), then runs the GPU-marked tests and the
# precision matrix on a ~1.2B Llama-shaped model, each within its own time budget so that one slow
# step cannot starve the other. Logs, the JUnit report and the matrix's JSON go to $OUT (or ./device-out).
#
#   device run: carry [".whl", ".devicecarry"], timeout_s 570, command: bash benchmarks/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
PY=${DEVICE_PY:-python3}
TEST_BUDGET=${TEST_BUDGET:-210}      # seconds for the GPU-marked tests
MATRIX_BUDGET=${MATRIX_BUDGET:-200}  # seconds after which the matrix starts no further candidate
MATRIX_LIMIT=${MATRIX_LIMIT:-280}    # seconds after which the matrix is stopped
start=$(date +%s)
stamp() { echo "== $(( $(date +%s) - start )) s: $*"; }

if compgen -G ".whl/*.whl" >/dev/null; then
    stamp "installing the carried wheels"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "device-check: installing .whl/ failed"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
TOKENIZER=${TOKENIZER:-$PWD/.devicecarry/tokenizer}
[ -f "$TOKENIZER/tokenizer.json" ] && export QUANTSELECT_TEST_TOKENIZER=$TOKENIZER

stamp "what this machine has"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$OUT/gpu.txt"
$PY - <<'EOF' 2>&1 | tee "$OUT/versions.txt"
import importlib, importlib.metadata, platform
import torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE")
found = {}
for name in ("transformers", "torchao", "bitsandbytes", "gptqmodel", "optimum.gptq", "triton", "pytest"):
    try:
        m = importlib.import_module(name)
        top = name.split(".")[0]
        found[name] = f"{importlib.metadata.version(top)} ({m.__file__})"
    except Exception as e:  # say every missing piece at once, then go on: the tests say which candidates it stops
        found[name] = f"IMPORT FAILED: {type(e).__name__}: {e}"
for name, what in found.items():
    print(f"{name}: {what}")
EOF

stamp "GPU-marked tests (budget ${TEST_BUDGET} s)"
timeout -k 10 "$TEST_BUDGET" $PY -m pytest -m gpu tests/test_gpu.py -p no:cacheprovider -v -rA --timeout 150 \
    --junitxml "$OUT/test_gpu.xml" 2>&1 | tee "$OUT/test_gpu.log"
tests=${PIPESTATUS[0]}

stamp "precision matrix (starts no candidate after ${MATRIX_BUDGET} s, stopped at ${MATRIX_LIMIT} s)"
timeout -k 10 "$MATRIX_LIMIT" $PY benchmarks/precision_matrix.py --tokenizer "$TOKENIZER" \
    --budget-seconds "$MATRIX_BUDGET" --out "$OUT/precision_matrix.json" 2>&1 | tee "$OUT/precision_matrix.log"
matrix=${PIPESTATUS[0]}

stamp "done: tests exit $tests, matrix exit $matrix (124: stopped at its time limit)"
[ "$tests" = 0 ] && [ "$matrix" = 0 ]
