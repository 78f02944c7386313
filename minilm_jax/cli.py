"""`python -m minilm_jax {distill,data,convert,finetune,evaluate,benchmark}`.

Each subcommand is a thin layer over one library function. `distill` takes an
ml_collections config file with absl-style overrides, as the Flax examples do:
`--config experiments/demo.py --config.max_steps=10`; `finetune` overrides the fields of
`FinetuneConfig` the same way (`--task glue/sst2 --model M --config.epochs=3`).
"""

import argparse
import dataclasses
import json
import os
import pathlib
import sys

# `distill` flags that name the cluster for `jax.distributed.initialize`, and their env variables.
CLUSTER_FLAGS = {"coordinator-address": "JAX_COORDINATOR_ADDRESS",
                 "num-processes": "JAX_NUM_PROCESSES", "process-id": "JAX_PROCESS_ID"}


def convert(argv: list[str]) -> None:
  p = argparse.ArgumentParser(prog="python -m minilm_jax convert", description=(
      "Hugging Face directory -> Orbax checkpoint (--from-hf DIR --to CKPT_DIR), or "
      "checkpoint / distill workdir -> Hugging Face directory (--from-checkpoint DIR --to-hf OUT)."))
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--from-hf", metavar="DIR", help="local HF directory or packaged teacher name")
  src.add_argument("--from-checkpoint", metavar="CKPT_DIR", help="checkpoint dir or distill workdir")
  p.add_argument("--to", metavar="CKPT_DIR", help="output checkpoint directory (with --from-hf)")
  p.add_argument("--to-hf", metavar="OUT_DIR", help="output HF directory (with --from-checkpoint)")
  p.add_argument("--step", type=int, help="checkpoint step to export (default: latest)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
  args = p.parse_args(argv)
  from minilm_jax import checkpoint, convert as convert_lib
  from minilm_jax.teachers import resolve_model_dir
  if args.from_hf:
    if not args.to:
      p.error("--from-hf needs --to CKPT_DIR")
    source = resolve_model_dir(args.from_hf)
    convert_lib.check_not_overlapping([source], args.to)
    config, params = convert_lib.load_hf(source)
    out = checkpoint.save_model(args.to, config, params, source, overwrite=args.overwrite)
  else:
    if not args.to_hf:
      p.error("--from-checkpoint needs --to-hf OUT_DIR")
    convert_lib.check_not_overlapping([args.from_checkpoint, checkpoint.resolve(args.from_checkpoint)],
                                      args.to_hf)
    config, params, tokenizer, step = checkpoint.restore_params(args.from_checkpoint, args.step)
    out = convert_lib.save_hf(args.to_hf, config, params, tokenizer, overwrite=args.overwrite)
  print(f"wrote {out}")


def data(argv: list[str]) -> None:
  p = argparse.ArgumentParser(prog="python -m minilm_jax data", description=(
      "Shows packed pre-training examples and corpus statistics (--corpus), or prepares "
      "local text files once as a TFDS array_record dataset (--build-tfds FILES --data-dir DIR)."))
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--corpus", help="'demo', text files/globs (comma-separated), or tfds:NAME[/CONFIG]")
  src.add_argument("--build-tfds", metavar="FILES", help="text files/globs (comma-separated) to prepare")
  p.add_argument("--data-dir", help="TFDS data_dir to read from / write into")
  p.add_argument("--tokenizer", default="all-MiniLM-L6-v2", help="HF directory or packaged teacher name")
  p.add_argument("--max-seq-len", type=int, default=128)
  p.add_argument("--show", type=int, default=3, help="decoded examples to print")
  p.add_argument("--two-segments", action="store_true", help="pack two segments per example")
  p.add_argument("--doc-per-line", action="store_true", help="one document per line (default: blank-line blocks)")
  p.add_argument("--doc-per-file", action="store_true", help="one document per file")
  p.add_argument("--text-feature", default="text", help="the TFDS dataset's text feature")
  p.add_argument("--max-documents", type=int, help="read only the first N documents")
  p.add_argument("--overwrite", action="store_true", help="rebuild an already prepared TFDS dataset")
  args = p.parse_args(argv)
  if args.build_tfds:
    from minilm_jax import corpus_tfds
    if corpus_tfds.is_built(args.data_dir) and not args.overwrite:
      print(f"{corpus_tfds.NAME} is already built in {args.data_dir}: kept the old data; pass "
            "--overwrite to rebuild it from these files")
      return
    out = corpus_tfds.build_text_corpus(args.build_tfds, args.data_dir,
                                        doc_per_line=args.doc_per_line,
                                        doc_per_file=args.doc_per_file, overwrite=args.overwrite)
    print(f"wrote {out}; read it with --corpus tfds:{corpus_tfds.NAME} --data-dir {args.data_dir}")
    return
  from minilm_jax import data as data_lib
  data_lib.show_examples(args.corpus, args.tokenizer, max_seq_len=args.max_seq_len,
                         show=args.show, data_dir=args.data_dir, two_segments=args.two_segments,
                         doc_per_line=args.doc_per_line, doc_per_file=args.doc_per_file,
                         text_feature=args.text_feature, max_documents=args.max_documents)


def benchmark(argv: list[str]) -> None:
  from minilm_jax.benchmark import main as benchmark_main
  benchmark_main.main(argv)


def _flag_error(e: Exception) -> str:
  """A flag error without the config file's traceback that ml_collections pastes into it."""
  text = str(e)
  if "Traceback (most recent call last)" not in text:
    return text
  lines = [line for line in text.splitlines() if line.strip()]
  return f"{lines[0].removesuffix('Error whilst parsing config file:').rstrip()} {lines[-1]}"


def _unknown_override(argv: list[str], config) -> str | None:
  """The first `--config.key` naming no field of `config`, with the closest field (difflib)."""
  import difflib
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    key = arg.removeprefix("--config.").split("=", 1)[0]
    node, path = config, []
    for part in key.split("."):
      names = [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []
      if part not in names:
        close = difflib.get_close_matches(part, names, n=1)
        where = ".".join(["config", *path])
        hint = f"did you mean --{where}.{close[0]}?" if close else f"fields: {', '.join(names)}"
        return f"--config.{key}: {type(node).__name__} has no field {part!r}; {hint}"
      node, path = getattr(node, part), [*path, part]
  return None


def _parse_flags(fv, argv: list[str], usage: str) -> None:
  """Runs the absl parser; a bad flag or misspelt `--config.key` exits with a clear message."""
  from absl import flags
  try:
    fv(argv)
  except flags.Error as e:
    sys.exit(f"error: {_flag_error(e)}\n{usage}")
  except (KeyError, AttributeError) as e:  # ml_collections: an override naming no field
    from ml_collections import config_flags  # the config file's dataclass, without overrides
    bare, plain = type(fv)(), [a for a in argv if not a.startswith("--config.")]
    config_flags.DEFINE_config_file("config", None, "", flag_values=bare, lock_config=False,
                                    sys_argv=plain)
    bare(plain, known_only=True)
    sys.exit(f"error: {_unknown_override(argv, bare.config) or e}\n{usage}")


def _config_flags(argv: list[str], command: str):
  """Parses `--config FILE [--config.key=value ...] --workdir DIR` the way Flax examples do."""
  from absl import flags
  from ml_collections import config_flags
  fv, argv = flags.FlagValues(), [f"minilm_jax {command}", *argv]
  # sys_argv: the overrides are found in the argv given, not in sys.argv (in-process calls).
  config_flags.DEFINE_config_file("config", None, "experiments/*.py config file", flag_values=fv,
                                  lock_config=False, sys_argv=argv)
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
  flags.DEFINE_integer("resume-from-step", None, "resume from this checkpoint step instead of the "
                       "latest (later steps are moved aside, not deleted)", flag_values=fv)
  usage = (f"usage: python -m minilm_jax {command} --config experiments/NAME.py --workdir DIR "
           "[--config.key=value ...] [--resume-from-step N] [--distributed "
           "[--coordinator-address HOST:PORT --num-processes N --process-id I]]")
  _parse_flags(fv, argv, usage)
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
  """`jax.distributed.initialize` arguments: None (one process) or those named (JAX finds the rest)."""
  given = {name.replace("-", "_"): fv[name].value for name in CLUSTER_FLAGS
           if fv[name].value is not None}
  if not given:
    return {} if fv.distributed else None
  if len(given) < len(CLUSTER_FLAGS) and not fv.distributed:
    missing = [f"--{n} ({e})" for n, e in CLUSTER_FLAGS.items() if n.replace("-", "_") not in given]
    sys.exit(f"error: naming the cluster takes --coordinator-address, --num-processes and "
             f"--process-id together; missing {', '.join(missing)}. Pass all three (or set the "
             "environment variables), or add --distributed to let JAX detect the rest on a TPU "
             "VM, SLURM, Open MPI or GKE cluster")
  if given.get("process_id", -1) >= given.get("num_processes", 1 << 30):
    sys.exit(f"error: --process-id {given['process_id']} must be below --num-processes "
             f"{given['num_processes']} (ids are 0 .. {given['num_processes'] - 1})")
  return given


def _init_runtime(cluster: dict | None) -> None:
  import logging
  import jax
  if cluster is not None:
    jax.distributed.initialize(**cluster)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  for noisy in ("absl", "jax._src", "orbax", "grain"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  logging.info("jax %s on %d processes, devices: %s", jax.__version__, jax.process_count(), jax.devices())


def distill(argv: list[str]) -> None:
  fv = _config_flags(argv, "distill")
  _init_runtime(_cluster(fv))
  from minilm_jax import distill as distill_lib, teacher_assistant
  summary = teacher_assistant.run(fv.config, fv.workdir,  # one stage, or assistant then student
                                  resume_from_step=fv["resume-from-step"].value)
  print(json.dumps(summary, indent=2))
  if summary["preempted"]:  # not 0: a scheduler must not read a pre-empted run as finished
    sys.exit(distill_lib.PREEMPTED_EXIT_CODE)


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
  from absl import flags
  from ml_collections import config_flags
  from minilm_jax import finetune as finetune_lib
  from minilm_jax.finetune import tasks
  usage = ("usage: python -m minilm_jax finetune --task glue/<task>|squad2 --model MODEL "
           "--workdir DIR [--data PATH] [--seeds 0,1,2] [--config.key=value ...]")
  fv, argv = flags.FlagValues(), ["minilm_jax finetune", *argv]
  unknown = _unknown_override(argv, finetune_lib.FinetuneConfig())
  if unknown:  # ml_collections fails on it while defining the flag, before parsing
    sys.exit(f"error: {unknown}\n{usage}")
  # sys_argv: the overrides are found in the argv given, not in sys.argv (in-process calls).
  config_flags.DEFINE_config_dataclass("config", finetune_lib.FinetuneConfig(),
                                       "FinetuneConfig fields", flag_values=fv, sys_argv=argv)
  flags.DEFINE_string("task", None, "glue/<task> (sst2, cola, rte, ...) or squad2", flag_values=fv)
  flags.DEFINE_string("model", None, "HF dir, distill workdir or packaged teacher name",
                      flag_values=fv)
  flags.DEFINE_string("workdir", None, "output directory: seed-N/ runs and summary.json",
                      flag_values=fv)
  flags.DEFINE_string("data", None, "GLUE folder or SQuAD dev JSON (default: the shared data)",
                      flag_values=fv)
  flags.DEFINE_list("seeds", None, "comma-separated seeds (default: --config.seed)", flag_values=fv)
  _parse_flags(fv, argv, usage)
  if fv.task is None or fv.model is None or fv.workdir is None:
    sys.exit(f"error: --task, --model and --workdir are required\n{usage}")
  task = tasks.resolve_task(fv.task)
  try:
    seeds = [int(s) for s in fv.seeds] if fv.seeds else [fv.config.seed]
  except ValueError:
    sys.exit(f"error: --seeds {','.join(fv.seeds)} must be integers, e.g. --seeds 0,1,2")
  cfg = dataclasses.replace(fv.config, task=task, model=fv.model,
                            data=fv.data or fv.config.data or _default_data(task))
  _init_runtime(None)
  summary = finetune_lib.run_seeds(cfg, fv.workdir, seeds)
  print(json.dumps({k: summary[k] for k in ("task", "model", "seeds", "scores", "mean", "std",
                                            "wall_time_s")}, indent=2))


def evaluate(argv: list[str]) -> None:
  p = argparse.ArgumentParser(prog="python -m minilm_jax evaluate", description=(
      "Scores a fine-tuned model (the HF directory a finetune run exported, or its run "
      "directory) on a task's dev set with the official metrics; prints JSON."))
  p.add_argument("--model", required=True, help="BertFor* HF directory, or a finetune seed-N dir")
  p.add_argument("--task", help="glue/<task> or squad2 (default: the run's task)")
  p.add_argument("--data", help="GLUE folder or SQuAD dev JSON (default: the shared data)")
  p.add_argument("--max-seq-len", type=int, help="default: the run's max_seq_len")
  p.add_argument("--batch-size", type=int, default=128, help="examples per forward pass")
  args = p.parse_args(argv)
  from minilm_jax.finetune import score, tasks
  model_dir, run_info = score.resolve_model(args.model)
  task = args.task or run_info.get("task")
  if task is None:
    p.error(f"{model_dir} has no {score.RUN_FILE}: pass --task")
  task = tasks.resolve_task(task)
  result = score.score_model(model_dir, task, args.data or _default_data(task),
                             max_seq_len=args.max_seq_len, batch_size=args.batch_size)
  print(json.dumps(result, indent=2))


COMMANDS = {"distill": distill, "data": data, "convert": convert, "benchmark": benchmark,
            "finetune": finetune, "evaluate": evaluate}


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] not in COMMANDS:
    print(f"usage: python -m minilm_jax {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
    sys.exit(2)
  try:
    COMMANDS[argv[0]](argv[1:])
  except (OSError, ValueError, FloatingPointError) as e:
    sys.exit(f"error: {e}")
