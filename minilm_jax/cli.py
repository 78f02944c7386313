"""`python -m minilm_jax {distill,data,convert,finetune,evaluate,benchmark}`.

Each subcommand is a thin layer over one library function, and every one reads its
flags the same way (`cli_flags.parse`: absl flags, as the Flax examples do). `distill`
takes an ml_collections config file with overrides, `--config experiments/configs/demo.py
--config.max_steps=10`; `finetune` overrides the fields of `FinetuneConfig` the same
way (`--task glue/sst2 --model M --config.epochs=3`).
"""

import dataclasses
import json
import os
import pathlib
import sys

from absl import flags

from minilm_jax.cli_flags import CONFIG_FILE, one_of, parse

# `distill` flags that name the cluster for `jax.distributed.initialize`, and their env variables.
CLUSTER_FLAGS = {"coordinator-address": "JAX_COORDINATOR_ADDRESS",
                 "num-processes": "JAX_NUM_PROCESSES", "process-id": "JAX_PROCESS_ID"}


# ----------------------------------------------------------------------------- commands


def convert(argv: list[str]) -> None:
  """Hugging Face directory -> Orbax checkpoint, or checkpoint / distill workdir -> HF directory."""
  usage = ("usage: python -m minilm_jax convert (--from-hf DIR --to CKPT_DIR | --from-checkpoint "
           "CKPT_DIR --to-hf OUT_DIR [--step N]) [--overwrite]")

  def define(fv):
    flags.DEFINE_string("from-hf", None, "local HF directory or packaged teacher name", flag_values=fv)
    flags.DEFINE_string("from-checkpoint", None, "checkpoint dir or distill workdir", flag_values=fv)
    flags.DEFINE_string("to", None, "output checkpoint directory (with --from-hf)", flag_values=fv)
    flags.DEFINE_string("to-hf", None, "output HF directory (with --from-checkpoint)", flag_values=fv)
    flags.DEFINE_integer("step", None, "checkpoint step to export (default: latest)", flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "replace an existing output directory", flag_values=fv)

  fv = parse("convert", argv, define, usage)
  source = one_of(fv, ("from-hf", "from-checkpoint"), usage)
  from minilm_jax import atomic, checkpoint, convert as convert_lib, model_card
  from minilm_jax.teachers import resolve_model_dir
  if source == "from-hf":
    if fv.to is None:
      sys.exit(f"error: --from-hf needs --to CKPT_DIR\n{usage}")
    model_dir = resolve_model_dir(fv["from-hf"].value)
    atomic.check_not_overlapping([model_dir], fv.to)
    config, params = convert_lib.load_hf(model_dir)
    out = checkpoint.save_model(fv.to, config, params, model_dir, overwrite=fv.overwrite)
  else:
    run, out_dir = fv["from-checkpoint"].value, fv["to-hf"].value
    if out_dir is None:
      sys.exit(f"error: --from-checkpoint needs --to-hf OUT_DIR\n{usage}")
    atomic.check_not_overlapping([run, checkpoint.resolve(run)], out_dir)
    config, params, tokenizer, step = checkpoint.restore_params(run, fv.step)
    out = convert_lib.save_hf(out_dir, config, params, tokenizer, overwrite=fv.overwrite,
                              card=model_card.for_checkpoint(run, step))
  print(f"wrote {out}")


