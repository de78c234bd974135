#!/usr/bin/env bash
# The CUDA checks, ready to run on a lent GPU machine in one call (under 8 minutes):
#   bash benchmarks/gpu_check.sh --prepare   # here, with the registries: .gpu/ = the lock's wheels for Python 3.12
#   bash benchmarks/gpu_check.sh             # there (no registry), with .gpu carried: tests + benchmarks -> $OUT
# The GPU image has its own torch (CUDA) and Python 3.12 but older or missing transformers/peft/trl/datasets/
# bitsandbytes and no network, so --prepare downloads the lock's versions of those as cp312 wheels
# (bitsandbytes slimmed to its CPU and CUDA 13 libraries, so the carry stays under the 64 MiB a call takes),
# and the run installs them into /tmp/site with --no-deps. What it runs, each bounded in time:
#   1. pytest -m cuda (tests/test_cuda.py): fast kernel vs PEFT on CUDA in fp32/bf16 (grouped_mm), 4-bit experts
#      on bitsandbytes' CUDA backend against bitsandbytes' own dequantisation, a guarded bf16 train run;
#   2. benchmarks/expert_lora.py: step time and torch.cuda.max_memory_allocated, attention-only vs PEFT vs fast;
#   3. benchmarks/expert_4bit.py: 4-bit experts vs 4-bit nn.Linear only, on CUDA.
# No CUDA figure exists until this has run on a GPU; the README says so.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=.gpu
LOCKED=(transformers peft trl accelerate datasets pydantic pydantic_core annotated-types typing-inspection
        huggingface_hub httpx2 httpcore2 hf-xet kernels tokenizers dill multiprocess fsspec safetensors)

pin() {  # the lock's version of a package (names compared as pip normalises them)
  local want; want=$(echo "$1" | tr '_.' '--' | tr 'A-Z' 'a-z')
  grep -v '^#' requirements-lock.txt | while IFS='=' read -r name _ version; do
    [ "$(echo "$name" | tr '_.' '--' | tr 'A-Z' 'a-z')" = "$want" ] && echo "$version"
  done
}

if [ "${1:-}" = "--prepare" ]; then
  rm -rf "$WHEELS" && mkdir -p "$WHEELS"
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
  specs=()
  for name in "${LOCKED[@]}" bitsandbytes; do specs+=("$name==$(pin "$name")"); done
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHEELS" "${specs[@]}" || exit 1
  # bitsandbytes ships a library per CUDA and ROCm version (125 MB unpacked): keep the CPU one and CUDA 13's
  bnb=$(ls "$WHEELS"/bitsandbytes-*.whl)
  python3 - "$bnb" <<'EOF'
import re, sys, zipfile
path = sys.argv[1]
keep = re.compile(r".*libbitsandbytes_(cpu|cuda13\d)\.so$")
with zipfile.ZipFile(path) as src:
    items = [(i, src.read(i)) for i in src.infolist() if not i.filename.endswith(".so") or keep.match(i.filename)]
with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
    for info, data in items:
        dst.writestr(info, data)
EOF
  du -sh "$WHEELS"
  echo "gpu-check: wheels ready in $WHEELS; run: bash benchmarks/gpu_check.sh  (carry: .gpu)"
  exit 0
fi

OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 --version; } 2>&1 | tee "$OUT/machine.txt"
if [ -d "$WHEELS" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
python3 - <<'EOF' 2>&1 | tee -a "$OUT/machine.txt"
import importlib
for name in ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as err:  # noqa: BLE001 - a report, not a program
        print(name, "NOT IMPORTABLE:", type(err).__name__, err)
import torch
print("cuda", torch.cuda.is_available(), torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
status=0
timeout 240 python3 -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider 2>&1 | tee "$OUT/pytest_cuda.log" || status=1
timeout 150 python3 benchmarks/expert_lora.py --json "$OUT/expert_lora.json" 2>&1 | tee "$OUT/expert_lora.log" || status=1
timeout 120 python3 benchmarks/expert_4bit.py 2>&1 | tee "$OUT/expert_4bit.log" || status=1
echo "gpu-check: finished (status $status); logs and JSON in $OUT"
exit $status
