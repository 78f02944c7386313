"""Orbax checkpoints of one model: what it is, how it tokenizes, and its steps.

A checkpoint directory holds

    model.json          the `ModelConfig` of the saved parameters
    tokenizer/          the tokenizer files the model was trained with (and the teacher's
                        sentence-transformers files, which exports carry)
    <step>/params       the parameters (Orbax, one directory per step)
    <step>/opt_state    training runs only: optimizer state, ...
    <step>/train        ... step counter and PRNG key,
    <step>/data         ... and the data iterator's state (JSON, one file per process)

`convert --from-hf` writes step 0 with parameters only; `distill` writes every N steps
through the same `CheckpointManager`, asynchronously and atomically (Orbax writes a
temporary directory and renames it when complete), so both export the same way. The
frozen teacher is never saved: it is re-read from its Hugging Face directory.

Checkpoints do not depend on the topology that wrote them: parameters are restored with the
sharding of the devices at hand (one device to export or fine-tune, the new mesh to resume),
and the data state counts global batches, so a run saved by 2 processes x 4 devices exports
on a laptop and resumes on 1 process x 8 devices.

A training run saves its `step.TrainState` and data iterator with `save_state`, resumes with
`restore_state`, and `rewind` makes an earlier step the latest (`--resume-from-step`):
later steps move to `discarded-checkpoints/` beside the checkpoint directory.

Every step's contents are verified: at save, process 0 records a digest of each item in
`digests.json` beside the steps (`digests.py`); `restore_state` and `restore_params` refuse a
step whose bytes changed since, naming the step to rewind to.
"""

import contextlib
import dataclasses
import errno
import json
import logging
import os
import pathlib
import shutil
import tempfile
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx

from minilm_jax import model as model_lib
from minilm_jax import atomic, digests, sentence_transformers_files, tokenization

MODEL_FILE = "model.json"
TOKENIZER_DIR = "tokenizer"


def resolve(path: str | os.PathLike) -> pathlib.Path:
  """A checkpoint directory, given it or a `distill`/`finetune` workdir holding one."""
  path = pathlib.Path(path).expanduser().absolute()
  if (path / "checkpoints" / MODEL_FILE).is_file():
    return path / "checkpoints"
  if not path.exists():
    raise FileNotFoundError(f"checkpoint directory {path} does not exist: pass a directory written "
                            "by `convert --from-hf --to` or a distill/finetune workdir")
  if not (path / MODEL_FILE).is_file():
    raise FileNotFoundError(f"{path} is not a minilm_jax checkpoint ({MODEL_FILE} is missing): pass a "
                            "directory written by `convert --from-hf --to` or a distill workdir")
  return path


def read_model_config(directory: pathlib.Path) -> model_lib.ModelConfig:
  path = directory / MODEL_FILE
  try:
    return model_lib.ModelConfig(**json.loads(path.read_text()))
  except (json.JSONDecodeError, TypeError, ValueError) as e:
    raise ValueError(f"{path} is corrupt ({e}): re-create the checkpoint") from e


def write_model_files(directory: pathlib.Path, config: model_lib.ModelConfig,
                      tokenizer_dir: str | os.PathLike) -> None:
  """Writes model.json and tokenizer/ into a checkpoint directory (idempotent, atomic per file);
  tokenizer/ also takes the sentence-transformers files of `tokenizer_dir`, which exports carry."""
  directory.mkdir(parents=True, exist_ok=True)
  atomic.write_file(directory / MODEL_FILE,
                    json.dumps(dataclasses.asdict(config), indent=2) + "\n")
  tok = directory / TOKENIZER_DIR
  tok.mkdir(exist_ok=True)
  src = pathlib.Path(tokenizer_dir)
  for name in tokenization.TOKENIZER_FILES:
    if (src / name).is_file() and src != tok:
      atomic.write_file(tok / name, (src / name).read_bytes())
  sentence_transformers_files.copy(src, tok, config)


