"""The `distill` job: teacher -> fresh student, checkpointed, resumable, exported to HF.

    python -m minilm_jax distill --config experiments/configs/demo.py --workdir runs/demo

`run` is the command: it reads the teacher once, asks `teacher_assistant` for the stages
(one, or the assistant then the student, each in its own folder) and distils each: the
objective (`objective.py`) and the data, the start or the restored state, the loop
(`distill_loop.train`) and the export. A
stage's workdir holds `config.json` (its `DistillConfig`), `checkpoints/` (Orbax, see
`checkpoint.py`: student parameters, optimizer state, step, PRNG key and the data
iterator's per-process state), `metrics.jsonl`, `tensorboard/` and, at the end, `hf/` (the
student as a Hugging Face directory; with `objective="mlm"`, the masked-LM baseline, also
`hf-mlm/`, a `BertForMaskedLM`). Re-running with the same workdir resumes from the latest
checkpoint and continues with exactly the batches and dropout masks an uninterrupted run
would have seen; SIGTERM (pre-emption) or Ctrl-C on any process makes every process save the
same step and exit with that signal's `preemption.EXIT_CODES`. On several processes, process 0 alone
writes the shared files (config.json, model.json, tokenizer/, metrics, hf/), each through a
temporary file and `os.replace`; the others wait at a barrier.
"""

import dataclasses
import functools
import logging
import pathlib

import jax
import tokenizers
from flax import nnx
from jax.experimental import multihost_utils

from minilm_jax import checkpoint, convert, data, distill_loop, heldout, model_card, objective
from minilm_jax import sharding, teacher_assistant, tokenization
from minilm_jax import model as model_lib
from minilm_jax import step as step_lib
from minilm_jax import workdir as workdir_lib
from minilm_jax.config import DistillConfig
from minilm_jax.teachers import resolve_model_dir


@workdir_lib.locked
def run(cfg: DistillConfig, workdir: str | pathlib.Path, *,
        resume_from_step: int | None = None) -> dict:
  """Distils `cfg.teacher` into a fresh student in `workdir`, through an assistant if the
  config asks for one (`teacher_assistant`); returns a summary.

  Everything is checked before anything is written. `resume_from_step` resumes the stage
  that is unfinished when the command starts from that checkpoint instead of the latest
  (later steps move to `discarded-checkpoints/`).
  """
  workdir = pathlib.Path(workdir).absolute()
  teacher = _Teacher.read(cfg.teacher)
  stages = teacher_assistant.stages(cfg, teacher.config, workdir)
  setups = [step_lib.make_setup(s.cfg, s.teacher) for s in stages]  # every config error first
  teacher_assistant.check_layout(workdir, cfg, two_stage=len(stages) > 1)
  for stage, setup in zip(stages, setups):
    if teacher_assistant.finished(stage):
      continue
    summary = _distill(stage, setup, teacher, resume_from_step)
    resume_from_step = None  # the next stage starts now
    if stage.name == teacher_assistant.ASSISTANT:
      if summary["preempted"] or summary["steps"] != stage.cfg.max_steps:
        return summary | {"stage": stage.name}
      if jax.process_count() > 1:  # process 0 exported the assistant: every host waits for it
        multihost_utils.sync_global_devices("teacher assistant exported")
  if stage.name == teacher_assistant.STUDENT:
    return summary | {"stage": stage.name, "assistant": str(stages[0].workdir / "hf")}
  return summary


@dataclasses.dataclass(frozen=True)
class _Teacher:
  """A teacher as read once: its directory (weights, config.json, tokenizer), shape, weights,
  and its tokenizer with the special ids (`tokenization.for_pretraining`), checked to fit."""
  directory: pathlib.Path
  config: model_lib.ModelConfig
  params: nnx.State
  tokenizer: tuple[tokenizers.Tokenizer, tokenization.SpecialIds]

  @classmethod
  def read(cls, name: str) -> "_Teacher":
    directory = resolve_model_dir(name)
    config, params = convert.read_hf(directory)
    return cls(directory, config, params, tokenization.for_pretraining(directory, config.vocab_size))


