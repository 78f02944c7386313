"""`python -m minilm_jax compile`: the distillation step compiled for TPU slices, one row each.

    python -m minilm_jax compile --config experiments/configs/paper.py:v2-bert-base-L6-H384 --slice v5e:4x4
    python -m minilm_jax compile --workload base-v1 --slice v5e:2x2 --batch-per-chip 64 --seq 128
    python -m minilm_jax compile --config experiments/configs/demo.py --slice v5e --smallest
    python -m minilm_jax compile --workload base-v2 --slice v6e:2x2 --seq 512 --max-batch

Rows (JSON) are appended to `--out` as they come and printed as a table; `--markdown`
rewrites a table of every row in `--out`.
"""

import dataclasses
import json
import os
import pathlib
import sys
from collections.abc import Sequence

from minilm_jax.aot import chips, report, step as step_lib


def _stages(fv) -> list[tuple[str, list[step_lib.Stage], pathlib.Path | None]]:
  """(label, stages, tokenizer dir) of `--config` or of each `--workload`."""
  from minilm_jax.benchmark import jax_routes, workloads
  if fv.config is not None:
    cfg = fv.config
    teacher, directory = step_lib.read_teacher(cfg.teacher)
    return [(fv["config"].config_filename, step_lib.stages(cfg, teacher), directory)]
  out = []
  for name in fv.workload:
    cfg, teacher = jax_routes.jax_config(workloads.workload("gpu", name), 8, 128, dtype="auto")
    out.append((name, step_lib.stages(cfg, teacher), None))
  return out


def rows(fv) -> list[dict]:
  """Every (config, stage, slice, batch, seq) the flags ask for, compiled."""
  found = []
  for label, stages, tokenizer_dir in _stages(fv):
    for stage in stages:
      if fv.stage is not None and stage.name != fv.stage:
        continue
      if fv["student-attention-dropout"].value is not None:
        stage = dataclasses.replace(stage, cfg=dataclasses.replace(
            stage.cfg, student_attention_dropout=fv["student-attention-dropout"].value))
      for name in fv.slice:
        for seq in [int(s) for s in fv.seq or [stage.cfg.max_seq_len]]:
          for row in _compile(fv, stage, name, seq, tokenizer_dir):
            row = {"config": label, **row}
            print(report.line(row), flush=True)
            if fv.out:
              with open(fv.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            found.append(row)
  return found


def _compile(fv, stage: step_lib.Stage, name: str, seq: int, tokenizer_dir):
  """The rows of one stage on slice `name` at `seq`: each --batch-per-chip, the config's own
  global batch, the largest batch (--max-batch), or the smallest slice (--smallest)."""
  if fv.smallest:
    generation = chips.chip(name.partition(":")[0])
    row = None
    for shape in generation.slices:
      pod = chips.pod_slice(f"{generation.name}:{shape}")
      if stage.cfg.global_batch_size % (len(pod.devices) * stage.cfg.grad_accum_steps):
        continue
      sized = step_lib.at_batch(stage, stage.cfg.global_batch_size // len(pod.devices), pod, seq)
      row = step_lib.compile_stage(sized, pod, tokenizer_dir, counted=False)
      if row["fits"]:
        row = step_lib.recount(row, sized, pod, tokenizer_dir) if fv["count-loops"].value else row
        break
    return [row | {"smallest": True}] if row else []
  pod = chips.pod_slice(name)
  if fv["max-batch"].value:
    return [step_lib.largest_batch(dataclasses.replace(stage, cfg=dataclasses.replace(
        stage.cfg, max_seq_len=seq)), pod, tokenizer_dir, counted=fv["count-loops"].value)]
  batches = fv["batch-per-chip"].value or [None]
  return [step_lib.compile_stage(step_lib.at_batch(
      stage, int(b) if b else stage.cfg.global_batch_size // len(pod.devices), pod, seq), pod, tokenizer_dir,
      counted=fv["count-loops"].value) for b in batches]


def main(argv: Sequence[str] | None = None) -> list[dict]:
  # libtpu lets one process load it unless told otherwise; compiling never drives a TPU, so
  # several compiles (and a run beside them) may share it. Set before jax starts its backends.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from absl import flags
  from minilm_jax import cli_flags
  usage = ("usage: python -m minilm_jax compile (--config FILE[:VARIANT] | --workload NAME,...) "
           "--slice GEN:SHAPE,... [--batch-per-chip N,...] [--seq T,...] [--max-batch | --smallest] "
           "[--stage assistant|student] [--nocount-loops] [--student-attention-dropout P] [--out ROWS.jsonl] [--markdown TABLE.md]")

  def define(fv):
    flags.DEFINE_list("workload", None, "the benchmark's workloads (gpu mode) to compile instead of "
                      "a --config", flag_values=fv)
    flags.DEFINE_list("slice", None, "TPU slices, e.g. v5e:4x4 (with --smallest: generations, e.g. v5e)",
                      flag_values=fv)
    flags.DEFINE_list("batch-per-chip", None, "sequences per device (default: the config's global "
                      "batch over the slice's devices)", flag_values=fv)
    flags.DEFINE_list("seq", None, "tokens per sequence (default: the config's max_seq_len)",
                      flag_values=fv)
    flags.DEFINE_bool("max-batch", False, "find the largest per-device batch that fits (search on "
                      "compiled memory)", flag_values=fv)
    flags.DEFINE_bool("smallest", False, "the smallest slice of each --slice generation where the "
                      "config's global batch fits", flag_values=fv)
    flags.DEFINE_enum("stage", None, ["assistant", "student"], "only this stage of a config that "
                      "distils through a teacher assistant", flag_values=fv)
    flags.DEFINE_bool("count-loops", True, "count FLOPs and bytes with every loop unrolled (a second "
                      "compile of steps with loops; XLA counts a loop's body once)", flag_values=fv)
    flags.DEFINE_float("student-attention-dropout", None, "override the student's attention dropout",
                       flag_values=fv)
    flags.DEFINE_string("out", None, "append each row (JSON) to this file", flag_values=fv)
    flags.DEFINE_string("markdown", None, "write the table of every row in --out here", flag_values=fv)

  argv = sys.argv[1:] if argv is None else list(argv)
  fv = cli_flags.parse("compile", argv, define, usage, required=("slice",), config=cli_flags.CONFIG_FILE)
  if (fv.config is None) == (fv.workload is None):
    sys.exit(f"error: pass exactly one of --config and --workload\n{usage}")
  if fv["max-batch"].value and fv.smallest:
    sys.exit(f"error: --max-batch and --smallest are two questions: ask one at a time\n{usage}")
  if fv.markdown and not fv.out:
    sys.exit(f"error: --markdown tabulates the rows of --out: pass --out too\n{usage}")
  found = rows(fv)
  if fv.markdown:
    every = [json.loads(x) for x in pathlib.Path(fv.out).read_text().splitlines() if x.strip()]
    pathlib.Path(fv.markdown).write_text(report.table(every))
  return found
