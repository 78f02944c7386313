"""The `distill` job: teacher -> fresh student, checkpointed, resumable, exported to HF.

    python -m minilm_jax distill --config experiments/configs/demo.py --workdir runs/demo

The workdir holds `config.json` (the run's `DistillConfig`), `checkpoints/` (Orbax:
student parameters, optimizer state, step, PRNG key and the data iterator's per-process
state), `metrics.jsonl`, `tensorboard/` and, at the end, `hf/` (the student as a Hugging
Face directory; with `objective="mlm"`, the masked-LM baseline, also `hf-mlm/`, a
`BertForMaskedLM`). Re-running with the same workdir resumes from the latest checkpoint
and continues with exactly the batches and dropout masks an uninterrupted run would
have seen; SIGTERM (pre-emption) on any process makes every process save the same step and
exit with `PREEMPTED_EXIT_CODE`. On several processes, process 0 alone writes the shared
files (config.json, model.json, tokenizer/, metrics, hf/), each through a temporary file and
`os.replace`; the others wait at a barrier.
"""

import collections
import dataclasses
import json
import logging
import os
import pathlib
import shutil
import signal
import tempfile
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tqdm
from jax.experimental import multihost_utils

from minilm_jax import atomic, checkpoint, convert, data, mlm, sharding, train
from minilm_jax import workdir as workdir_lib
from minilm_jax import model as model_lib
from minilm_jax.metric_writer import MetricWriter, read_metrics
from minilm_jax.teachers import resolve_model_dir

# Exit status of a run that SIGTERM stopped after saving: EX_TEMPFAIL of sysexits.h ("try
# again"), so a scheduler never reads a pre-empted run as finished; the same command resumes.
PREEMPTED_EXIT_CODE = 75


def _save(mngr: ocp.CheckpointManager, state: train.TrainState, iterator, *, force: bool = False):
  """Saves a step; a checkpoint directory that cannot be written fails at once, naming it.

  A small file is written and synced first, so that a full disk fails here too, not only a
  lost permission (Orbax writes the arrays on its own thread, after `save` returns).
  """
  directory, last = pathlib.Path(mngr.directory), mngr.latest_step()
  try:
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-probe-") as f:
      f.write(b"\0" * 4096)
      f.flush()
      os.fsync(f.fileno())
    mngr.save(int(state.step), force=force, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state.params),
        opt_state=ocp.args.StandardSave(state.opt_state),
        train=ocp.args.StandardSave({"step": state.step, "rng": state.rng}),
        data=grain.checkpoint.CheckpointSave(iterator)))
  except OSError as e:
    raise type(e)(e.errno, f"checkpoint directory {directory} is not writable ({e.strerror}): free "
                  "disk space or restore write permission, then rerun to resume from the last "
                  f"checkpoint (step {last}), which is intact") from e


def _resume_from(workdir: pathlib.Path, step: int) -> None:
  """Makes `step` the latest: later steps move to `discarded-checkpoints/`, nothing is deleted."""
  directory = workdir / "checkpoints"
  steps = sorted(int(p.name) for p in directory.glob("*") if p.name.isdigit())
  if step not in steps:
    raise ValueError(f"--resume-from-step {step}: {directory} has steps {steps}")
  later, aside = [s for s in steps if s > step], workdir / "discarded-checkpoints"
  if later and jax.process_index() == 0:  # one mover on a shared filesystem
    aside.mkdir(exist_ok=True)
    for s in later:
      shutil.move(directory / str(s), aside / f"{s}-{int(time.time())}")
    logging.warning("resuming from step %d: moved later steps %s to %s", step, later, aside)


def _restore(mngr: ocp.CheckpointManager, abstract: train.TrainState, iterator) -> train.TrainState:
  step = mngr.latest_step()
  try:
    got = mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract.params),
        opt_state=ocp.args.StandardRestore(abstract.opt_state),
        train=ocp.args.StandardRestore({"step": abstract.step, "rng": abstract.rng})))
  except Exception as e:
    earlier = [s for s in mngr.all_steps() if s < step]
    fix = (f"resume from step {max(earlier)} with --resume-from-step {max(earlier)} (later steps are "
           "moved aside, not deleted)" if earlier else "no earlier step is left: use a new --workdir")
    raise ValueError(f"checkpoint {mngr.directory}/{step} could not be restored ({type(e).__name__}: "
                     f"{e}): {fix}") from e
  # Not grain's CheckpointRestore: it reads only the file of this process count.
  iterator.set_state(checkpoint.data_state(pathlib.Path(mngr.directory) / str(step)))
  return train.TrainState(got["train"]["step"], got["params"], got["opt_state"], got["train"]["rng"])


