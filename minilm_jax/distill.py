"""The `distill` job: teacher -> fresh student, checkpointed, resumable, exported to HF.

    python -m minilm_jax distill --config experiments/configs/demo.py --workdir runs/demo

`run` is the command: it reads the teacher once, asks `teacher_assistant` for the stages
(one, or the assistant then the student, each in its own folder) and distils each. A
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

import collections
import dataclasses
import json
import logging
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tqdm
from flax import nnx
from jax.experimental import multihost_utils

from minilm_jax import atomic, checkpoint, convert, data, mlm, preemption, sharding, teacher_assistant
from minilm_jax import model as model_lib
from minilm_jax import step as step_lib
from minilm_jax import workdir as workdir_lib
from minilm_jax.config import DistillConfig
from minilm_jax.metric_writer import MetricWriter, read_metrics
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
    if stage.name == teacher_assistant.STUDENT:  # its teacher: the assistant, now exported
      teacher = _Teacher.read(stage.cfg.teacher)
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
  """A teacher as read once: its directory (weights, config.json, tokenizer), shape, weights."""
  directory: pathlib.Path
  config: model_lib.ModelConfig
  params: nnx.State

  @classmethod
  def read(cls, name: str) -> "_Teacher":
    directory = resolve_model_dir(name)
    config, params = convert.load_hf(directory)
    _check_finite_teacher(directory, params)
    return cls(directory, config, params)


def objective(cfg: DistillConfig, setup: step_lib.Setup, tokenizer_dir) -> step_lib.Objective:
  """What the step minimises: MiniLM's distillation, or (`objective="mlm"`) BERT's masked LM
  from scratch, the baseline, which has no teacher and reads the tokenizer for its masks."""
  if cfg.objective == "mlm":
    return step_lib.Objective(mlm.init_params, mlm.make_loss(setup.student, tokenizer_dir),
                              has_teacher=False)
  return step_lib.distillation(setup)


def _distill(stage: teacher_assistant.Stage, setup: step_lib.Setup, teacher: _Teacher,
             resume_from_step: int | None) -> dict:
  """One stage: checks, then writes the run files, restores or starts, trains and exports."""
  cfg, workdir = stage.cfg, stage.workdir
  if teacher.config != stage.teacher:
    raise ValueError(f"{teacher.directory} is not the teacher the {stage.name} stage was set up "
                     f"for ({teacher.config} != {stage.teacher}): use a new --workdir")
  workdir_lib.check_resumable(workdir, workdir_lib.read_config(workdir), cfg)
  mesh = sharding.make_mesh()
  sharding.check_batch_size(cfg.global_batch_size, mesh, cfg.grad_accum_steps)
  examples, stats = data.pretraining_examples(
      cfg.corpus, teacher.directory, max_seq_len=cfg.max_seq_len, data_dir=cfg.data_dir or None,
      two_segments=cfg.two_segments, doc_per_line=cfg.doc_per_line, doc_per_file=cfg.doc_per_file,
      text_feature=cfg.text_feature)
  corpus = workdir_lib.corpus_record(cfg, examples)
  workdir_lib.check_corpus(workdir, corpus)
  iterator = data.batch_iterator(examples, global_batch_size=cfg.global_batch_size, seed=cfg.seed,
                                 worker_count=cfg.data_workers)
  goal = objective(cfg, setup, teacher.directory)
  schedule, optimizer, step_fn = step_lib.make_step(cfg, setup, mesh, goal)
  export_config = setup.student.replace(dtype="float32", cudnn_dropout=False)
  if resume_from_step is not None:
    checkpoint.rewind(workdir / "checkpoints", resume_from_step)
  workdir_lib.write(workdir, cfg, corpus)
  if jax.process_index() == 0:
    checkpoint.write_model_files(workdir / "checkpoints", export_config, teacher.directory)
  multihost_utils.sync_global_devices("minilm_jax distill: run files written")
  mngr = checkpoint.manager(workdir / "checkpoints", max_to_keep=cfg.keep_checkpoints)

  replicated = sharding.replicated(mesh)
  if mngr.latest_step() is not None:
    abstract = step_lib.abstract_inputs(cfg, setup, optimizer, mesh, goal)[0]
    state = checkpoint.restore_state(mngr, abstract, iterator)
    _truncate_metrics(workdir, int(state.step))
  else:
    state = jax.device_put(step_lib.init_state(cfg, setup, optimizer, goal), replicated)
  teacher_params = (jax.device_put(step_lib.truncate_teacher(setup, teacher.params), replicated)
                    if goal.has_teacher else {})
  logging.info("distilling %s layer %d -> student %s on %d devices; corpus: %s; resuming at step %d",
               teacher.directory, setup.teacher.num_layers, setup.student, mesh.size, stats,
               int(state.step))
  state, (first_loss, last_loss), preempted = _train(
      stage, setup, mesh, mngr, iterator, step_fn, schedule, state, teacher_params)
  summary = {"workdir": str(workdir), "steps": int(state.step), "first_loss": first_loss,
             "last_loss": last_loss, "preempted": preempted, "corpus": dataclasses.asdict(stats)}
  if cfg.export_hf and int(state.step) == cfg.max_steps and jax.process_index() == 0:
    with checkpoint.kept_on_failure(mngr):
      summary |= _export(cfg, workdir, export_config, state.params, teacher.directory)
  return summary


def _train(stage: teacher_assistant.Stage, setup: step_lib.Setup, mesh, mngr: ocp.CheckpointManager,
           iterator, step_fn, schedule, state: step_lib.TrainState, teacher_params):
  """The loop: (final state, (first, last) logged loss, whether pre-empted).

  Step N's metrics and finiteness are read only once step N+1 is dispatched, so the host
  never stalls the device; before every save the step's own loss is checked first.
  """
  cfg, start = stage.cfg, int(state.step)
  writer = MetricWriter(stage.workdir)
  if start == 0:
    writer.write_text("config", json.dumps(dataclasses.asdict(cfg), indent=2))
  stop_vote = preemption.Preemption(mesh)
  bar = tqdm.tqdm(total=cfg.max_steps, initial=start, unit="step", disable=jax.process_index() != 0,
                  dynamic_ncols=True)
  progress, log = _Progress(bar), _Log(writer, bar, cfg, schedule, start)
  guard = _FiniteGuard(setup, teacher_params, mngr)
  try:
    for step in range(start, cfg.max_steps):
      batch = sharding.global_batch(next(iterator), mesh)
      state, metrics = step_fn(state, teacher_params, batch)
      done = step + 1
      guard.check_previous(done, metrics, batch)
      log.write_previous(done, metrics)
      progress.finished(done - 1)  # its loss was read: it has finished
      progress.dispatched(done, metrics["loss/total"])
      stop = stop_vote.agreed()
      if done % cfg.checkpoint_every == 0 or done == cfg.max_steps or stop:
        guard.flush()  # this step's loss first: a non-finite state is never saved
        checkpoint.save_state(mngr, state, iterator, force=True)
      if stop:
        logging.warning("%s: every process saved step %d; exiting with code %d (re-run the same "
                        "command to resume)", stop, done, preemption.EXIT_CODES[stop])
        break
    log.flush()
    preempted = stop_vote.any_requested()  # SIGTERM in the last step too: exit as pre-empted
    progress.finished(int(state.step))
  finally:
    stop_vote.restore()
    bar.close()
    writer.close()
    checkpoint.wait(mngr)  # last: a step that failed to write raises here
  return state, log.losses, preempted


def _export(cfg: DistillConfig, workdir: pathlib.Path, config: model_lib.ModelConfig, params,
            tokenizer_dir: pathlib.Path) -> dict:
  """Writes the student as `hf/` (a masked-LM run also as `hf-mlm/`); their paths."""
  params = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), params)
  paths = {}
  if cfg.objective == "mlm":
    if config.model_type == "bert":
      paths["hf_mlm"] = str(mlm.save_hf(workdir / "hf-mlm", config, params, tokenizer_dir,
                                        overwrite=True))
    params = mlm.encoder_params(params)
  paths["hf"] = str(convert.save_hf(workdir / "hf", config, params, tokenizer_dir, overwrite=True))
  return paths


class _Log:
  """Metric records every `log_every` steps and at the end, each written one step late."""

  def __init__(self, writer: MetricWriter, bar: tqdm.tqdm, cfg: DistillConfig, schedule, start: int):
    self.writer, self.bar, self.cfg, self.schedule = writer, bar, cfg, schedule
    self.pending, self.tokens, self.last = None, 0, (start, time.perf_counter())
    self.losses = (None, None)  # the first and the last logged loss/total

  def write_previous(self, done: int, metrics: dict) -> None:
    """After step `done` is dispatched: writes the record held, and holds this step's if due."""
    self.tokens = self.tokens + metrics["tokens"]  # real tokens since the last record, summed on device
    self.flush()
    if done % self.cfg.log_every == 0 or done == self.cfg.max_steps:
      self.pending, self.tokens = (done, metrics, self.tokens), 0

  def flush(self) -> None:
    if self.pending is None:
      return
    step, metrics, tokens = self.pending
    record = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "tokens"}
    seconds = time.perf_counter() - self.last[1]
    record["learning_rate"] = float(self.schedule(step - 1))
    record["examples_per_sec"] = (step - self.last[0]) * self.cfg.global_batch_size / seconds
    record["tokens_per_sec"] = float(tokens) / seconds  # real tokens: padding is not work done
    stats = jax.local_devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
      record["peak_memory_gb"] = stats["peak_bytes_in_use"] / 2**30
    self.writer.write(step, record)
    self.bar.set_postfix(loss=f"{record['loss/total']:.4f}", tok_s=f"{record['tokens_per_sec']:.0f}")
    first = self.losses[0] if self.losses[0] is not None else record["loss/total"]
    self.losses = (first, record["loss/total"])
    self.pending, self.last = None, (step, time.perf_counter())


