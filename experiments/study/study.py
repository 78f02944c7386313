"""The small-scale MiniLM study: do distilled students beat random init and MLM at equal tokens?

    python -m experiments.study.study --budget cpu                  # the 2-core CPU study, resumable
    python -m experiments.study.study --budget cpu --dry-run        # the plan, and what is done
    python -m experiments.study.study --budget tiny --out /tmp/s    # the whole chain in minutes

What runs, the recipes and the budgets: README.md beside this file. One command runs every
piece, main comparison first, and skips what is finished, so it can run in pieces.
"""

import dataclasses
import logging
import lzma
import pathlib
import shutil
import sys
import time

import numpy as np
from absl import flags

from experiments.study import report
from minilm_jax import checkpoint, cli_flags, convert, distill, documents, finetune, student_init, tokenization
from minilm_jax import model as model_lib
from minilm_jax.config import DistillConfig
from minilm_jax.teachers import resolve_model_dir

ROOT = pathlib.Path(__file__).resolve().parents[2]

SHARED = ROOT.parent / "shared" / "data"
TEACHER = "all-MiniLM-L6-v2"
# The layer-initialised arms: the teacher's layers 2, 4, 6 (and embeddings) as they are
# (`report.LAYER_INIT_ARMS[0]`, not pre-trained), and that student distilled with MiniLMv2 (the
# method below); the teacher's shape, whatever the budget's students.
LAYER_INIT = "2,4,6"
LAYER_INIT_SHAPE = dict(student_layers=3, student_hidden=384, student_heads=12)
METHODS = {"minilm-v1": dict(version="v1"), "minilm-v2": dict(version="v2", relation_heads=48),
           "mlm": dict(objective="mlm"),
           report.LAYER_INIT_ARMS[1]: dict(version="v2", relation_heads=48, student_init=LAYER_INIT,
                                           **LAYER_INIT_SHAPE)}
CURVE_METHODS = ("minilm-v1", "minilm-v2", "mlm")  # fine-tuned along their pre-training too
TASKS = ("sst2", "rte", "cola", "squad2")
# The one fine-tuning recipe, for every model and task (per-task lengths / subsets in Budget.tasks).
FINETUNE = dict(batch_size=32, learning_rate=1e-4, warmup_ratio=0.1, weight_decay=0.01, dropout=0.1,
                group_by_length=True)


@dataclasses.dataclass(frozen=True)
class Budget:
  """How much of everything a budget runs."""
  steps: int                      # pre-training optimizer steps, the same for every method
  batch: int                      # examples per step
  seq_len: int                    # tokens per example
  learning_rate: float            # peak pre-training lr (linear warmup, then linear decay to 0)
  warmup: int                     # warmup steps
  curve_points: int               # checkpoints fine-tuned along each run (the last is the final model)
  seeds: tuple[int, ...]          # fine-tuning seeds of the final models
  tasks: dict                     # task -> FinetuneConfig overrides (lengths, subsets, epochs)
  curve_tasks: tuple[str, ...] = TASKS  # the tasks the curve checkpoints are fine-tuned on
  student: tuple[int, int, int] = (3, 384, 12)  # layers, hidden, heads
  max_documents: int = 0          # 0 = the whole corpus
  teacher_reference: bool = True  # fine-tune the 6-layer teacher too (1 seed)
  layer_init_seeds: tuple[int, ...] = (0, 1, 2)  # the layer-initialised arms and the truncated teacher
  heldout_documents: int = 8      # kept out of the layer-initialised student's pre-training, evaluated

  @property
  def tokens(self) -> int:
    """Token positions per pre-training run (padding of document tails included)."""
    return self.steps * self.batch * self.seq_len