def _truncate_metrics(workdir: pathlib.Path, step: int) -> None:
  """Drops records logged after the checkpoint a run resumes from: they will be redone."""
  path = workdir / "metrics.jsonl"
  if path.is_file() and jax.process_index() == 0:
    records = read_metrics(workdir, drop_torn_tail=True)
    atomic.write_file(
        path, "".join(json.dumps(r) + "\n" for r in records if r["step"] <= step))


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


class _Preemption:
  """SIGTERM on any process stops every process after the same step.

  The handler only raises this process's flag; one process stops on it at once. Several
  vote after each step: a `max` over one flag per device, a tiny all-reduce queued behind
  the step and read one step later (so it stalls nothing). Every process reads the same
  vote after the same step, so all save that step and exit together. Each host checking
  its own flag instead let one wait in Orbax's save barrier while the others waited in the
  next step's all-reduce: a deadlock.
  """

  def __init__(self, mesh):
    self.requested = False  # this process received SIGTERM
    self._mesh = mesh
    self._any = jax.jit(jnp.max, out_shardings=sharding.replicated(mesh))
    self._vote = None  # the last step's vote, read at the next step
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    logging.warning("SIGTERM: every process will save the same step and exit")
    self.requested = True

  def _cast(self) -> jax.Array:
    flags = np.full(len(self._mesh.local_devices), self.requested, np.int32)  # one per device
    return self._any(jax.make_array_from_process_local_data(sharding.batch_sharded(self._mesh),
                                                            flags))

  def agreed(self) -> bool:
    """After a step: whether every process stops now (the vote cast after the previous step)."""
    if jax.process_count() == 1:
      return self.requested
    previous, self._vote = self._vote, self._cast()
    return previous is not None and bool(previous.addressable_data(0))

  def any_requested(self) -> bool:
    """At the end of a run: whether any process got SIGTERM (a vote read at once)."""
    if jax.process_count() == 1:
      return self.requested
    return bool(self._cast().addressable_data(0))

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def run(cfg: train.DistillConfig, workdir: str | pathlib.Path, *,
        resume_from_step: int | None = None) -> dict:
  """Distils `cfg.teacher` into a fresh student in `workdir`; returns a summary.

  Everything is checked before anything is written. `resume_from_step` resumes from that
  checkpoint instead of the latest (later steps move to `discarded-checkpoints/`).
  """
  workdir = pathlib.Path(workdir).absolute()
  train.check_config(cfg)
  previous = workdir_lib.read_config(workdir)
  workdir_lib.check_resumable(workdir, previous, cfg)
  teacher_dir = resolve_model_dir(cfg.teacher)
  teacher_config, teacher_params = convert.load_hf(teacher_dir)
  _check_finite_teacher(teacher_dir, teacher_params)
  setup = train.make_setup(cfg, teacher_config)
  mesh = sharding.make_mesh()
  sharding.check_batch_size(cfg.global_batch_size, mesh, cfg.grad_accum_steps)
  examples, stats = data.pretraining_examples(
      cfg.corpus, teacher_dir, max_seq_len=cfg.max_seq_len, data_dir=cfg.data_dir or None,
      two_segments=cfg.two_segments, doc_per_line=cfg.doc_per_line, doc_per_file=cfg.doc_per_file,
      text_feature=cfg.text_feature)
  corpus = workdir_lib.corpus_record(cfg, examples)
  workdir_lib.check_corpus(workdir, corpus)
  iterator = data.batch_iterator(examples, global_batch_size=cfg.global_batch_size, seed=cfg.seed,
                                 worker_count=cfg.data_workers)
  schedule, optimizer, step_fn = train.make_step(cfg, setup, mesh, teacher_dir)
  export_config = setup.student.replace(dtype="float32", cudnn_dropout=False)
  if resume_from_step is not None:
    _resume_from(workdir, resume_from_step)
  workdir_lib.write(workdir, cfg, corpus)
  if jax.process_index() == 0:
    checkpoint.write_model_files(workdir / "checkpoints", export_config, teacher_dir)
  multihost_utils.sync_global_devices("minilm_jax distill: run files written")
  mngr = checkpoint.manager(workdir / "checkpoints", max_to_keep=cfg.keep_checkpoints)

  replicated = sharding.replicated(mesh)
  if mngr.latest_step() is not None:
    state = _restore(mngr, train.abstract_inputs(cfg, setup, optimizer, mesh)[0], iterator)
    _truncate_metrics(workdir, int(state.step))
  else:
    state = jax.device_put(train.init_state(cfg, setup, optimizer), replicated)
  teacher_params = ({} if cfg.objective == "mlm" else  # masked LM has no teacher
                    jax.device_put(train.truncate_teacher(setup, teacher_params), replicated))

  writer = MetricWriter(workdir)
  start = int(state.step)
  logging.info("distilling %s layer %d -> student %s on %d devices; corpus: %s; resuming at step %d",
               teacher_dir, setup.teacher.num_layers, setup.student, mesh.size, stats, start)
  if start == 0:
    writer.write_text("config", json.dumps(dataclasses.asdict(cfg), indent=2))
  preemption = _Preemption(mesh)
  bar = tqdm.tqdm(total=cfg.max_steps, initial=start, unit="step", disable=jax.process_index() != 0,
                  dynamic_ncols=True)
  progress = _Progress(bar)
  pending, last, tokens = None, (start, time.perf_counter()), 0
  first_loss = last_loss = None
  guard, unchecked = _FiniteGuard(setup, teacher_params, mngr), None
  try:
    for step in range(start, cfg.max_steps):
      batch = sharding.global_batch(next(iterator), mesh)
      state, metrics = step_fn(state, teacher_params, batch)
      done = step + 1
      tokens = tokens + metrics["tokens"]  # real tokens since the last record, summed on device
      if unchecked is not None:  # step N-1's finiteness, read once step N is dispatched
        guard.check(*unchecked)
        progress.finished(unchecked[0])  # its loss was read: it has finished
      unchecked = (done, metrics, batch)
      if pending is not None:  # read step N-1's metrics only after step N is dispatched
        record = _log(writer, bar, *pending, last, cfg, schedule)
        progress.finished(pending[0])
        first_loss = record["loss/total"] if first_loss is None else first_loss
        last_loss, last = record["loss/total"], (pending[0], time.perf_counter())
        pending = None
      if done % cfg.log_every == 0 or done == cfg.max_steps:
        pending, tokens = (done, metrics, tokens), 0
      progress.dispatched(done, metrics["loss/total"])
      stop = preemption.agreed()
      if done % cfg.checkpoint_every == 0 or done == cfg.max_steps or stop:
        guard.check(*unchecked)  # this step's loss first: a non-finite state is never saved
        unchecked = None
        _save(mngr, state, iterator, force=True)
      if stop:
        logging.warning("pre-empted: every process saved step %d; exiting with code %d (re-run "
                        "the same command to resume)", done, PREEMPTED_EXIT_CODE)
        break
    if pending is not None:
      record = _log(writer, bar, *pending, last, cfg, schedule)
      first_loss = record["loss/total"] if first_loss is None else first_loss
      last_loss = record["loss/total"]
    preempted = preemption.any_requested()  # SIGTERM in the last step too: exit as pre-empted
    progress.finished(int(state.step))
  finally:
    mngr.wait_until_finished()
    preemption.restore()
    bar.close()
    writer.close()
  final_step = int(state.step)
  summary = {"workdir": str(workdir), "steps": final_step, "first_loss": first_loss,
             "last_loss": last_loss, "preempted": preempted, "corpus": dataclasses.asdict(stats)}
  if cfg.export_hf and final_step == cfg.max_steps and jax.process_index() == 0:
    params = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), state.params)
    if cfg.objective == "mlm":
      if export_config.model_type == "bert":
        summary["hf_mlm"] = str(mlm.save_hf(workdir / "hf-mlm", export_config, params, teacher_dir,
                                            overwrite=True))
      params = mlm.encoder_params(params)
    summary["hf"] = str(convert.save_hf(workdir / "hf", export_config, params, teacher_dir, overwrite=True))
  return summary


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

  def __init__(self, setup: train.Setup, teacher_params, mngr: ocp.CheckpointManager):
    self.mngr = mngr
    layer = setup.teacher.num_layers - 1

    def teacher_finite(params, batch):
      out = model_lib.apply(setup.teacher, params, batch["input_ids"], batch["attention_mask"],
                            batch["token_type_ids"], capture=(layer,))
      return jnp.all(jnp.array([jnp.isfinite(x).all() for x in jax.tree.leaves(out.internals)]))

    self.teacher_finite = lambda batch: bool(jax.jit(teacher_finite)(teacher_params, batch))
    self.has_teacher = bool(jax.tree.leaves(teacher_params))  # masked LM runs have none

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


def _log(writer, bar, step, metrics, tokens, last, cfg: train.DistillConfig, schedule) -> dict:
  record = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "tokens"}
  seconds = time.perf_counter() - last[1]
  record["learning_rate"] = float(schedule(step - 1))
  record["examples_per_sec"] = (step - last[0]) * cfg.global_batch_size / seconds
  record["tokens_per_sec"] = float(tokens) / seconds  # real tokens: padding is not work done
  stats = jax.local_devices()[0].memory_stats()
  if stats and "peak_bytes_in_use" in stats:
    record["peak_memory_gb"] = stats["peak_bytes_in_use"] / 2**30
  writer.write(step, record)
  bar.set_postfix(loss=f"{record['loss/total']:.4f}", tok_s=f"{record['tokens_per_sec']:.0f}")
  return record
