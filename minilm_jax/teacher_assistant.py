"""Teacher assistant (MiniLM, Wang et al., 2020, Sec. 3.3): teacher -> assistant -> student.

For a teacher of L layers and width d and a student of M layers and width d' with
M <= L/2 and d' <= d/2, MiniLM first distils the teacher into an *assistant* of L layers
and width d', then distils the assistant into the student. `stages` says which
distillations a config runs; `distill.run` sets each up and runs it, each checkpointed, resumable and
exported, in one workdir:

    WORKDIR/assistant/   teacher -> assistant: the distilled teacher depth, the student's
                         width, heads and F; `assistant_steps` steps; hf/ when complete
    WORKDIR/student/     assistant/hf -> the student, everything else as configured

`teacher_assistant="auto"` applies the paper's rule, "on" / "off" force it; "off" is a
single stage in WORKDIR itself. Re-running the command resumes whichever stage is
unfinished; a finished (exported) assistant is final and is not re-run.
"""

import dataclasses
import json
import pathlib

from minilm_jax import model as model_lib
from minilm_jax.config import DistillConfig, student_model

ASSISTANT, STUDENT = "assistant", "student"
# What makes an exported assistant the one a config asks for.
_ASSISTANT_FIELDS = ("teacher", "teacher_layer", "version", "relation_heads", "loss_terms",
                     "internals_loss", "loss_teacher_layers", "student_layers", "student_hidden",
                     "student_heads", "student_intermediate", "max_steps", "corpus", "seed")


@dataclasses.dataclass(frozen=True)
class Stage:
  """One distillation the command runs."""
  name: str                      # "" (a single run), "assistant" or "student"
  cfg: DistillConfig             # a single-stage config
  teacher: model_lib.ModelConfig  # the teacher's whole shape (the student stage's: the assistant's)
  workdir: pathlib.Path


def uses_assistant(cfg: DistillConfig, teacher: model_lib.ModelConfig) -> bool:
  """Whether the run goes through an assistant: "on", "off", or the paper's rule ("auto")."""
  if cfg.objective == "mlm":  # pre-training from scratch: no teacher to assist
    return False
  if cfg.teacher_assistant != "auto":
    return cfg.teacher_assistant == "on"
  return 2 * cfg.student_layers <= teacher.num_layers and 2 * cfg.student_hidden <= teacher.hidden_size


def stage_configs(cfg: DistillConfig, teacher: model_lib.ModelConfig,
                  workdir: pathlib.Path) -> tuple[DistillConfig, DistillConfig]:
  """The assistant stage's and the student stage's configs, both single-stage runs.

  The assistant has the depth of the teacher up to its deepest distilled layer, so a
  custom loss's teacher layers are the same layer numbers in the assistant.
  """
  depth = max(cfg.loss_teacher_layers or (cfg.teacher_layer or teacher.num_layers,))
  assistant = dataclasses.replace(
      cfg, student_layers=depth, max_steps=cfg.assistant_steps or cfg.max_steps, export_hf=True,
      loss_student_layers=cfg.loss_teacher_layers, teacher_assistant="off")
  student = dataclasses.replace(cfg, teacher=str(workdir / ASSISTANT / "hf"), teacher_layer=0,
                                teacher_assistant="off")
  return assistant, student


def stages(cfg: DistillConfig, teacher: model_lib.ModelConfig, workdir: pathlib.Path) -> list[Stage]:
  """What `distill` runs for `cfg` in `workdir`: itself, or the assistant stage then the student
  stage, whose teacher is the assistant as its hf/config.json will hold it (`student_model` of
  a teacher read from config.json: float32, no cuDNN dropout, as every export writes), so that
  every stage can be checked against its teacher before the first starts."""
  if not uses_assistant(cfg, teacher):
    return [Stage("", cfg, teacher, workdir)]
  if cfg.student_init != "random":  # an assistant of the teacher's width is the teacher's own cut
    raise ValueError(f"student_init={cfg.student_init!r} copies teacher layers into a student of the "
                     "teacher's width, where a teacher assistant (for students at most half as wide) "
                     "would be the teacher itself: set teacher_assistant='off', or student_init='random'")
  assistant_cfg, student_cfg = stage_configs(cfg, teacher, workdir)
  return [Stage(ASSISTANT, assistant_cfg, teacher, workdir / ASSISTANT),
          Stage(STUDENT, student_cfg, student_model(assistant_cfg, teacher), workdir / STUDENT)]


def check_layout(workdir: pathlib.Path, cfg: DistillConfig, two_stage: bool) -> None:
  """Refuses a workdir holding the other kind of run (single-stage vs. assistant + student)."""
  if two_stage and (workdir / "checkpoints").is_dir():
    raise ValueError(f"{workdir} holds a single-stage run, but teacher_assistant="
                     f"{cfg.teacher_assistant!r} asks for assistant/ and student/ stages: set "
                     "teacher_assistant='off' to resume it, or use a new --workdir")
  if not two_stage and (workdir / ASSISTANT).is_dir():
    raise ValueError(f"{workdir} holds a teacher-assistant run ({ASSISTANT}/, {STUDENT}/): set "
                     "teacher_assistant='on' to resume it, or use a new --workdir")


def finished(stage: Stage) -> bool:
  """Whether `stage` is an assistant already exported, after checking it was trained as
  `stage.cfg` asks (a finished assistant is final, never re-run)."""
  if stage.name != ASSISTANT or not (stage.workdir / "hf" / "config.json").is_file():
    return False
  old = json.loads((stage.workdir / "config.json").read_text())
  new = json.loads(json.dumps(dataclasses.asdict(stage.cfg)))
  changed = [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in _ASSISTANT_FIELDS if old.get(k) != new[k]]
  if changed:
    raise ValueError(f"{stage.workdir} holds a finished assistant trained otherwise "
                     f"({'; '.join(changed)}): use a new --workdir, or the same settings to "
                     "continue with the student stage")
  return True