# About 14 minutes per model and seed on the 2 cores (batches grouped by length; SST-2 and CoLA
# rows average 13 and 11 tokens; measured for minilm-v1, seed 0: SST-2 2.7, RTE 4.0, CoLA 2.9,
# SQuAD 4.7 min), beside 3 pre-trainings of 31-42 min (2,233 / 1,624 / ~1,985 tokens/s).
CPU_TASKS = {
    "sst2": dict(max_seq_len=64, max_train_examples=8000, epochs=2),   # 8,000 of 67,349 rows
    "rte": dict(max_seq_len=128, epochs=2),                            # all 2,490 rows
    "cola": dict(max_seq_len=64, epochs=2),                            # all 8,551 rows
    "squad2": dict(max_seq_len=256, doc_stride=128, max_train_examples=1024,
                   max_eval_examples=500, epochs=2),   # 1,024 of 8,017 train, 500 of 3,856 held-out questions
}
BUDGETS = {
    # 2-core CPU: 1,000 x 32 x 128 = 4.1 M tokens per pre-training. Within the 4 hours the study may
    # take there (about 107 min of pre-training, 5 final models + the teacher x 4 tasks, 6 curve
    # points on the two cheap tasks: about 3.6 h), one fine-tuning seed fits, not two (+65 min).
    "cpu": Budget(steps=1000, batch=32, seq_len=128, learning_rate=5e-4, warmup=100, curve_points=3,
                  seeds=(0,), tasks=CPU_TASKS, curve_tasks=("sst2", "cola")),
    # One H200: 3 runs of 2,000 x 256 x 128 = 65.5 M tokens (about 9.5 passes over the corpus).
    "gpu": Budget(steps=2000, batch=256, seq_len=128, learning_rate=6e-4, warmup=200, curve_points=4,
                  seeds=(0, 1, 2), tasks=CPU_TASKS),
    # The whole chain on a toy setting, for trying the runner (minutes on 2 cores).
    "tiny": Budget(steps=6, batch=8, seq_len=32, learning_rate=1e-3, warmup=2, curve_points=2,
                   seeds=(0,), student=(1, 96, 12), max_documents=20, teacher_reference=False,
                   layer_init_seeds=(0,), heldout_documents=2,
                   tasks={"sst2": dict(max_seq_len=32, max_train_examples=64, max_eval_examples=64, epochs=1),
                          "rte": dict(max_seq_len=64, max_train_examples=64, max_eval_examples=32, epochs=1),
                          "cola": dict(max_seq_len=32, max_train_examples=64, max_eval_examples=64, epochs=1),
                          "squad2": dict(max_seq_len=128, doc_stride=64, max_train_examples=64,
                                         max_eval_examples=32, epochs=1)}),
}


@dataclasses.dataclass(frozen=True)
class Paths:
  """Where a study's inputs are read, its runs written and their results recorded."""
  out: pathlib.Path        # every run of the study
  record: pathlib.Path     # the finished runs' results, kept beside the tables (`record`)
  teacher: str             # packaged name or HF directory
  corpus: str              # the pre-training corpus (a directory of text files)
  glue: pathlib.Path       # glue_data root (SST-2/, RTE/, CoLA/)
  squad: pathlib.Path      # SQuAD 2.0 dev-v2.0.json

  @classmethod
  def make(cls, out: pathlib.Path, record: pathlib.Path, inputs: pathlib.Path | None):
    if inputs is None:
      return cls(out, record, TEACHER, str(SHARED / "corpus"), SHARED / "glue",
                 SHARED / "squad2" / "dev-v2.0.json")
    return cls(out, record, str(inputs / "teacher"), str(inputs / "corpus"), inputs / "glue",
               inputs / "squad2" / "dev-v2.0.json")