class _Progress:
  """The progress bar over finished steps, not dispatched ones: the loop runs ahead of the
  device by however many steps XLA queues, so a step counts once its loss is ready."""

  def __init__(self, bar: tqdm.tqdm):
    self.bar, self.inflight = bar, collections.deque()

  def dispatched(self, step: int, loss: jax.Array) -> None:
    self.inflight.append((step, loss))
    while self.inflight and self.inflight[0][1].is_ready():
      self.finished(self.inflight[0][0])

  def finished(self, step: int) -> None:
    """Every step up to `step` is done (its metrics were read, say)."""
    while self.inflight and self.inflight[0][0] <= step:
      self.inflight.popleft()
    if step > self.bar.n:
      self.bar.update(step - self.bar.n)


def _truncate_metrics(workdir: pathlib.Path, step: int) -> None:
  """Drops records logged after the checkpoint a run resumes from: they will be redone."""
  path = workdir / "metrics.jsonl"
  if path.is_file() and jax.process_index() == 0:
    records = read_metrics(workdir, drop_torn_tail=True)
    atomic.write_file(
        path, "".join(json.dumps(r) + "\n" for r in records if r["step"] <= step))


def _check_finite_teacher(teacher_dir: pathlib.Path, params) -> None:
  """A NaN or inf teacher weight would poison every loss: refuse it before any step."""
  bad = [jax.tree_util.keystr(path) for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
         if not np.isfinite(np.asarray(x)).all()]
  if bad:
    raise FloatingPointError(f"the teacher {teacher_dir} has non-finite weights in {len(bad)} "
                             f"tensors, e.g. {bad[0]}: its weights file is corrupt; restore it")


