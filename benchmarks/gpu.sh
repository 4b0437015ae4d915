#!/usr/bin/env bash
# What only a GPU can show (issue #6), in two stages of a few minutes each. From the repository root:
#
#   bash benchmarks/gpu.sh kernels OUT             # compiled kernels against the reference (the property
#                                                  # tests, no interpreter), a training step with no host
#                                                  # sync (tests/test_cuda_step.py), the kernel benchmarks
#                                                  # (benchmarks/kernels.py)
#   bash benchmarks/gpu.sh training OUT [DATA_DIR] # training step (also compiled, CUDA graphs, but for resnet50),
#                                                  # epoch with data loading (GPU busy share), augmentation, fused
#                                                  # kernels in a step: conv4 at 28 px (byol.py's default recipe, on
#                                                  # the embedded Omniglot), resnet18 at 32 and 224 px, resnet50 at
#                                                  # 224 px
#
# OUT receives a log per command and the JSON files. DATA_DIR is a TLL layout (left/*.jpg, right/*.jpg);
# without it the epoch section writes 4096 synthetic JPEG pairs. Needs python3 with torch (CUDA), torchvision,
# triton, numpy, pillow, tqdm, pytest and hypothesis; byol-pytorch and lightly
# (pip install -e ".[bench]") add their rows when installed. Every command runs even if one before it fails;
# the exit status says whether all passed.
set -uo pipefail

stage=${1:-}
out=${2:-}
data=${3:-}
if [[ "$stage" != kernels && "$stage" != training ]] || [[ -z "$out" ]]; then
    echo "usage: bash benchmarks/gpu.sh kernels|training OUT [DATA_DIR]" >&2
    exit 2
fi
if [[ -n "$data" && ! -d "$data" ]]; then
    echo "gpu.sh: DATA_DIR $data is not a directory; give a TLL layout (left/*.jpg, right/*.jpg) or leave it out" >&2
    exit 2
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)
[[ -n "$data" ]] && data=$(cd "$data" && pwd)
cd "$(dirname "$0")/.."
if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu.sh: torch sees no CUDA device; these measurements need a GPU (on the CPU: python benchmarks/training.py --device cpu)" >&2
    exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

failed=()
run() {  # run NAME COMMAND...: COMMAND's output to the terminal and to OUT/NAME.log
    local name=$1
    shift
    echo "== $name: $*" | tee "$out/$name.log"
    "$@" 2>&1 | tee -a "$out/$name.log" || failed+=("$name")
}

python3 - <<'EOF' | tee "$out/versions.txt" || failed+=(versions)
import importlib.metadata, importlib.util, platform, torch
gpu = torch.cuda.get_device_properties(0)
print(f"{gpu.name}, {gpu.total_memory / 2**30:.0f} GiB, {gpu.multi_processor_count} SMs; torch built for CUDA {torch.version.cuda}")
print(f"Python {platform.python_version()}, " + ", ".join(
    f"{name} {importlib.metadata.version(name)}" for name in ("torch", "torchvision", "triton", "byol-pytorch", "lightly")
    if importlib.util.find_spec(name.replace("-", "_")) is not None))
EOF

if [[ "$stage" == kernels ]]; then
    KERNELS_TEST_DEVICE=cuda run kernel-tests python3 -m pytest -q -rs tests/test_cosine_loss.py tests/test_ema.py
    KERNELS_TEST_DEVICE=cuda run cuda-step-test python3 -m pytest -q -rs tests/test_cuda_step.py
    run bench-kernels python3 benchmarks/kernels.py --device cuda --json "$out/bench-kernels.json"
else
    run training-conv4-28px python3 benchmarks/training.py --device cuda --arch conv4 --workers 8 --epochs 5 \
        --only step epoch augment --compile --json "$out/training-conv4-28px.json"
    data_args=(--epochs 5 --max-pairs 4096)
    [[ -n "$data" ]] && data_args+=(--data-dir "$data")
    run training-resnet18-32px python3 benchmarks/training.py --device cuda --arch resnet18 --image-size 32 --batch-size 256 \
        --workers 8 --compile "${data_args[@]}" --json "$out/training-resnet18-32px.json"
    run training-resnet18-224px python3 benchmarks/training.py --device cuda --arch resnet18 --image-size 224 --batch-size 256 \
        --workers 8 --compile "${data_args[@]}" --json "$out/training-resnet18-224px.json"
    run training-resnet50-224px python3 benchmarks/training.py --device cuda --arch resnet50 --image-size 224 --batch-size 128 \
        --workers 8 --only step epoch "${data_args[@]}" --json "$out/training-resnet50-224px.json"
fi

if (( ${#failed[@]} )); then
    echo "gpu.sh: failed: ${failed[*]} (logs in $out)" >&2
    exit 1
fi
