"""The `distill` job: teacher -> fresh student, checkpointed, resumable, exported to HF.

    python -m minilm_jax distill --config experiments/demo.py --workdir runs/demo

The workdir holds `config.json` (the run's `DistillConfig`), `checkpoints/` (Orbax:
student parameters, optimizer state, step, PRNG key and the data iterator's per-process
state), `metrics.jsonl`, `tensorboard/` and, at the end, `hf/` (the student as a Hugging
Face directory). Re-running with the same workdir resumes from the latest checkpoint
and continues with exactly the batches and dropout masks an uninterrupted run would
have seen; SIGTERM (pre-emption) saves a checkpoint before the process exits.
"""

import dataclasses
import json
import logging
import pathlib
import signal
import time

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import tqdm

from minilm_jax import checkpoint, convert, data, sharding, train
from minilm_jax.metric_writer import MetricWriter
from minilm_jax.teachers import resolve_model_dir

# Fields that fix what the checkpoints contain; a resumed run must not change them.
_FROZEN_FIELDS = ("teacher", "teacher_layer", "version", "num_relation_heads", "student_layers",
                  "student_hidden", "student_heads", "student_intermediate", "max_seq_len",
                  "global_batch_size", "grad_accum_steps", "corpus", "seed", "loss_terms",
                  "internals_loss", "loss_teacher_layers", "loss_student_layers")


def _check_resumable(workdir: pathlib.Path, cfg: train.DistillConfig) -> None:
  path = workdir / "config.json"
  if path.is_file():
    old, new = json.loads(path.read_text()), json.loads(json.dumps(dataclasses.asdict(cfg)))
    changed = [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in _FROZEN_FIELDS  # tuples as JSON lists
               if k in old and old[k] != new[k]]
    if changed:
      raise ValueError(f"{workdir} holds a run with another configuration ({'; '.join(changed)}): "
                       "use a new --workdir, or the same settings to resume")
  workdir.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")


def _save(mngr: ocp.CheckpointManager, state: train.TrainState, iterator, *, force: bool = False):
  step = int(state.step)
  mngr.save(step, force=force, args=ocp.args.Composite(
      params=ocp.args.StandardSave(state.params),
      opt_state=ocp.args.StandardSave(state.opt_state),
      train=ocp.args.StandardSave({"step": state.step, "rng": state.rng}),
      data=grain.checkpoint.CheckpointSave(iterator)))


def _restore(mngr: ocp.CheckpointManager, abstract: train.TrainState, iterator) -> train.TrainState:
  step = mngr.latest_step()
  try:
    got = mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract.params),
        opt_state=ocp.args.StandardRestore(abstract.opt_state),
        train=ocp.args.StandardRestore({"step": abstract.step, "rng": abstract.rng}),
        data=grain.checkpoint.CheckpointRestore(iterator)))
  except Exception as e:
    raise ValueError(f"checkpoint {mngr.directory}/{step} could not be restored ({type(e).__name__}: "
                     f"{e}): delete that step directory to resume from an earlier one") from e
  return train.TrainState(got["train"]["step"], got["params"], got["opt_state"], got["train"]["rng"])


def _truncate_metrics(workdir: pathlib.Path, step: int) -> None:
  """Drops records logged after the checkpoint a run resumes from: they will be redone."""
  path = workdir / "metrics.jsonl"
  if path.is_file() and jax.process_index() == 0:
    lines = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= step]
    path.write_text("".join(l + "\n" for l in lines))