def data(argv: list[str]) -> None:
  """Shows packed pre-training examples and corpus statistics (--corpus), or prepares local
  text files once as a TFDS array_record dataset (--build-tfds FILES --data-dir DIR)."""
  usage = ("usage: python -m minilm_jax data (--corpus CORPUS [--tokenizer T] [--max-seq-len N] "
           "[--show N] ... | --build-tfds FILES --data-dir DIR [--overwrite])")

  def define(fv):
    flags.DEFINE_string("corpus", None, "'demo', text files/globs (comma-separated), or "
                        "tfds:NAME[/CONFIG]", flag_values=fv)
    flags.DEFINE_string("build-tfds", None, "text files/globs (comma-separated) to prepare",
                        flag_values=fv)
    flags.DEFINE_string("data-dir", None, "TFDS data_dir to read from / write into", flag_values=fv)
    flags.DEFINE_string("tokenizer", "all-MiniLM-L6-v2", "HF directory or packaged teacher name",
                        flag_values=fv)
    flags.DEFINE_integer("max-seq-len", 128, "tokens per example", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("show", 3, "decoded examples to print", lower_bound=0, flag_values=fv)
    flags.DEFINE_bool("two-segments", False, "pack two segments per example", flag_values=fv)
    flags.DEFINE_bool("doc-per-line", False, "one document per line (default: blank-line blocks)",
                      flag_values=fv)
    flags.DEFINE_bool("doc-per-file", False, "one document per file", flag_values=fv)
    flags.DEFINE_string("text-feature", "text", "the TFDS dataset's text feature", flag_values=fv)
    flags.DEFINE_integer("max-documents", None, "read only the first N documents", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "rebuild an already prepared TFDS dataset", flag_values=fv)

  fv = parse("data", argv, define, usage)
  source = one_of(fv, ("corpus", "build-tfds"), usage)
  data_dir = fv["data-dir"].value
  if source == "build-tfds":
    from minilm_jax import corpus_tfds
    if corpus_tfds.is_built(data_dir) and not fv.overwrite:
      print(f"{corpus_tfds.NAME} is already built in {data_dir}: kept the old data; pass "
            "--overwrite to rebuild it from these files")
      return
    out = corpus_tfds.build_text_corpus(fv["build-tfds"].value, data_dir,
                                        doc_per_line=fv["doc-per-line"].value,
                                        doc_per_file=fv["doc-per-file"].value, overwrite=fv.overwrite)
    print(f"wrote {out}; read it with --corpus tfds:{corpus_tfds.NAME} --data-dir {data_dir}")
    return
  from minilm_jax import data as data_lib
  data_lib.show_examples(fv.corpus, fv.tokenizer, max_seq_len=fv["max-seq-len"].value,
                         show=fv.show, data_dir=data_dir, two_segments=fv["two-segments"].value,
                         doc_per_line=fv["doc-per-line"].value, doc_per_file=fv["doc-per-file"].value,
                         text_feature=fv["text-feature"].value,
                         max_documents=fv["max-documents"].value)


def benchmark(argv: list[str]) -> None:
  """The JAX step against PyTorch (`minilm_jax.benchmark.main`)."""
  from minilm_jax.benchmark import main as benchmark_main
  benchmark_main.main(argv)


def compile_step(argv: list[str]) -> None:
  """The distillation step compiled for TPU slices: memory, roofline, collectives."""
  from minilm_jax.aot import main as aot_main
  aot_main.main(argv)


def _distill_flags(argv: list[str]) -> flags.FlagValues:
  """`--config FILE [--config.key=value ...] --workdir DIR`, the cluster, `--resume-from-step`."""
  usage = ("usage: python -m minilm_jax distill --config experiments/configs/NAME.py --workdir DIR "
           "[--config.key=value ...] [--resume-from-step N] [--distributed "
           "[--coordinator-address HOST:PORT --num-processes N --process-id I] [--join-timeout S]]")

  def define(fv):
    flags.DEFINE_string("workdir", None, "run directory (re-using it resumes)", flag_values=fv)
    flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize(): one process per "
                      "host, the cluster auto-detected (TPU VM, SLURM, Open MPI, GKE) or named by "
                      "the flags below", flag_values=fv)
    flags.DEFINE_string("coordinator-address", None, "HOST:PORT that process 0 serves the "
                        "coordinator on (env JAX_COORDINATOR_ADDRESS)", flag_values=fv)
    flags.DEFINE_integer("num-processes", None, "processes in the run, one per host (env "
                         "JAX_NUM_PROCESSES)", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("process-id", None, "this process, 0 .. num-processes - 1 (env "
                         "JAX_PROCESS_ID)", lower_bound=0, flag_values=fv)
    flags.DEFINE_integer("join-timeout", 300, "seconds the processes wait for each other to "
                         "start before they fail, naming the missing ones", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("resume-from-step", None, "resume from this checkpoint step instead of "
                         "the latest (later steps are moved aside, not deleted)", flag_values=fv)

  fv = parse("distill", argv, define, usage, config=CONFIG_FILE)
  for name, env in CLUSTER_FLAGS.items():  # the environment fills what the command line left
    if fv[name].value is None and os.environ.get(env):
      try:
        fv[name].parse(os.environ[env])
      except flags.Error as e:
        sys.exit(f"error: environment variable {env}={os.environ[env]!r}: {e}")
  if fv.config is None or fv.workdir is None:
    sys.exit(usage)
  return fv


def _cluster(fv) -> dict | None:
  """`cluster.join` arguments: None (one process) or those named (JAX finds the rest) and the
  join timeout."""
  given = {name.replace("-", "_"): fv[name].value for name in CLUSTER_FLAGS
           if fv[name].value is not None}
  if not given:
    return {"timeout_s": fv["join-timeout"].value} if fv.distributed else None
  if len(given) < len(CLUSTER_FLAGS) and not fv.distributed:
    missing = [f"--{n} ({e})" for n, e in CLUSTER_FLAGS.items() if n.replace("-", "_") not in given]
    sys.exit(f"error: naming the cluster takes --coordinator-address, --num-processes and "
             f"--process-id together; missing {', '.join(missing)}. Pass all three (or set the "
             "environment variables), or add --distributed to let JAX detect the rest on a TPU "
             "VM, SLURM, Open MPI or GKE cluster")
  if given.get("process_id", -1) >= given.get("num_processes", 1 << 30):
    sys.exit(f"error: --process-id {given['process_id']} must be below --num-processes "
             f"{given['num_processes']} (ids are 0 .. {given['num_processes'] - 1})")
  return given | {"timeout_s": fv["join-timeout"].value}


def _init_runtime(cluster: dict | None) -> None:
  import logging
  import jax
  if cluster is not None:
    from minilm_jax import cluster as cluster_lib
    cluster_lib.join(**cluster)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  for noisy in ("absl", "jax._src", "orbax", "grain"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  logging.info("jax %s on %d processes, devices: %s", jax.__version__, jax.process_count(), jax.devices())


def distill(argv: list[str]) -> None:
  fv = _distill_flags(argv)
  _init_runtime(_cluster(fv))
  from minilm_jax import distill as distill_lib, preemption
  summary = distill_lib.run(fv.config, fv.workdir,  # one stage, or assistant then student
                            resume_from_step=fv["resume-from-step"].value)
  print(json.dumps(summary, indent=2))
  if summary["preempted"]:  # not 0: a scheduler must not read a pre-empted run as finished
    sys.exit(preemption.EXIT_CODES[summary["preempted"]])


def _default_data(task: str) -> str:
  """The shared GLUE folder or SQuAD dev file beside the checkout, if it is there."""
  from minilm_jax.finetune import tasks
  repo = pathlib.Path(__file__).resolve().parents[1]
  is_squad = task == tasks.SQUAD
  for root in (repo.parent / "shared" / "data", repo / "shared" / "data"):
    path = root / ("squad2/dev-v2.0.json" if is_squad else "glue")
    if path.exists():
      return str(path)
  wanted = "PATH/dev-v2.0.json" if is_squad else "GLUE_DIR (holding SST-2/, RTE/, ...)"
  raise FileNotFoundError(f"no --data given and no shared/data beside {repo}: pass --data {wanted}")


def finetune(argv: list[str]) -> None:
  """`finetune --task glue/sst2 --model MODEL --workdir DIR [--seeds 0,1] [--config.key=value]`."""
  from minilm_jax import finetune as finetune_lib
  from minilm_jax.finetune import tasks
  usage = ("usage: python -m minilm_jax finetune --task glue/<task>|squad2 --model MODEL "
           "--workdir DIR [--data PATH] [--seeds 0,1,2] [--config.key=value ...] [--overwrite] "
           "[--allow-unfinished]")

  def define(fv):
    flags.DEFINE_string("task", None, "glue/<task> (sst2, cola, rte, ...) or squad2", flag_values=fv)
    flags.DEFINE_string("model", None, "HF dir, distill workdir or packaged teacher name",
                        flag_values=fv)
    flags.DEFINE_string("workdir", None, "output directory: seed-N/ runs and summary.json",
                        flag_values=fv)
    flags.DEFINE_string("data", None, "GLUE folder or SQuAD dev JSON (default: the shared data)",
                        flag_values=fv)
    flags.DEFINE_list("seeds", None, "comma-separated seeds (default: --config.seed)", flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "replace the results a --workdir holds (once the new "
                      "runs finish)", flag_values=fv)
    flags.DEFINE_bool("allow-unfinished", False, "fine-tune the latest checkpoint of a distill run "
                      "that stopped before max_steps", flag_values=fv)

  fv = parse("finetune", argv, define, usage, required=("task", "model", "workdir"),
             config=finetune_lib.FinetuneConfig())
  task = tasks.resolve_task(fv.task)
  try:
    seeds = [int(s) for s in fv.seeds] if fv.seeds else [fv.config.seed]
  except ValueError:
    sys.exit(f"error: --seeds {','.join(fv.seeds)} must be integers, e.g. --seeds 0,1,2")
  cfg = dataclasses.replace(fv.config, task=task, model=fv.model,
                            data=fv.data or fv.config.data or _default_data(task))
  _init_runtime(None)
  summary = finetune_lib.run_seeds(cfg, fv.workdir, seeds, overwrite=fv.overwrite,
                                   allow_unfinished=fv["allow-unfinished"].value)
  print(json.dumps({k: summary[k] for k in ("task", "model", "seeds", "scores", "mean", "std",
                                            "wall_time_s")}, indent=2))


def evaluate(argv: list[str]) -> None:
  """Scores a fine-tuned model (the HF directory a finetune run exported, or its run
  directory) on a task's dev set with the official metrics; prints JSON."""
  usage = ("usage: python -m minilm_jax evaluate --model DIR [--task glue/<task>|squad2] "
           "[--data PATH] [--max-seq-len N] [--batch-size N]")

  def define(fv):
    flags.DEFINE_string("model", None, "BertFor* HF directory, or a finetune seed-N dir", flag_values=fv)
    flags.DEFINE_string("task", None, "glue/<task> or squad2 (default: the run's task)", flag_values=fv)
    flags.DEFINE_string("data", None, "GLUE folder or SQuAD dev JSON (default: the shared data)",
                        flag_values=fv)
    flags.DEFINE_integer("max-seq-len", None, "default: the run's max_seq_len", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_integer("batch-size", 128, "examples per forward pass", lower_bound=1,
                         flag_values=fv)

  fv = parse("evaluate", argv, define, usage, required=("model",))
  from minilm_jax.finetune import score, tasks
  model_dir, run_info = score.resolve_model(fv.model)
  task = fv.task or run_info.get("task")
  if task is None:
    sys.exit(f"error: {model_dir} has no {score.RUN_FILE}: pass --task\n{usage}")
  task = tasks.resolve_task(task)
  result = score.score_model(model_dir, task, fv.data or _default_data(task),
                             max_seq_len=fv["max-seq-len"].value, batch_size=fv["batch-size"].value)
  print(json.dumps(result, indent=2))


COMMANDS = {"distill": distill, "data": data, "convert": convert, "benchmark": benchmark,
            "compile": compile_step, "finetune": finetune, "evaluate": evaluate}


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] not in COMMANDS:
    usage = f"usage: python -m minilm_jax {{{','.join(COMMANDS)}}} ..."
    if argv and not argv[0].startswith("-"):
      import difflib
      close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
      hint = f"did you mean {close[0]}? " if close else ""
      usage = (f"error: unknown command {argv[0]!r}: {hint}the commands are "
               f"{', '.join(COMMANDS)}\n{usage}")
    print(usage, file=sys.stderr)
    sys.exit(2)
  try:
    COMMANDS[argv[0]](argv[1:])
  except (OSError, ValueError, FloatingPointError) as e:
    sys.exit(f"error: {e}")
  except KeyboardInterrupt:  # Ctrl-C outside distill's steps: nothing half-written stays
    from minilm_jax import preemption
    print("interrupted (Ctrl-C): rerun the same command to go on (distill resumes from its last "
          "checkpoint)", file=sys.stderr)
    sys.exit(preemption.INTERRUPTED_EXIT_CODE)