def manager(directory: str | os.PathLike, *, max_to_keep: int | None = None,
            async_save: bool = True) -> ocp.CheckpointManager:
  """The Orbax `CheckpointManager` over a checkpoint directory's steps.

  A step's directory is made in `save` itself, not on Orbax's writer thread: there a lost
  permission or a full disk stops the thread while `save` waits the coordination timeout
  (minutes) for a directory that never comes; here it raises at once.
  """
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save,
      async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
  return ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options)


def save_state(mngr: ocp.CheckpointManager, state, iterator, *, force: bool = False) -> None:
  """Saves a training step (Orbax writes it on its own thread); a step that cannot be written,
  this one or the one before, fails at once with one error (`raise_if_write_failed`).

  Before anything is written, the previous save is awaited (its failure is reported here),
  the disk must have room for the step's parameters and a small synced file must write (a lost
  permission or a full disk fails here, not on Orbax's thread).
  """
  directory = pathlib.Path(mngr.directory)
  try:
    mngr.wait_until_finished()
    _check_room(directory, state)
    if jax.process_index() == 0:
      digests.record(directory, int(state.step), _items(state, iterator.get_state()),
                     keep=mngr.all_steps())
    mngr.save(int(state.step), force=force, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state.params),
        opt_state=ocp.args.StandardSave(state.opt_state),
        train=ocp.args.StandardSave({"step": state.step, "rng": state.rng}),
        data=grain.checkpoint.CheckpointSave(iterator)))
  except Exception as e:
    raise_if_write_failed(directory, int(state.step), e)
    raise


def wait(mngr: ocp.CheckpointManager) -> None:
  """`mngr.wait_until_finished()`, a step that failed to write reported as `save_state` does."""
  try:
    mngr.wait_until_finished()
  except Exception as e:
    raise_if_write_failed(pathlib.Path(mngr.directory), mngr.latest_step(), e)
    raise


@contextlib.contextmanager
def kept_on_failure(mngr: ocp.CheckpointManager):
  """A write after the last save (an export) that fails on the disk also names the step kept."""
  try:
    yield
  except OSError as e:
    if e.errno is None:
      raise
    raise OSError(e.errno, f"{e.strerror} (the run's step {mngr.latest_step()} is saved and intact: "
                  "the rerun resumes there and writes it again)") from e


def _check_room(directory: pathlib.Path, state) -> None:
  need = sum(x.nbytes for x in jax.tree.leaves(state.params))  # at least: the rest may compress
  free = shutil.disk_usage(directory).free
  if free < need:
    raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}: {free / 2**20:.0f} MiB free, "
                  f"a step takes at least {need / 2**20:.0f} MiB")
  with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-probe-") as f:
    f.write(b"\0" * 4096)
    f.flush()
    os.fsync(f.fileno())


def raise_if_write_failed(directory: pathlib.Path, step: int | None, error: Exception) -> None:
  """If `error` is a failed write (a full disk, a lost permission), removes the half-written
  step (process 0) and raises one error naming the directory, the intact step and that a
  rerun resumes."""
  code = atomic.write_errno(error)
  if code is None:
    return
  unfinished = sorted(directory.glob("*.orbax-checkpoint-tmp*"))
  if jax.process_index() == 0:
    for path in unfinished:
      shutil.rmtree(path, ignore_errors=True)
  lost = sorted({p.name.split(".")[0] for p in unfinished}) or [str(step)]
  steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
  reason = error.strerror if isinstance(error, OSError) and error.strerror else os.strerror(code)
  kept = (f"rerun to resume from the last checkpoint (step {steps[-1]}), which is intact"
          if steps else "rerun to start again (no checkpoint was saved yet)")
  raise OSError(code, f"checkpoint directory {directory} is not writable ({reason}): step "
                f"{', '.join(lost)} was not saved, nothing of it is left; free disk space or "
                f"restore write permission, then {kept}") from error