class _Preemption:
  """Turns SIGTERM into a flag the loop checks after each step."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    logging.warning("SIGTERM: saving a checkpoint before exiting")
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def run(cfg: train.DistillConfig, workdir: str | pathlib.Path) -> dict:
  """Distils `cfg.teacher` into a fresh student in `workdir`; returns a summary."""
  workdir = pathlib.Path(workdir).absolute()
  teacher_dir = resolve_model_dir(cfg.teacher)
  teacher_config, teacher_params = convert.load_hf(teacher_dir)
  setup = train.make_setup(cfg, teacher_config)
  mesh = sharding.make_mesh()
  sharding.check_batch_size(cfg.global_batch_size, mesh, cfg.grad_accum_steps)
  _check_resumable(workdir, cfg)
  examples, stats = data.pretraining_examples(
      cfg.corpus, teacher_dir, max_seq_len=cfg.max_seq_len, data_dir=cfg.data_dir or None,
      two_segments=cfg.two_segments, doc_per_line=cfg.doc_per_line, doc_per_file=cfg.doc_per_file,
      text_feature=cfg.text_feature)
  iterator = data.batch_iterator(examples, global_batch_size=cfg.global_batch_size, seed=cfg.seed,
                                 worker_count=cfg.data_workers)
  optimizer = train.make_optimizer(cfg)
  schedule = train.learning_rate_schedule(cfg)
  step_fn = train.make_train_step(setup, optimizer, mesh, cfg.grad_accum_steps)
  export_config = setup.student.replace(dtype="float32")
  checkpoint.write_model_files(workdir / "checkpoints", export_config, teacher_dir)
  mngr = checkpoint.manager(workdir / "checkpoints", max_to_keep=cfg.keep_checkpoints)

  replicated = sharding.replicated(mesh)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                          jax.eval_shape(lambda: train.init_state(cfg, setup, optimizer)))
  if mngr.latest_step() is not None:
    state = _restore(mngr, abstract, iterator)
    _truncate_metrics(workdir, int(state.step))
  else:
    state = jax.device_put(train.init_state(cfg, setup, optimizer), replicated)
  teacher_params = jax.device_put(train.truncate_teacher(setup, teacher_params), replicated)

  writer = MetricWriter(workdir)
  start = int(state.step)
  logging.info("distilling %s layer %d -> student %s on %d devices; corpus: %s; resuming at step %d",
               teacher_dir, setup.teacher.num_layers, setup.student, mesh.size, stats, start)
  if start == 0:
    writer.write_text("config", json.dumps(dataclasses.asdict(cfg), indent=2))
  preemption = _Preemption()
  bar = tqdm.tqdm(total=cfg.max_steps, initial=start, unit="step", disable=jax.process_index() != 0,
                  dynamic_ncols=True)
  pending, last = None, (start, time.perf_counter())
  first_loss = last_loss = None
  try:
    for step in range(start, cfg.max_steps):
      batch = sharding.global_batch(next(iterator), mesh)
      state, metrics = step_fn(state, teacher_params, batch)
      done = step + 1
      if pending is not None:  # read step N-1's metrics only after step N is dispatched
        record = _log(writer, bar, *pending, last, cfg, schedule)
        first_loss = record["loss/total"] if first_loss is None else first_loss
        last_loss, last = record["loss/total"], (pending[0], time.perf_counter())
        pending = None
      if done % cfg.log_every == 0 or done == cfg.max_steps:
        pending = (done, metrics)
      bar.update(1)
      if done % cfg.checkpoint_every == 0 or done == cfg.max_steps or preemption.requested:
        _save(mngr, state, iterator, force=True)
      if preemption.requested:
        break
    if pending is not None:
      record = _log(writer, bar, *pending, last, cfg, schedule)
      first_loss = record["loss/total"] if first_loss is None else first_loss
      last_loss = record["loss/total"]
  finally:
    mngr.wait_until_finished()
    preemption.restore()
    bar.close()
    writer.close()
  final_step = int(state.step)
  summary = {"workdir": str(workdir), "steps": final_step, "first_loss": first_loss,
             "last_loss": last_loss, "preempted": preemption.requested, "corpus": dataclasses.asdict(stats)}
  if cfg.export_hf and final_step == cfg.max_steps and jax.process_index() == 0:
    params = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), state.params)
    summary["hf"] = str(convert.save_hf(workdir / "hf", export_config, params, teacher_dir, overwrite=True))
  return summary


def _log(writer, bar, step, metrics, last, cfg: train.DistillConfig, schedule) -> dict:
  record = {k: float(v) for k, v in jax.device_get(metrics).items()}
  if not np.isfinite(record["loss/total"]):
    raise FloatingPointError(f"loss is {record['loss/total']} at step {step}: lower the learning "
                             "rate or enable clip_grad_norm; the last checkpoint is intact")
  seconds = time.perf_counter() - last[1]
  record["learning_rate"] = float(schedule(step - 1))
  record["examples_per_sec"] = (step - last[0]) * cfg.global_batch_size / seconds
  record["tokens_per_sec"] = record["examples_per_sec"] * cfg.max_seq_len
  stats = jax.local_devices()[0].memory_stats()
  if stats and "peak_bytes_in_use" in stats:
    record["peak_memory_gb"] = stats["peak_bytes_in_use"] / 2**30
  writer.write(step, record)
  bar.set_postfix(loss=f"{record['loss/total']:.4f}", tok_s=f"{record['tokens_per_sec']:.0f}")
  return record
