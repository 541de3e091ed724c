#!/usr/bin/env bash
# The GPU check: on a machine with one CUDA GPU and no network, run the CUDA tests and the SFT, GRPO and memory
# benchmarks at sizes that take a few minutes (about 6 in all, each step under its own time limit), and print their
# tables.
#
#   bash benchmarks/gpu.sh                  # finds a Python with CUDA torch (below), then runs everything
#   bash benchmarks/gpu.sh /path/to/python  # a Python (e.g. a venv's) that already has paperloop and CUDA torch
#   bash benchmarks/gpu.sh --cpu-check      # without a GPU: the same steps at their smallest, to see they hold
#
# Which Python: the argument, else $PAPERLOOP_PYTHON, else ./.venv/bin/python when it has paperloop and CUDA
# torch, else a venv made here over the machine's own packages (--system-site-packages: its CUDA torch,
# transformers, accelerate, ...) with paperloop installed into it from this checkout, offline (--no-index
# --no-deps). Nothing is downloaded. TRL rows run only where trl is importable (the `bench` extra).
# The step timings sync the GPU before reading the clock; every contender runs on the device Accelerate picks
# (the GPU). memory.py measures host memory (peak RSS), so it runs with the GPU hidden: its table is this
# machine's CPU; the GPU's peak memory is the chunked output layer's CUDA check, printed by tests.lm.test_cuda.
set -uo pipefail
cd "$(dirname "$0")/.."

CPU_CHECK=0
PY="${PAPERLOOP_PYTHON:-}"
for arg in "$@"; do
    case "$arg" in
        --cpu-check) CPU_CHECK=1 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) PY="$arg" ;;
    esac
done

has_paperloop() { "$1" -c "import paperloop, torch" >/dev/null 2>&1; }
has_cuda() { "$1" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; }

if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ] && has_paperloop .venv/bin/python && { [ "$CPU_CHECK" = 1 ] || has_cuda .venv/bin/python; }; then
        PY=.venv/bin/python
    else
        VENV="${TMPDIR:-/tmp}/paperloop-gpu-venv"
        echo "gpu.sh: making $VENV over the machine's packages, paperloop from this checkout (offline)"
        python3 -m venv --system-site-packages "$VENV" &&
            "$VENV/bin/pip" install -q --no-index --no-deps --no-build-isolation -e . || {
            echo "gpu.sh: could not install paperloop offline into $VENV (needs setuptools>=68 there)" >&2; exit 2; }
        PY="$VENV/bin/python"
    fi
fi
if ! has_paperloop "$PY"; then
    echo "gpu.sh: $PY cannot import paperloop and torch; pass a Python that can (bash benchmarks/gpu.sh PYTHON)" >&2
    exit 2
fi
missing=$("$PY" - <<'PY'
import importlib.util
needed = ["torch", "transformers", "accelerate", "tokenizers", "safetensors", "omegaconf", "tqdm", "numpy", "pytest"]
print(" ".join(m for m in needed if importlib.util.find_spec(m) is None))
PY
)
if [ -n "$missing" ]; then
    echo "gpu.sh: $PY lacks $missing (install them there first: this machine has no network)" >&2
    exit 2
fi
if [ "$CPU_CHECK" = 0 ] && ! has_cuda "$PY"; then
    echo "gpu.sh: torch in $PY sees no CUDA device (use --cpu-check to run the steps on the CPU)" >&2
    exit 2
fi
HAS_TRL=$("$PY" -c "import importlib.util; print(int(importlib.util.find_spec('trl') is not None))")

export TOKENIZERS_PARALLELISM=false
WORK=$(mktemp -d "${TMPDIR:-/tmp}/paperloop-gpu.XXXXXX")  # the benchmarks' runs: a fresh folder each time
# The tests: one reduction order in cuBLAS (read when CUDA starts, so set before the process does), for exact resumes
TESTS_ENV=(env CUBLAS_WORKSPACE_CONFIG=":4096:8")
failed=()
step() {  # step NAME TIMEOUT_S COMMAND...: run one step, its output as it comes; a failure is noted, not fatal
    local name="$1" limit="$2"; shift 2
    echo; echo "=== $name ($(date -u '+%Y-%m-%d %H:%M:%S UTC'))"; echo "+ $*"
    timeout "$limit" "$@" || failed+=("$name (exit $?)")
}

echo "=== the machine"
"$PY" - <<'PY'
import platform, torch, transformers
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"transformers {transformers.__version__}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i}: {p.name}, {p.total_memory / 2**30:.0f} GiB")
if not torch.cuda.is_available():
    print("no CUDA device: --cpu-check")
PY
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv

step "CUDA tests" 180 "${TESTS_ENV[@]}" "$PY" -m pytest -q -rs -p no:cacheprovider tests/engine/test_cuda.py \
    tests/lm/test_cuda.py
if [ "$CPU_CHECK" = 1 ]; then  # the tests skip on the CPU: their checks run by hand there, on the CPU
    step "the engine's CUDA checks, on the CPU" 300 "$PY" -m tests.engine.test_cuda
fi
step "the LM CUDA checks, by hand (the memory check prints its peaks)" 120 "${TESTS_ENV[@]}" "$PY" -m tests.lm.test_cuda

if [ "$CPU_CHECK" = 1 ]; then  # the smallest runs: that each benchmark still starts, measures and prints
    SFT=(--sizes h128 --no-compile --rounds 1 --steps 2)
    GRPO=(--repeats 1 --warmup 1 --steps 1 --betas 0.0 --prompts 2 --generations 2 --new-tokens 4)
    MEMORY=(--vocabs 32000 --rounds 1 --steps 1 --modes plain ours)
else  # compiled modes left out: compiling takes longer than the measurement
    SFT=(--sizes h128 h256 --no-compile --rounds 3 --steps 10)
    GRPO=(--repeats 3 --warmup 1 --steps 4)
    MEMORY=(--vocabs 32000 --rounds 1 --steps 1)
fi
if [ "$HAS_TRL" = 1 ]; then
    SFT_ONLY=(); GRPO_ONLY=(); MEMORY_MODES=()
else
    echo; echo "gpu.sh: trl is not importable in $PY: the TRL rows are left out"
    SFT_ONLY=(--no-trl); GRPO_ONLY=(--only ours hand dynamic)
    MEMORY_MODES=(--modes plain "plain, checkpointing" ours "ours, checkpointing")
fi
[ "$CPU_CHECK" = 1 ] && MEMORY_MODES=()  # the CPU check's two modes above
step "SFT benchmark" 150 "$PY" benchmarks/sft.py "${SFT[@]}" "${SFT_ONLY[@]}" --out "$WORK/sft"
step "GRPO benchmark" 150 "$PY" benchmarks/grpo.py "${GRPO[@]}" "${GRPO_ONLY[@]}"
step "memory benchmark (host memory, the GPU hidden)" 240 env CUDA_VISIBLE_DEVICES= "$PY" benchmarks/memory.py \
    "${MEMORY[@]}" "${MEMORY_MODES[@]}"

echo
if [ "${#failed[@]}" -gt 0 ]; then
    printf 'gpu.sh: failed: %s\n' "${failed[@]}"
    exit 1
fi
echo "gpu.sh: every step passed"
