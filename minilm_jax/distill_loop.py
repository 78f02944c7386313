"""The distillation loop of one stage: steps, metrics, progress, finiteness, checkpoints.

`train` runs the jitted step (`step.make_step`) over the data iterator and around it, each
one step late so that the host never stalls the device: a metric record every `log_every`
steps (`metrics.jsonl`, TensorBoard), a progress bar over finished steps with tokens/s, the
check that no non-finite state is ever saved (naming the teacher or the student as the
cause), a checkpoint every `checkpoint_every` steps and at the end, and the pre-emption
vote (`preemption.Preemption`) after which every process saves the same step.
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

from minilm_jax import atomic, checkpoint, heldout, preemption, sharding, teacher_assistant
from minilm_jax import model as model_lib
from minilm_jax import step as step_lib
from minilm_jax.config import DistillConfig
from minilm_jax.metric_writer import MetricWriter, read_metrics


def train(stage: teacher_assistant.Stage, setup: step_lib.Setup, mesh, mngr: ocp.CheckpointManager,
          iterator, step_fn, schedule, state: step_lib.TrainState, teacher_params,
          evaluation: heldout.Evaluation):
  """Runs `stage` from `state` to `max_steps` or a pre-emption: (final state, (first, last)
  logged loss, whether pre-empted). A resumed run first drops the metric records logged
  after its checkpoint: they will be redone.

  Step N's metrics and finiteness are read only once step N+1 is dispatched, so the host
  never stalls the device; before every save the step's own loss is checked first.
  """
  cfg, start = stage.cfg, int(state.step)
  if start:
    _truncate_metrics(stage.workdir, start)
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
      metrics = metrics | evaluation(done, state.params, teacher_params)  # {} unless due
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


class _Log:
  """Metric records every `log_every` steps and at the end, each written one step late."""

  def __init__(self, writer: MetricWriter, bar: tqdm.tqdm, cfg: DistillConfig, schedule, start: int):
    self.writer, self.bar, self.cfg, self.schedule = writer, bar, cfg, schedule
    self.pending, self.tokens, self.last = None, 0, (start, time.perf_counter())
    self.eval_seconds = 0.0  # held-out evaluations since the last record was written: not training
    self.losses = (None, None)  # the first and the last logged loss/total

  def write_previous(self, done: int, metrics: dict) -> None:
    """After step `done` is dispatched: writes the record held, and holds this step's if due."""
    self.tokens = self.tokens + metrics["tokens"]  # real tokens since the last record, summed on device
    self.eval_seconds += metrics.get("eval_seconds", 0.0)  # this step's evaluation ran before the flush
    self.flush()
    evaluated = heldout.PREFIX + "total" in metrics  # an evaluation is always written
    if done % self.cfg.log_every == 0 or done == self.cfg.max_steps or evaluated:
      self.pending, self.tokens = (done, metrics, self.tokens), 0

  def flush(self) -> None:
    if self.pending is None:
      return
    step, metrics, tokens = self.pending
    record = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "tokens"}
    seconds = time.perf_counter() - self.last[1] - self.eval_seconds  # training only
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
    self.pending, self.last, self.eval_seconds = None, (step, time.perf_counter()), 0.0


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
