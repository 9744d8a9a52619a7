#!/usr/bin/env bash
# The GPU checks, in one run on a lent GPU machine (python3 with torch/CUDA and transformers; no
# Ray, no MLflow; nothing reachable outside it). Here first:
#   ../shared/tools/gpu-bundle.sh tensorboardX==2.6.5 pydantic==2.14.4 pydantic-core==2.50.5 \
#       annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
#   .venv/bin/python benchmarks/gpu_models.py .gpu/models      # configs and tokenizer, no weights
# then run `bash benchmarks/gpu_machine.sh ITEMS` there with .gpu carried. The default
# architectures run with random weights (the real ones do not fit beside Ray in one call; speed
# does not depend on the weights' values). Logs go to $OUT.
set -uo pipefail
ITEMS=${1:-100000}
OUT=${OUT:-/tmp/out}
mkdir -p /tmp/site "$OUT"
tar -xJf .gpu/ray.tar.xz -C /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/wheels/*.whl
python3 -m compileall -q -j 0 /tmp/site/ray >/dev/null  # as an installed wheel has it: no worker compiles Ray
export PYTHONPATH=/tmp/site:$PWD/platform HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 \
    RAY_AUTH_MODE=disabled FUSIONREC_HOME=/tmp/fusionrec
nvidia-smi -L
python3 - <<'PY'
# Random weights in the default architectures (configs and tokenizer files carried in .gpu/models).
from transformers import AutoConfig, AutoModel
for name in ("minilm", "dinov2"):
    folder = f".gpu/models/{name}"
    AutoModel.from_config(AutoConfig.from_pretrained(folder)).save_pretrained(folder)
PY
timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/encode.py --users 2000 --items "$ITEMS" --images "$ITEMS" --sample 8192 \
    --text-model .gpu/models/minilm --image-model .gpu/models/dinov2 2>&1 | grep -v -i warn | tee "$OUT/encode.log"
[ "${TESTS:-1}" = 1 ] && timeout 150 python3 -m pytest -q -p no:cacheprovider -rs tests/test_train_device.py 2>&1 \
    | tail -15 | tee "$OUT/train_device.log"
[ "${PROFILE:-1}" = 1 ] && timeout 60 python3 benchmarks/gpu_profile.py .gpu/models 2>&1 | grep -v -i warn | tee "$OUT/profile.log"
