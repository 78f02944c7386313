#!/usr/bin/env bash
# The rows of experiments/results/tpu-compile.md, compiled for TPU slices on this host (libtpu,
# the `tpu` extra; nothing runs on a TPU):
#   bash experiments/scripts/tpu_compile.sh ROWS_DIR [after|paper|maxbatch ...]
# after: the benchmark's workloads on v5e:2x2 at attention dropout 0 and 0.1; paper: the paper
# configs at the papers' global batch, the smallest slice of each generation; maxbatch: the
# largest batch per device of base-v2 on each generation at seq 128 and 512 (memory only). Each row is appended
# to ROWS_DIR/<part>.jsonl as it comes (a call cut short keeps what finished). A BERT-base step
# takes 1.5-5 minutes to compile on 2 CPU cores. The before rows are the `after` part's workload
# commands run on an earlier commit. Then:
#   python -m experiments.scripts.tpu_compile_report --rows ROWS_DIR --out experiments/results/tpu-compile.md
set -uo pipefail
rows=${1:?usage: experiments/scripts/tpu_compile.sh ROWS_DIR [after|paper|maxbatch ...]}
shift
parts=${*:-after paper maxbatch}
mkdir -p "$rows"
export JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1 PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
compile() { $py -m minilm_jax compile --out "$rows/$part.jsonl" "$@" 2>&1 | grep --line-buffered -v "WARNING\|E0000\|Source Loc\|learning/45\|InitGoogle\|host bounds"; }
for part in $parts; do
  case $part in
    after)
      for dropout in 0 0.1; do
        compile --slice v5e:2x2 --workload base-v1,base-v2 --batch-per-chip 64 --seq 128 --student-attention-dropout $dropout
        compile --slice v5e:2x2 --workload base-v1,base-v2 --batch-per-chip 16 --seq 512 --student-attention-dropout $dropout
        compile --slice v5e:2x2 --workload base-v2 --batch-per-chip 64 --seq 512 --student-attention-dropout $dropout
      done
      compile --slice v5e:2x2 --workload large-v2 --batch-per-chip 16 --seq 512
      compile --slice v5e:2x2 --workload large-v2 --batch-per-chip 16 --seq 512 --student-attention-dropout 0;;
    paper)
      for variant in v2-bert-base-L6-H384 v1-bert-base-L6-H384 v2-bert-large-L6-H384 v1-xlmr-base-L12-H384; do
        compile --config "experiments/configs/paper.py:$variant" --slice v5e,v6e,v4,v5p --smallest
      done;;
    maxbatch)
      compile --slice v5e:2x2,v6e:2x2,v5p:2x2x1,v4:2x2x1 --workload base-v2 --seq 128,512 --max-batch \
        --student-attention-dropout 0 --nocount-loops;;
    *) echo "unknown part $part: use after, paper or maxbatch" >&2; exit 2;;
  esac
done
