#!/bin/bash
# issue 16's bench on the H200: the wheels in .whl (transformers/peft/bitsandbytes pins), then
# bench/gpu_trainer.py from this folder (a copy of branch i16), output to $OUT.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/.gpu16 PYTHONUNBUFFERED=1
python3 -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bnb', bitsandbytes.__version__, torch.cuda.get_device_name(0))"
cd .gpu16 && python3 bench/gpu_trainer.py --steps 8 --eval-size 96 --work-dir /tmp/tuneplane-bench 2>&1 | grep -v '^{"id"' | tee $OUT/bench.log
