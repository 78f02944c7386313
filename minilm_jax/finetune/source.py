"""What the model handed to `finetune` is: a Hugging Face directory or packaged name, or a
distilled student, named by its distill run and step (`model_source`).

A distill workdir holds `config.json` (its `DistillConfig`, with `max_steps`),
`checkpoints/` and, once the last step is trained, `hf/`; a teacher-assistant run holds
`assistant/` and `student/`, each such a workdir. Fine-tuning the latest checkpoint of
a run that stopped early (pre-empted at step 7 of 300, say) would fine-tune an
intermediate student as if it were the result, so an unfinished run is refused unless
asked for (`allow_unfinished`).
"""

import logging
import pathlib

from minilm_jax import checkpoint, teacher_assistant
from minilm_jax import workdir as workdir_lib

EXPORTS = ("hf", "hf-mlm")  # what a finished distill run exports beside checkpoints/


def _student_stage(path: pathlib.Path) -> pathlib.Path:
  """A teacher-assistant run's student stage for its root; any other path as it is."""
  if not (path / teacher_assistant.ASSISTANT).is_dir() or (path / "checkpoints").exists():
    return path
  student = path / teacher_assistant.STUDENT
  if not (student / workdir_lib.CONFIG_FILE).is_file():
    raise ValueError(f"--model {path} is a teacher-assistant distill run that has not started its "
                     "student stage: finish it first (re-run its distill command to resume)")
  return student


def distill_run(path: pathlib.Path) -> pathlib.Path | None:
  """The distill workdir that `path` is, stands for (a teacher-assistant run's root: its
  student stage), exported (`hf/`, `hf-mlm/`) or checkpointed (`checkpoints/`); None if none."""
  path = _student_stage(path)
  if path.name in (*EXPORTS, "checkpoints"):
    path = path.parent
  if (path / "checkpoints" / checkpoint.MODEL_FILE).is_file():
    return path
  return None


def _steps(run: pathlib.Path) -> list[int]:
  """The complete checkpoint steps of a distill run."""
  with checkpoint.manager(run / "checkpoints", async_save=False) as m:
    return sorted(m.all_steps())


def model_source(model: str, allow_unfinished: bool = False) -> tuple[str, dict]:
  """(the model to load, what it is: {"model"} and for a distilled student also {"run",
  "step", "max_steps", "teacher"}), logged; refuses an unfinished distill run unless
  `allow_unfinished`.

  A teacher-assistant run's root stands for its student stage. The step is the one
  loaded: the latest checkpoint's, or `max_steps` for the run's `hf/` export.
  """
  given = pathlib.Path(model).expanduser()
  path = _student_stage(given)
  if path != given:
    model = str(path)
  run = distill_run(path)
  if run is None:
    logging.info("model %s: not a distill run (a Hugging Face directory, packaged name or "
                 "checkpoint)", model)
    return model, {"model": model}
  cfg = workdir_lib.read_config(run)  # a run's config.json: refused if missing or corrupt
  max_steps, steps = cfg["max_steps"], _steps(run)
  step = max_steps if path.name in EXPORTS else (steps[-1] if steps else 0)
  info = {"model": model, "run": str(run), "step": step, "max_steps": max_steps,
          "teacher": cfg["teacher"]}
  if step < max_steps:
    if not allow_unfinished:
      raise ValueError(
          f"--model {model} is the distill run {run} stopped at step {step} of {max_steps} "
          "(pre-empted or interrupted): finish it first (re-run its distill command to resume), "
          f"or pass --allow-unfinished to fine-tune the student of step {step}")
    logging.warning("model %s: the UNFINISHED distill run %s at step %d of %d "
                    "(--allow-unfinished)", model, run, step, max_steps)
  else:
    logging.info("model %s: distill run %s, step %d of %d (finished), teacher %s", model, run,
                 step, max_steps, cfg["teacher"])
  return model, info
