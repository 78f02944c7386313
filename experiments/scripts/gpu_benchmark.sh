#!/usr/bin/env bash
# Everything a lent GPU runs for experiments/results/benchmark-<device>.md, in one call:
#   experiments/scripts/gpu_benchmark.sh OUT_DIR
# 1. the card and the framework versions; 2. the cuDNN attention checks (tests/model_test.py:
# bf16 against numpy, fused dropout); 3. where the JAX step's time goes (experiments/scripts/profile_step.py,
# base-v1 at 256x128, about a minute); 4. `python -m minilm_jax benchmark --mode gpu`: every
# workload and shape, the JAX route first, each measurement in its own process
# (BENCH_ARGS=--max-batch adds the largest-batch search; it needs a second call's time). Its rows land in
# OUT_DIR/benchmark-<device>.jsonl as they come, so a call cut short keeps what finished;
# `python -m minilm_jax benchmark --mode gpu --table OUT_DIR/benchmark-<device>.jsonl`
# rebuilds the table from them. Needs only jax, flax, optax, torch and transformers (no
# data, no download: random weights of the real shapes). MODE=cpu tries the script here (tiny
# models; the profile of tiny-v1 at 4x32).
set -uo pipefail
out=${1:?usage: experiments/scripts/gpu_benchmark.sh OUT_DIR}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$out"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.sm --format=csv
  $py -c "import jax, flax, optax, torch, transformers as t; print('jax', jax.__version__, jax.devices(), '| flax', flax.__version__, '| optax', optax.__version__, '| torch', torch.__version__, '| transformers', t.__version__)"
} 2>&1 | tee "$out/machine.txt"
timeout 150 $py -m pytest -q -p no:cacheprovider tests/model_test.py -k fused_attention -rs 2>&1 | tail -4 | tee "$out/attention_check.txt"
[ "${MODE:-gpu}" = cpu ] && PROFILE_ARGS=${PROFILE_ARGS:---config tiny-v1 --shape 4x32 --steps 3}
timeout 150 $py -m experiments.scripts.profile_step --mode "${MODE:-gpu}" ${PROFILE_ARGS:-} --out "$out" 2>&1 \
  | grep -v "^W0000\|^I0000" | head -60
$py -m minilm_jax benchmark --mode "${MODE:-gpu}" --out-dir "$out" --timeout "${MEASURE_TIMEOUT:-180}" ${BENCH_ARGS:-} 2>&1 | grep -v "^W0000\|^I0000" | tee "$out/benchmark.log"
