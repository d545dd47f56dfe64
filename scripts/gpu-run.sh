#!/usr/bin/env bash
# The GPU run, as one `device` call (after scripts/gpu-wheels.sh here):
#   run(command="bash scripts/gpu-run.sh", carry=[".whl"], timeout_s=600)
# Installs the carried wheels, then runs the full-size benchmark (1024x1024, 30 steps, fp16, rank 32:
# base vs one LoRA fused and unfused, resident switch, cold load and hotswap, process start to ready,
# peak memory, FLOP floor). Output: $OUT/gpu.json (the figures) and $OUT/gpu.log.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
export PYTHONPATH=/tmp/site:$PWD:$PWD/client PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.log"
python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)" | tee -a "$OUT/gpu.log"
python3 -m sdxl_lora_tools.bench.gpu --repeats "${REPEATS:-3}" --out "$OUT/gpu.json" 2>&1 | tee -a "$OUT/gpu.log"
