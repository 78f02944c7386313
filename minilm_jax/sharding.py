"""Where arrays live: one `('data',)` mesh over every device of every process.

Data parallelism, the role `pmap` used to play, is expressed with today's sharding API:
the batch is sharded along its first axis over the mesh's `data` axis, parameters and
optimizer state are replicated, and one `jax.jit` computes on global arrays. The
compiler inserts the gradient all-reduce; nothing is per-device code, so the same step
runs unchanged on 1 CPU, 8 GPUs or a TPU pod, and shardings compose with `jit` (unlike
`pmap`, which fixed a leading device axis and its own compilation per device count).
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def target_platform() -> str:
  """The platform the computation being traced is compiled for: "cpu", "gpu" or "tpu".

  The device platform of the abstract mesh in context (`jax.sharding.use_abstract_mesh`,
  under which the training step is traced), else this host's backend: a step compiled
  ahead of time for a TPU on a CPU host takes the TPU's route.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.abstract_device is not None:
    return mesh.abstract_device.platform
  return jax.default_backend()


def per_data_shard(fn):
  """`fn` (batch-leading arrays in and out) run on each device's rows in `jax.shard_map`
  when the abstract mesh in context splits the batch over its `data` axis, else `fn`
  itself. For Pallas kernels: XLA does not partition a Mosaic call automatically.
  check_vma=False: a pallas_call declares its outputs without varying axes."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or DATA_AXIS not in mesh.axis_names or DATA_AXIS in mesh.manual_axes:
    return fn
  return jax.shard_map(fn, mesh=mesh, in_specs=P(DATA_AXIS), out_specs=P(DATA_AXIS), check_vma=False)


def make_mesh(devices: list | None = None) -> Mesh:
  """A 1-D mesh named `data` over all devices (all processes) or the given ones."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Split the leading (example) axis over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: Mesh, micro_batches: int = 1,
                     resumed_run: str | None = None) -> None:
  """Each device must get the same whole number of examples in every micro-batch.

  A resumed run (`resumed_run`, its workdir) cannot change its batch: the fix is then a device
  count, and the device counts that divide the batch are named.
  """
  per_step = mesh.size * micro_batches
  if not global_batch_size % per_step:
    return
  what = (f"global_batch_size {global_batch_size} is not divisible by {mesh.size} devices x "
          f"{micro_batches} gradient-accumulation steps")
  if resumed_run is None:
    raise ValueError(f"{what}: use a multiple of {per_step}")
  per_pass = global_batch_size // micro_batches
  fits = [d for d in range(1, per_pass + 1) if per_pass % d == 0]
  counts = ", ".join(map(str, fits[:12])) + (", ..." if len(fits) > 12 else "")
  raise ValueError(f"{what}, and the batch of the run in {resumed_run} is fixed by its checkpoints: "
                   f"resume it on a device count that divides {per_pass} ({counts}), or start a new "
                   "--workdir to change the batch")


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles the global batch from each process's own rows (its data shard)."""
  sharding = batch_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def put_replicated(tree, mesh: Mesh):
  return jax.device_put(tree, replicated(mesh))
