#!/bin/bash
# Re-check the api's memory estimate on an NVIDIA GPU (issue 13): both families of
# bench/gpu_families.py at the spec's own settings and with the trainer's defaults. Each report
# ($OUT/gpu_families-<arch>.json / .md, or explicit-<arch> for the first kind) has the measured
# peak beside the api's estimate for the configuration that ran. Wheels in .whl/ (the pins of
# trainer/constraints.txt: transformers, peft, bitsandbytes, tokenizers) are installed beside
# the machine's torch when present, as bench/results/gpu_trainer_plan/run.sh does.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export OUT=${OUT:-/tmp/tuneplane-families/out} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
for a in qwen2.5-vl-7b gemma4; do
  python3 bench/gpu_families.py "$a" --steps 4 --batch 4 --eval-size 16 \
    --micro-batch-size 4 --checkpointing full --eval-mode generate
  # The names bench/results/gpu_families/after-plan uses for these runs.
  mv "$OUT/gpu_families-$a.json" "$OUT/explicit-$a.json"
  mv "$OUT/gpu_families-$a.md" "$OUT/explicit-$a.md"
  mv "$OUT/results-$a.json" "$OUT/results-explicit-$a.json"
  python3 bench/gpu_families.py "$a" --steps 4 --batch 4 --eval-size 16
done
cat "$OUT"/*.md