def _distill(stage: teacher_assistant.Stage, setup: step_lib.Setup, teacher: _Teacher,
             resume_from_step: int | None) -> dict:
  """One stage: checks, then writes the run files, restores or starts, trains and exports."""
  cfg, workdir = stage.cfg, stage.workdir
  if stage.name == teacher_assistant.STUDENT:  # its teacher: the assistant, now exported
    teacher = _Teacher.read(cfg.teacher)
  if teacher.config != stage.teacher:
    raise ValueError(f"{teacher.directory} is not the teacher the {stage.name} stage was set up "
                     f"for ({teacher.config} != {stage.teacher}): use a new --workdir")
  workdir_lib.check_resumable(workdir, old := workdir_lib.read_config(workdir), cfg)
  mesh = sharding.make_mesh()
  sharding.check_batch_size(cfg.global_batch_size, mesh, cfg.grad_accum_steps,
                            str(workdir) if old else None)
  examples, stats = data.pretraining_examples(
      cfg.corpus, teacher.tokenizer, max_seq_len=cfg.max_seq_len, data_dir=cfg.data_dir or None,
      two_segments=cfg.two_segments, doc_per_line=cfg.doc_per_line, doc_per_file=cfg.doc_per_file,
      text_feature=cfg.text_feature)
  train_examples, heldout_examples = data.hold_out(examples, cfg.heldout_documents, cfg.seed)
  corpus = workdir_lib.corpus_record(cfg, examples, heldout_examples)
  workdir_lib.check_corpus(workdir, corpus)
  iterator = data.batch_iterator(train_examples, global_batch_size=cfg.global_batch_size, seed=cfg.seed,
                                 worker_count=cfg.data_workers)
  goal = objective.choose(cfg, setup, teacher.tokenizer)
  schedule, optimizer, step_fn = step_lib.make_step(cfg, setup, mesh, goal)
  replicated = sharding.replicated(mesh)
  teacher_params = (jax.device_put(step_lib.truncate_teacher(setup, teacher.params), replicated)
                    if goal.has_teacher else {})
  evaluation = heldout.Evaluation(goal.loss, mesh, heldout_examples, eval_every=cfg.eval_every,
                                  batch_size=cfg.global_batch_size // cfg.grad_accum_steps,
                                  max_steps=cfg.max_steps)
  export_config = setup.student.replace(dtype="float32", cudnn_dropout=False, remat_feed_forward=False)
  if resume_from_step is not None:
    checkpoint.rewind(workdir / "checkpoints", resume_from_step)
  workdir_lib.write(workdir, cfg, corpus)
  if jax.process_index() == 0:
    checkpoint.write_model_files(workdir / "checkpoints", export_config, teacher.directory)
  multihost_utils.sync_global_devices("minilm_jax distill: run files written")
  mngr = checkpoint.manager(workdir / "checkpoints", max_to_keep=cfg.keep_checkpoints)

  restore = (functools.partial(checkpoint.restore_state, mngr, iterator=iterator)
             if mngr.latest_step() is not None else None)
  state = step_lib.start_state(cfg, setup, optimizer, mesh, goal, teacher.params, restore)
  workdir_lib.record_launch(workdir)  # once the state is restored: a refused resume adds no launch
  logging.info("distilling %s layer %d -> student %s on %d devices; corpus: %s; resuming at step %d",
               teacher.directory, setup.teacher.num_layers, setup.student, mesh.size, stats,
               int(state.step))
  state, (first_loss, last_loss), preempted = distill_loop.train(
      stage, setup, mesh, mngr, iterator, step_fn, schedule, state, teacher_params, evaluation)
  summary = {"workdir": str(workdir), "steps": int(state.step), "first_loss": first_loss,
             "last_loss": last_loss, "preempted": preempted, "corpus": dataclasses.asdict(stats)}
  if evaluation.last is not None:
    summary["last_eval"] = evaluation.last
  if cfg.export_hf and int(state.step) == cfg.max_steps and jax.process_index() == 0:
    card = functools.partial(model_card.for_run, workdir, cfg.max_steps, teacher.directory)
    with checkpoint.kept_on_failure(mngr):
      summary |= objective.export(cfg, workdir, export_config, state.params, teacher.directory, card)
  return summary