class _FiniteGuard:
  """Raises at the first step whose loss or gradient norm is not finite, naming the cause.

  The cause is told apart on that step's batch: if the teacher's distilled internals are
  already non-finite the teacher is at fault (its outputs overflow), else the student diverged.
  """

  def __init__(self, setup: step_lib.Setup, teacher_params, mngr: ocp.CheckpointManager):
    self.mngr, self.unchecked = mngr, None
    layer = setup.teacher.num_layers - 1

    def teacher_finite(params, batch):
      out = model_lib.apply(setup.teacher, params, batch["input_ids"], batch["attention_mask"],
                            batch["token_type_ids"], capture=(layer,))
      return jnp.all(jnp.array([jnp.isfinite(x).all() for x in jax.tree.leaves(out.internals)]))

    self.teacher_finite = lambda batch: bool(jax.jit(teacher_finite)(teacher_params, batch))
    self.has_teacher = bool(jax.tree.leaves(teacher_params))  # masked LM runs have none

  def check_previous(self, step: int, metrics: dict, batch: dict) -> None:
    """After step `step` is dispatched: checks the step before (its loss is read only now, so
    the host never stalls the device), and holds this one."""
    self.flush()
    self.unchecked = (step, metrics, batch)

  def flush(self) -> None:
    """Checks the step held, if any: before every save, so a non-finite state is never saved."""
    if self.unchecked is not None:
      self.check(*self.unchecked)
      self.unchecked = None

  def check(self, step: int, metrics: dict, batch: dict) -> None:
    loss, grad_norm = (float(x) for x in jax.device_get((metrics["loss/total"], metrics["grad_norm"])))
    if np.isfinite(loss) and np.isfinite(grad_norm):
      return
    if self.has_teacher and not self.teacher_finite(batch):
      cause = ("the teacher's outputs are non-finite on this batch (its weights overflow in the "
               "compute dtype): use compute_dtype='float32' or check the teacher's weights")
    else:
      cause = ("the student diverged: rerun with a lower --config.learning_rate (it resumes), or "
               "use a new --workdir with clip_grad_norm")
    self.mngr.wait_until_finished()
    last = self.mngr.latest_step()
    kept = "no checkpoint was saved yet" if last is None else (
        f"the last checkpoint (step {last}) is finite and intact")
    raise FloatingPointError(
        f"loss {loss}, grad_norm {grad_norm} at step {step} (batch {step - 1} of the data order): "
        f"{cause}. Nothing non-finite was saved; {kept}")
