"""Teacher assistant (MiniLM, Wang et al., 2020, Sec. 3.3): teacher -> assistant -> student.

For a teacher of L layers and width d and a student of M layers and width d' with
M <= L/2 and d' <= d/2, MiniLM first distils the teacher into an *assistant* of L layers
and width d', then distils the assistant into the student. `run` does both in one
workdir, each stage an ordinary `distill.run` (checkpointed, resumable, exported):

    WORKDIR/assistant/   teacher -> assistant: the distilled teacher depth, the student's
                         width, heads and F; `assistant_steps` steps; hf/ when complete
    WORKDIR/student/     assistant/hf -> the student, everything else as configured

`teacher_assistant="auto"` applies the paper's rule, "on" / "off" force it; "off" is a
single `distill.run` in WORKDIR itself. Re-running the command resumes whichever stage
is unfinished; a finished (exported) assistant is final and is not re-run. A pre-empted
stage ends the command before the next stage starts.
"""

import dataclasses
import json
import pathlib

import jax
from jax.experimental import multihost_utils

from minilm_jax import convert, distill, train
from minilm_jax import model as model_lib
from minilm_jax.teachers import resolve_model_dir

ASSISTANT, STUDENT = "assistant", "student"
# What makes an exported assistant the one a config asks for.
_ASSISTANT_FIELDS = ("teacher", "teacher_layer", "version", "num_relation_heads", "loss_terms",
                     "internals_loss", "loss_teacher_layers", "student_layers", "student_hidden",
                     "student_heads", "student_intermediate", "max_steps", "corpus", "seed")


def uses_assistant(cfg: train.DistillConfig, teacher: model_lib.ModelConfig) -> bool:
  """Whether the run goes through an assistant: "on", "off", or the paper's rule ("auto")."""
  if cfg.objective == "mlm":  # pre-training from scratch: no teacher to assist
    return False
  if cfg.teacher_assistant != "auto":
    return cfg.teacher_assistant == "on"
  return 2 * cfg.student_layers <= teacher.num_layers and 2 * cfg.student_hidden <= teacher.hidden_size


def stage_configs(cfg: train.DistillConfig, teacher: model_lib.ModelConfig,
                  workdir: pathlib.Path) -> tuple[train.DistillConfig, train.DistillConfig]:
  """The assistant stage's and the student stage's configs, both single-stage runs.

  The assistant has the depth of the teacher up to its deepest distilled layer, so a
  custom loss's teacher layers are the same layer numbers in the assistant.
  """
  depth = train.make_setup(cfg, teacher).teacher.num_layers
  assistant = dataclasses.replace(
      cfg, student_layers=depth, max_steps=cfg.assistant_steps or cfg.max_steps, export_hf=True,
      loss_student_layers=cfg.loss_teacher_layers, teacher_assistant="off")
  student = dataclasses.replace(cfg, teacher=str(workdir / ASSISTANT / "hf"), teacher_layer=0,
                                teacher_assistant="off")
  return assistant, student


def _check_assistant(directory: pathlib.Path, cfg: train.DistillConfig) -> None:
  """Refuses a finished assistant trained with settings other than `cfg`'s."""
  old = json.loads((directory / "config.json").read_text())
  new = json.loads(json.dumps(dataclasses.asdict(cfg)))
  changed = [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in _ASSISTANT_FIELDS if old.get(k) != new[k]]
  if changed:
    raise ValueError(f"{directory} holds a finished assistant trained otherwise "
                     f"({'; '.join(changed)}): use a new --workdir, or the same settings to "
                     "continue with the student stage")


def run(cfg: train.DistillConfig, workdir: str | pathlib.Path, *,
        resume_from_step: int | None = None) -> dict:
  """The `distill` command: one run, or the assistant then the student stage; a summary.

  `resume_from_step` applies to the stage that is unfinished when the command starts.
  """
  workdir = pathlib.Path(workdir).absolute()
  teacher, _ = convert.read_hf_config(resolve_model_dir(cfg.teacher))
  train.make_setup(cfg, teacher)  # every config error before any stage starts
  two_stage = uses_assistant(cfg, teacher)
  if two_stage and (workdir / "checkpoints").is_dir():
    raise ValueError(f"{workdir} holds a single-stage run, but teacher_assistant="
                     f"{cfg.teacher_assistant!r} asks for assistant/ and student/ stages: set "
                     "teacher_assistant='off' to resume it, or use a new --workdir")
  if not two_stage and (workdir / ASSISTANT).is_dir():
    raise ValueError(f"{workdir} holds a teacher-assistant run ({ASSISTANT}/, {STUDENT}/): set "
                     "teacher_assistant='on' to resume it, or use a new --workdir")
  if not two_stage:
    return distill.run(cfg, workdir, resume_from_step=resume_from_step)
  assistant_cfg, student_cfg = stage_configs(cfg, teacher, workdir)
  exported = workdir / ASSISTANT / "hf" / "config.json"
  if exported.is_file():
    _check_assistant(workdir / ASSISTANT, assistant_cfg)
  else:
    summary = distill.run(assistant_cfg, workdir / ASSISTANT, resume_from_step=resume_from_step)
    resume_from_step = None  # the student stage starts now
    if summary["preempted"] or summary["steps"] != assistant_cfg.max_steps:
      return summary | {"stage": ASSISTANT}
    if jax.process_count() > 1:  # process 0 exported the assistant: every host waits for it
      multihost_utils.sync_global_devices("teacher assistant exported")
  summary = distill.run(student_cfg, workdir / STUDENT, resume_from_step=resume_from_step)
  return summary | {"stage": STUDENT, "assistant": str(exported.parent)}