def record(paths: Paths) -> None:
  """Copies the results of the finished runs from `paths.out` into `paths.record`, under the
  same relative paths: each fine-tuning seed's summary.json and each finished pre-training's
  metrics.jsonl (kilobytes). The record is what the report reads and what marks a fine-tuning
  run done, so a study goes on from it on a machine whose run folder is gone (a new checkout);
  the pre-trained models stay in the run folder, so `plan` runs what needs them first. A
  recorded result is never replaced."""
  finished = [*paths.out.glob("*/*/*/seed-*/summary.json"),
              *(p.parent.parent / "metrics.jsonl" for p in paths.out.glob("pretrain/*/hf/config.json"))]
  for src in finished:
    dst = paths.record / src.relative_to(paths.out)
    if not dst.is_file():
      dst.parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(src, dst)


# ------------------------------------------------------------------------- pre-training


def distill_config(budget: Budget, paths: Paths, method: str) -> DistillConfig:
  """One recipe for every method; the layer-initialised student also holds out documents and
  evaluates the loss on them (its held-out curve)."""
  layers, hidden, heads = budget.student
  every = budget.steps // budget.curve_points
  fields = dict(
      teacher=paths.teacher, student_layers=layers, student_hidden=hidden, student_heads=heads,
      corpus=paths.corpus, doc_per_file=True, max_seq_len=budget.seq_len,
      global_batch_size=budget.batch, max_steps=budget.steps, learning_rate=budget.learning_rate,
      warmup_steps=budget.warmup, log_every=max(1, min(10, budget.steps // 20)),
      checkpoint_every=every, keep_checkpoints=budget.curve_points + 3, teacher_assistant="off")
  if method == report.LAYER_INIT_ARMS[1]:
    fields |= dict(heldout_documents=budget.heldout_documents, eval_every=max(1, budget.steps // 10))
  return DistillConfig(**fields | METHODS[method])


def curve_steps(budget: Budget) -> list[int]:
  every = budget.steps // budget.curve_points
  return [every * (i + 1) for i in range(budget.curve_points - 1)] + [budget.steps]


def pretrain(budget: Budget, paths: Paths, method: str) -> None:
  workdir = paths.out / "pretrain" / method
  if (workdir / "hf" / "config.json").is_file():
    return
  cfg = distill_config(budget, paths, method)
  if budget.max_documents:  # the tiny budget: a slice of the corpus, read through a file list
    cfg.corpus = ",".join(str(p) for p in documents.expand_paths(paths.corpus)[-budget.max_documents:])
  summary = distill.run(cfg, workdir)
  if summary.get("preempted"):
    raise SystemExit(f"{method}: pre-empted at step {summary['steps']}; re-run to resume")


def export_curve(budget: Budget, paths: Paths, method: str) -> None:
  """Each curve checkpoint as an HF encoder directory, `models/<method>-step<N>`."""
  workdir = paths.out / "pretrain" / method
  for step in curve_steps(budget)[:-1]:
    out = paths.out / "models" / f"{method}-step{step}"
    if (out / "config.json").is_file():
      continue
    config, params, tokenizer, _ = checkpoint.restore_params(workdir, step)  # MLM: the encoder
    convert.save_hf(out, config, checkpoint.to_host(params), tokenizer, overwrite=True)


def export_layer_init(paths: Paths) -> None:
  """The teacher's layers `LAYER_INIT` and embeddings as an HF encoder, not pre-trained: the
  layer-initialised student at step 0 (`student_init.from_teacher`), `models/<label>`."""
  out = paths.out / "models" / report.LAYER_INIT_ARMS[0]
  if (out / "config.json").is_file():
    return
  teacher_dir = resolve_model_dir(paths.teacher)
  teacher, params = convert.load_hf(teacher_dir)
  config = teacher.replace(num_layers=LAYER_INIT_SHAPE["student_layers"])
  layers = student_init.teacher_layers(LAYER_INIT, teacher, config)
  student = student_init.from_teacher(model_lib.init_params(config), params, layers)
  convert.save_hf(out, config, checkpoint.to_host(student), teacher_dir, overwrite=True)


# ------------------------------------------------------------------------- fine-tuning


def model_args(budget: Budget, paths: Paths, label: str) -> dict:
  """FinetuneConfig fields that pick the encoder a model label names."""
  layers = budget.student[0]
  if label == "teacher-L6":
    return dict(model=paths.teacher)
  if label == f"truncated-L{layers}":
    return dict(model=paths.teacher, num_layers=layers)
  if label == f"random-L{layers}":
    return dict(model=paths.teacher, num_layers=layers, random_init=True)
  if label == report.LAYER_INIT_ARMS[0]:
    return dict(model=str(paths.out / "models" / label))
  method, _, step = label.partition("@step")
  workdir = paths.out / "pretrain" / method
  return dict(model=str(paths.out / "models" / f"{method}-step{step}" if step else workdir / "hf"))


def finetune_run(label: str, task: str, seed: int) -> pathlib.PurePath:
  """A fine-tuning run's folder, relative to `Paths.out` (and to `Paths.record`)."""
  kind = "curve" if "@step" in label else "finetune"
  return pathlib.PurePath(kind, label, task, f"seed-{seed}")


def finetuned(paths: Paths, label: str, task: str, seed: int) -> bool:
  return (paths.record / finetune_run(label, task, seed) / "summary.json").is_file()


def run_finetune(budget: Budget, paths: Paths, label: str, task: str, seed: int) -> None:
  workdir = paths.out / finetune_run(label, task, seed)
  data = paths.squad if task == "squad2" else paths.glue
  cfg = finetune.FinetuneConfig(task=task, data=str(data), **FINETUNE, **budget.tasks[task],
                                **model_args(budget, paths, label))
  shutil.rmtree(workdir, ignore_errors=True)  # an interrupted seed starts over
  finetune.run_seeds(cfg, workdir, [seed])


# ------------------------------------------------------------------------- the plan


PARTS = ("all", "layer-init")


def plan(budget: Budget, paths: Paths, stages: set[str], part: str = "all") -> list[tuple[str, callable, callable]]:
  """(name, done?, run) in the order that gives the headline comparison first; `part`
  "layer-init" plans the layer-initialised arms alone, with every seed of the truncated teacher.

  A fine-tuning run is done once recorded (`record`); a pre-training or an export is done once
  its model is in the run folder, or once every fine-tuning run that reads it is recorded."""
  layers = budget.student[0]
  baselines = [f"random-L{layers}", f"truncated-L{layers}"]
  jobs, runs = [], []  # runs: (label, task, seed) of every planned fine-tuning run

  def done_once(made, match):
    """Done once `made()`, or once the fine-tuning runs whose labels `match` (the runs that read
    what the job makes) are planned and all recorded."""
    read = lambda: (mine := [r for r in runs if match(r[0])]) != [] and all(finetuned(paths, *r) for r in mine)
    return lambda: made() or read()

  def pre(method):
    if "distill" in stages:
      done = done_once((paths.out / "pretrain" / method / "hf" / "config.json").is_file,
                       lambda label: label.partition("@step")[0] == method)
      jobs.append((f"pretrain {method}", done, lambda: pretrain(budget, paths, method)))

  def ft(label, seeds, tasks=TASKS):
    if "finetune" not in stages:
      return
    for seed in seeds:
      for task in tasks:
        runs.append((label, task, seed))
        jobs.append((f"finetune {label} {task} seed {seed}", lambda r=runs[-1]: finetuned(paths, *r),
                     lambda r=runs[-1]: run_finetune(budget, paths, *r)))

  first = budget.seeds[:1]
  if part == "all":
    pre("minilm-v1")
    ft("minilm-v1", first)
    for label in baselines:
      ft(label, first)
    pre("minilm-v2")
    ft("minilm-v2", first)
    pre("mlm")
    ft("mlm", first)
    for label in ["minilm-v1", "minilm-v2", "mlm"] + baselines:
      ft(label, budget.seeds[1:])
    for method in CURVE_METHODS:
      if "finetune" in stages:
        done = done_once(lambda m=method: all((paths.out / "models" / f"{m}-step{s}" / "config.json").is_file()
                                              for s in curve_steps(budget)[:-1]),
                         lambda label, m=method: label.startswith(f"{m}@step"))
        jobs.append((f"export {method} curve checkpoints", done, lambda m=method: export_curve(budget, paths, m)))
      for step in curve_steps(budget)[:-1]:
        ft(f"{method}@step{step}", first, budget.curve_tasks)
    if budget.teacher_reference:
      ft("teacher-L6", first)
  untrained, distilled = report.LAYER_INIT_ARMS
  pre(distilled)
  ft(distilled, budget.layer_init_seeds)  # every seed while its pre-trained model is in the run folder
  if "finetune" in stages:
    done = done_once((paths.out / "models" / untrained / "config.json").is_file, lambda l: l == untrained)
    jobs.append((f"export {untrained}", done, lambda: export_layer_init(paths)))
  truncated = [s for s in budget.layer_init_seeds if part != "all" or s not in budget.seeds]
  for seed in budget.layer_init_seeds:  # seed by seed: a run cut short still compares the others
    ft(untrained, [seed])
    ft(f"truncated-L{layers}", [seed] if seed in truncated else [])
  return jobs


def prepare_inputs(budget: Budget, inputs: pathlib.Path) -> None:
  """Copies what the `gpu` budget reads into `inputs`: bf16 teacher, xz corpus, task data
  (the train rows fine-tuning reads), under the device host's 64 MiB of carried files."""
  teacher_dir = resolve_model_dir(TEACHER)
  (inputs / "teacher").mkdir(parents=True, exist_ok=True)
  tensors, _ = convert.read_hf_tensors(teacher_dir)
  import ml_dtypes
  import safetensors.numpy
  safetensors.numpy.save_file({k: v.astype(ml_dtypes.bfloat16) if v.dtype == np.float32 else v
                               for k, v in tensors.items()}, inputs / "teacher" / "model.safetensors",
                              metadata={"format": "pt"})
  for name in ("config.json",) + tokenization.TOKENIZER_FILES:
    if (teacher_dir / name).is_file():
      shutil.copy2(teacher_dir / name, inputs / "teacher" / name)
  for src in sorted((SHARED / "corpus").rglob("*.txt")):
    dst = inputs / "corpus" / src.relative_to(SHARED / "corpus")
    dst = dst.with_name(dst.name + ".xz")
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.is_file():
      tmp = dst.with_name(dst.name + ".tmp")
      tmp.write_bytes(lzma.compress(src.read_bytes()))
      tmp.replace(dst)
  for task, folder in (("sst2", "SST-2"), ("rte", "RTE"), ("cola", "CoLA")):
    (inputs / "glue" / folder).mkdir(parents=True, exist_ok=True)
    shutil.copy2(SHARED / "glue" / folder / "dev.tsv", inputs / "glue" / folder / "dev.tsv")
    rows = (SHARED / "glue" / folder / "train.tsv").read_text().splitlines(keepends=True)
    keep = budget.tasks[task].get("max_train_examples") or len(rows)
    header = folder != "CoLA"  # CoLA's TSV has no header row
    (inputs / "glue" / folder / "train.tsv").write_text("".join(rows[:keep + header]))
  (inputs / "squad2").mkdir(exist_ok=True)
  shutil.copy2(SHARED / "squad2" / "dev-v2.0.json", inputs / "squad2" / "dev-v2.0.json")
  size = sum(p.stat().st_size for p in inputs.rglob("*") if p.is_file())
  print(f"{inputs}: {size / 2**20:.1f} MiB")


USAGE = "usage: python -m experiments.study.study [--budget cpu] [--out DIR] [--dry-run] ..."


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_enum("budget", "cpu", sorted(BUDGETS), "the study's size", flag_values=fv)
  flags.DEFINE_string("out", None, "runs folder (default runs/study/<budget>)", flag_values=fv)
  flags.DEFINE_string("results", str(ROOT / "experiments" / "results"), "where the table and plots go",
                      flag_values=fv)
  flags.DEFINE_string("inputs", None, "a folder --prepare filled (the gpu budget)", flag_values=fv)
  flags.DEFINE_string("prepare", None, "fill this folder with the inputs, then stop", flag_values=fv)
  flags.DEFINE_string("stages", "distill,finetune,report",
                      "comma-separated subset of distill, finetune, report", flag_values=fv)
  flags.DEFINE_enum("part", "all", PARTS, "all: the whole study; layer-init: the layer-initialised "
                    "arms and the truncated teacher alone, reported in study-<budget>-layer-init.md",
                    flag_values=fv)
  flags.DEFINE_boolean("dry-run", False, "print the plan and what is done", flag_values=fv)
  flags.DEFINE_string("note", "", "text for the table's notes (e.g. other load on the machine)",
                      flag_values=fv)
  flags.DEFINE_float("deadline-minutes", 0, "start no job after this many minutes, and refresh the "
                     "report after each job (a run its host cuts off keeps one); 0 = no limit",
                     flag_values=fv)


def main(argv=None) -> None:
  args = cli_flags.parse("study", sys.argv[1:] if argv is None else argv, define_flags, USAGE)
  dry_run, deadline_minutes = args["dry-run"].value, args["deadline-minutes"].value
  results = pathlib.Path(args.results)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)  # orbax set one
  budget = BUDGETS[args.budget]
  out = pathlib.Path(args.out or ROOT / "runs" / "study" / args.budget).absolute()
  paths = Paths.make(out, results / f"study-{args.budget}-record",
                     pathlib.Path(args.inputs).absolute() if args.inputs else None)
  if args.prepare:
    return prepare_inputs(budget, pathlib.Path(args.prepare))
  stages = set(args.stages.split(","))
  if bad := stages - {"distill", "finetune", "report"}:
    raise SystemExit(f"unknown stages {sorted(bad)}: use distill, finetune, report")
  jobs = plan(budget, paths, stages, args.part)
  write = report.write if args.part == "all" else report.write_layer_init
  print(f"study {args.budget}: {budget.tokens / 1e6:.2f} M tokens per pre-training run "
        f"({budget.steps} steps x {budget.batch} x {budget.seq_len}); runs in {out}")
  started, failed = time.perf_counter(), []
  record(paths)
  for i, (name, done, run) in enumerate(jobs):
    if deadline_minutes and time.perf_counter() - started > 60 * deadline_minutes:
      print(f"deadline of {deadline_minutes} min reached: the rest waits for the next run")
      break
    if done():
      print(f"[{i + 1}/{len(jobs)}] done   {name}", flush=True)
      continue
    print(f"[{i + 1}/{len(jobs)}] {'todo  ' if dry_run else 'start '} {name}", flush=True)
    if not dry_run:
      began = time.perf_counter()
      try:
        run()
      except Exception as e:  # one broken run (a NaN, a missing input) must not stop the others
        logging.exception("%s failed", name)
        failed.append(f"{name}: {type(e).__name__}: {e}")
        continue
      record(paths)
      print(f"[{i + 1}/{len(jobs)}] finished {name} in {(time.perf_counter() - began) / 60:.1f} min",
            flush=True)
      if deadline_minutes and "report" in stages:  # a run cut off by its host keeps a report
        write(args.budget, budget, paths, results, sys.modules[__name__], args.note)
  if "report" in stages and not dry_run:
    write(args.budget, budget, paths, results, sys.modules[__name__], args.note)
  if failed:
    raise SystemExit("failed runs (fix and re-run; finished runs are skipped):\n  " + "\n  ".join(failed))


if __name__ == "__main__":
  main()