def restore_state(mngr: ocp.CheckpointManager, abstract, iterator):
  """The latest step restored into `abstract` (a `step.TrainState` of shapes), the data
  `iterator` set to its position; a step that cannot be read, or whose contents changed since
  they were saved, names the step to resume from."""
  step = mngr.latest_step()
  step_dir = pathlib.Path(mngr.directory) / str(step)
  try:
    got = mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract.params),
        opt_state=ocp.args.StandardRestore(abstract.opt_state),
        train=ocp.args.StandardRestore({"step": abstract.step, "rng": abstract.rng})))
  except Exception as e:
    raise ValueError(f"checkpoint {step_dir} could not be restored ({type(e).__name__}: {e}): "
                     f"{_rewind_fix(mngr, step)}") from e
  state = abstract.replace(step=got["train"]["step"], params=got["params"],
                           opt_state=got["opt_state"], rng=got["train"]["rng"])
  try:
    data = data_state(step_dir)  # not grain's CheckpointRestore: it reads only this process count's
    digests.verify(pathlib.Path(mngr.directory), step, _items(state, data))
  except digests.DamagedStep as e:
    raise ValueError(f"{e}: {_rewind_fix(mngr, step)}") from e
  iterator.set_state(data)
  return state


def _rewind_fix(mngr: ocp.CheckpointManager, step: int) -> str:
  earlier = [s for s in mngr.all_steps() if s < step]
  if not earlier:
    return "no earlier step is left: use a new --workdir"
  return (f"resume from step {max(earlier)} with --resume-from-step {max(earlier)} (later steps are "
          "moved aside, not deleted)")


def _items(state, data: dict) -> dict:
  """What a training step saves, by Orbax item: the trees `digest` hashes."""
  return {"params": state.params, "opt_state": state.opt_state,
          "train": {"step": state.step, "rng": state.rng}, "data": data}


def rewind(directory: pathlib.Path, step: int) -> None:
  """Makes `step` the latest: later steps move to `../discarded-checkpoints/`, nothing is deleted."""
  steps = sorted(int(p.name) for p in directory.glob("*") if p.name.isdigit())
  if step not in steps:
    raise ValueError(f"--resume-from-step {step}: {directory} has steps {steps}")
  later, aside = [s for s in steps if s > step], directory.parent / "discarded-checkpoints"
  if later and jax.process_index() == 0:  # one mover on a shared filesystem
    aside.mkdir(exist_ok=True)
    for s in later:
      shutil.move(directory / str(s), aside / f"{s}-{int(time.time())}")
    logging.warning("resuming from step %d: moved later steps %s to %s", step, later, aside)


def save_model(directory: str | os.PathLike, config: model_lib.ModelConfig, params: nnx.State,
               tokenizer_dir: str | os.PathLike, *, overwrite: bool = False) -> pathlib.Path:
  """Writes a complete checkpoint directory (step 0, parameters only) atomically."""
  def write(tmp: pathlib.Path):
    write_model_files(tmp, config, tokenizer_dir)
    with manager(tmp, async_save=False) as m:
      m.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
    digests.record(tmp, 0, {"params": params})
  return atomic.write_dir(pathlib.Path(directory), write, overwrite=overwrite,
                          sources=(pathlib.Path(tokenizer_dir),))


