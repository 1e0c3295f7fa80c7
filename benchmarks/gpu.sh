#!/usr/bin/env bash
# The GPU measurements, as one run of about five minutes on one H100/H200 (the device tool's `run`):
#   make gpu-wheels            # here, once: hydra-core/omegaconf wheels the GPU image lacks, into .whl/
#   run: bash benchmarks/gpu.sh        carry: [".whl"]
# It writes JSON lines to $OUT (or benchmarks/out/) and prints them:
#   1. the grouped-GEMM probe and the backend that runs, per dtype;
#   2. train_step.py --suite gpu: 152m and 1.5b-widths (6 layers), dense and 8x top-2 MoE, seq 4096, 4 sequences,
#      ours vs transformers' Llama/Mixtral, tokens/s, MFU (measured 8192^3 bf16 GEMM and datasheet), peak memory;
#   3. the MoE layer at the 8x1.5b shape (16384 tokens) in bf16, fp16 and fp32: ours vs transformers vs the ideal
#      GEMM, with every fallback backend (sliced, padded, loop) timed and checked against grouped.
# Each stage runs under its own time limit (all together under 9 minutes) and a failed one is recorded as a JSON
# line, so the others still report.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
out="${OUT:-benchmarks/out}"
mkdir -p "$out"
nvidia-smi -L || true
failed() { echo "{\"stage\": \"$1\", \"failed\": true, \"exit\": $2}" | tee -a "$out/failed.jsonl"; }
timeout 60 python3 - <<'PY' | tee "$out/backends.jsonl" || failed backends $?
import json, logging, torch
from dropup.moe import effective_backend, grouped_mm_works
logging.basicConfig(level=logging.INFO)
dev = torch.device("cuda")
for dtype in (torch.bfloat16, torch.float16, torch.float32):
    x = torch.zeros(1, 8, device=dev, dtype=dtype)
    print(json.dumps({"torch": torch.__version__, "device": torch.cuda.get_device_name(dev),
                      "capability": torch.cuda.get_device_capability(dev), "dtype": str(dtype),
                      "grouped_mm_works": grouped_mm_works(dev, dtype), "runs": effective_backend("grouped", x)}))
PY
timeout 270 python3 benchmarks/train_step.py --suite gpu --device cuda --reps 10 --warmup 3 \
  | tee "$out/train_step.jsonl" || failed train_step $?
for dtype in bf16 fp16 fp32; do
  timeout 75 python3 benchmarks/moe_layer.py --device cuda --dtype "$dtype" --tokens 16384 --d-model 2048 \
    --d-ff 7168 --experts 8 --top-k 2 --reps 8 --also sliced,padded,loop | tail -1 | tee -a "$out/moe_layer.jsonl" \
    || failed "moe_layer_$dtype" $?
done
