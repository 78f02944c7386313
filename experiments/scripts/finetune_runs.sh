#!/usr/bin/env bash
# The fine-tuning runs behind experiments/results/finetune.md, on a 2-core CPU, sequential.
#
#   nohup experiments/scripts/finetune_runs.sh runs/finetune > runs/finetune/runs.log 2>&1 &
#   .venv/bin/python -m experiments.scripts.report --runs runs/finetune
#   BUDGET=full nohup experiments/scripts/finetune_runs.sh runs/ft-full > runs/ft-full/runs.log 2>&1 &
#   .venv/bin/python -m experiments.scripts.report --runs runs/ft-full --name finetune-full
#
# BUDGET=subset (the default; about one hour of CPU in all): every task trains on a subset
# of its train set (the first N rows of the file) for one or two epochs. BUDGET=full
# (SST-2, CoLA and RTE): the whole train set, batches grouped by length (the rows are short:
# SST-2 averages 13 tokens), 2 epochs of SST-2, 5 of CoLA, 3 of RTE. GLUE dev is always the full
# official dev set. Sequence lengths cover every SST-2 / CoLA dev sentence; RTE uses BERT's 128 (33 of
# its 277 dev pairs are cut; `summary.json` records the counts). SQuAD uses lr 6e-5 as the
# papers do. Models: the packaged teacher (6x384), its bottom 3 layers, a random 3x384
# encoder with the teacher's tokenizer (lr 1e-4) and the 3x384 MiniLM student distilled
# by `experiments/configs/demo.py` (runs/demo/hf).
set -euo pipefail
out=${1:-runs/finetune}
student=${STUDENT:-runs/demo/hf}
py=.venv/bin/python

budget=${BUDGET:-subset}
if [ "$budget" = full ]; then default_tasks="sst2 cola rte"; else default_tasks="sst2 rte cola squad2"; fi
tasks=" ${TASKS:-$default_tasks} "  # e.g. TASKS=squad2 runs only the SQuAD lines
models=" ${MODELS:-teacher-L6 truncated-L3 random-L3 distilled-L3} "  # e.g. MODELS=teacher-L6

ft() {  # label task seeds extra-flags...
  local label=$1 task=$2 seeds=$3; shift 3
  [[ $tasks == *" $task "* && $models == *" $label "* ]] || return 0
  if [ -f "$out/$label/$task/summary.json" ]; then echo "=== skip $label $task: done"; return 0; fi
  echo "=== $(date -u +%T) start $label $task seeds=$seeds $*"
  local name=$task; [ "$task" = squad2 ] || name=glue/$task
  $py -m minilm_jax finetune --task "$name" --workdir "$out/$label/$task" --seeds "$seeds" \
      --config.batch_size=32 "$@"
  echo "=== $(date -u +%T) done $label $task"
}

teacher=(--model all-MiniLM-L6-v2 --config.learning_rate=5e-5)
truncated=(--model all-MiniLM-L6-v2 --config.num_layers=3 --config.learning_rate=5e-5)
random=(--model all-MiniLM-L6-v2 --config.num_layers=3 --config.random_init=True
        --config.learning_rate=1e-4)
distilled=(--model "$student" --config.learning_rate=5e-5)

sst2=(--config.max_seq_len=64 --config.max_train_examples=2400 --config.epochs=2)
cola=(--config.max_seq_len=48 --config.max_train_examples=2400 --config.epochs=2)
rte=(--config.max_seq_len=128 --config.epochs=1)
teacher_sst2_seeds=0,1
if [ "$budget" = full ]; then
  sst2=(--config.max_seq_len=64 --config.epochs=2 --config.group_by_length=True)
  cola=(--config.max_seq_len=64 --config.epochs=5 --config.group_by_length=True)
  rte=(--config.max_seq_len=128 --config.epochs=3 --config.group_by_length=True)
  teacher_sst2_seeds=0
fi
# SQuAD 2.0: no train file here, so the first 25 dev articles train and the other 10 are
# scored (a by-article dev split); 1,024 training questions, 500 evaluated, 256-token windows.
squad=(--config.max_seq_len=256 --config.doc_stride=128 --config.max_train_examples=1024
       --config.max_eval_examples=500 --config.epochs=1)

ft teacher-L6 sst2 $teacher_sst2_seeds "${teacher[@]}" "${sst2[@]}"
ft truncated-L3 sst2 0 "${truncated[@]}" "${sst2[@]}"
ft random-L3 sst2 0 "${random[@]}" "${sst2[@]}"
ft distilled-L3 sst2 0 "${distilled[@]}" "${sst2[@]}"
ft teacher-L6 cola 0 "${teacher[@]}" "${cola[@]}"
ft truncated-L3 cola 0 "${truncated[@]}" "${cola[@]}"
ft random-L3 cola 0 "${random[@]}" "${cola[@]}"
ft distilled-L3 cola 0 "${distilled[@]}" "${cola[@]}"
ft teacher-L6 rte 0 "${teacher[@]}" "${rte[@]}"
ft truncated-L3 rte 0 "${truncated[@]}" "${rte[@]}"
ft random-L3 rte 0 "${random[@]}" "${rte[@]}"
ft distilled-L3 rte 0 "${distilled[@]}" "${rte[@]}"
ft teacher-L6 squad2 0 "${teacher[@]/5e-5/6e-5}" "${squad[@]}"
ft truncated-L3 squad2 0 "${truncated[@]/5e-5/6e-5}" "${squad[@]}"
ft random-L3 squad2 0 "${random[@]}" "${squad[@]}"
ft distilled-L3 squad2 0 "${distilled[@]/5e-5/6e-5}" "${squad[@]}"
echo "=== $(date -u +%T) all done"