def restore_params(directory: str | os.PathLike, step: int | None = None, *,
                   abstract: Any = None) -> tuple[model_lib.ModelConfig, nnx.State, pathlib.Path, int]:
  """Reads (config, parameters, tokenizer directory, step) of a checkpoint's step; the
  tokenizer is checked to fit the model (`tokenization.check_fits`).

  `step=None` takes the latest. `abstract` overrides the parameter structure (task
  models carry heads); by default it is the encoder's, also of a masked-LM run
  (`objective="mlm"`, saved with its LM head, which is left out).
  """
  directory = resolve(directory)
  config = read_model_config(directory)
  with manager(directory, async_save=False) as m:
    steps = m.all_steps()
    if not steps:
      raise FileNotFoundError(f"{directory} holds no complete checkpoint step: the run saved none "
                              "(or was killed before its first save); re-run it")
    if step is None:
      step = max(steps)
    elif step not in steps:
      raise FileNotFoundError(f"{directory} has no step {step}; it has steps {sorted(steps)}")
    beside = {} if abstract is not None else _saved_beside_encoder(directory / str(step) / "params")
    if abstract is None:
      abstract = model_lib.abstract_params(config)
      abstract = {"encoder": abstract, **beside} if beside else abstract
    abstract = on_one_device(abstract)
    try:
      restored = m.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract)))
    except Exception as e:
      raise ValueError(f"{directory}/{step} could not be restored ({type(e).__name__}: {e}): the "
                       "checkpoint is corrupt or was written for another model; pick another --step "
                       "or re-create it") from e
    try:
      digests.verify(directory, step, {"params": restored["params"]})
    except digests.DamagedStep as e:
      earlier = [s for s in steps if s < step]
      fix = (f"export an earlier step with --step {max(earlier)}, or resume its run with "
             f"--resume-from-step {max(earlier)}" if earlier else "re-create it")
      raise ValueError(f"{e}: {fix}") from e
  params = restored["params"]["encoder"] if beside else restored["params"]
  return config, params, tokenization.check_fits(directory / TOKENIZER_DIR, config.vocab_size).parent, step


def _saved_beside_encoder(params_dir: pathlib.Path) -> dict:
  """Shapes of what a step saved beside an "encoder" (a masked-LM run's `{"encoder",
  "head"}`: its head), read to restore the step whole; {} for the encoder alone."""
  try:
    tree = ocp.StandardCheckpointer().metadata(params_dir).item_metadata.tree
  except Exception:  # no readable metadata: restore as the encoder and report what fails
    return {}
  if "encoder" not in tree:
    return {}
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                      {k: v for k, v in tree.items() if k != "encoder"})


def on_one_device(abstract: Any) -> Any:
  """Abstract arrays without a sharding placed on this process's first device.

  Orbax restores into the sharding each leaf names, whatever sharding saved it; without one
  it insists on the saving topology ("Topology mismatch"), so a checkpoint of several
  devices could not be read here.
  """
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=getattr(x, "sharding", None) or device), abstract)


def data_state(step_dir: pathlib.Path) -> dict:
  """The data iterator state saved with a step, for this process, whatever process count saved it.

  grain writes one `process_<i>-of-<n>.json` per process. `data.batch_iterator` states
  count global batches, so every process saves the same state and a run may resume on
  another process count; states that differ (a pipeline whose position is per process)
  cannot be shared, and the error says to resume on the process count that saved them.
  """
  folder = pathlib.Path(step_dir) / "data"
  own = folder / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
  if own.is_file():
    return _read_state(own)
  files = sorted(folder.glob("process_*-of-*.json"))
  if not files:
    raise digests.DamagedStep(f"{folder} holds no data iterator state (process_<i>-of-<n>.json): "
                      "the step is incomplete")
  states = [_read_state(f) for f in files]
  if any(s != states[0] for s in states):
    saved_by = files[0].stem.split("-of-")[1]
    raise ValueError(f"{folder} holds different data iterator states for the {saved_by} processes "
                     f"that saved it, so it gives no global data position for "
                     f"{jax.process_count()} processes: resume with --num-processes {saved_by}")
  return states[0]


def _read_state(path: pathlib.Path) -> dict:
  try:
    return json.loads(path.read_text())
  except ValueError as e:
    raise digests.DamagedStep(f"{path}, the data iterator state of step {path.parent.parent.name}, is "
                      f"not valid JSON ({e}): the file is damaged or was cut short") from e


def to_host(tree: Any) -> Any:
  """Fully replicated / addressable arrays as numpy, for saving or export."""
  return jax.tree.map(lambda x: jax.device_get(x) if isinstance(x, jax.Array) else x, tree)
