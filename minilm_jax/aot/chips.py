"""TPU generations: each chip's documented peak, memory and bandwidth, and its pod slices.

A slice is named as `jax.experimental.topologies.get_topology_desc` takes it,
"<generation>:<chips per axis>" (v5e:4x4 is 16 chips). Compiling for its devices needs
only libtpu (`pip install -e .[tpu]`), no TPU: the compiler runs on this host.

| chip | bf16 peak | HBM | HBM bandwidth | source |
|---|---|---|---|---|
| v4  | 275 TFLOP/s | 32 GiB | 1,200 GB/s | https://cloud.google.com/tpu/docs/v4 |
| v5e | 197 TFLOP/s | 16 GiB | 819 GB/s   | https://cloud.google.com/tpu/docs/v5e |
| v5p | 459 TFLOP/s | 95 GiB | 2,765 GB/s | https://cloud.google.com/tpu/docs/v5p |
| v6e | 918 TFLOP/s | 32 GiB | 1,638 GB/s | https://cloud.google.com/tpu/docs/v6e |

The pages give v5e's and v6e's HBM as "16 GB" and "32 GB", v5p's as "95 GB"; the chips
hold 16 GiB and 32 GiB (HBM stacks come in powers of two), and v5p's 95 is taken as GiB
too. A v4 slice's topology lists one device per TensorCore (two per chip), so a v4
device gets half a chip's peak, memory and bandwidth.
"""

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str              # generation, as slice names spell it
  peak_flops: float      # bf16 matrix FLOP/s per chip
  hbm_bytes: int         # HBM per chip
  hbm_bandwidth: float   # HBM bytes/s per chip
  source: str            # where these numbers are documented
  slices: tuple[str, ...]  # the generation's slice shapes, smallest first


CHIPS = {c.name: c for c in (
    Chip("v4", 275e12, 32 * 2**30, 1200e9, "https://cloud.google.com/tpu/docs/v4",
         ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4")),
    Chip("v5e", 197e12, 16 * 2**30, 819e9, "https://cloud.google.com/tpu/docs/v5e",
         ("2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16")),
    Chip("v5p", 459e12, 95 * 2**30, 2765e9, "https://cloud.google.com/tpu/docs/v5p",
         ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4")),
    Chip("v6e", 918e12, 32 * 2**30, 1638e9, "https://cloud.google.com/tpu/docs/v6e",
         ("2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16")),
)}


@dataclasses.dataclass(frozen=True)
class Slice:
  """A pod slice's devices and what one device of it has."""
  name: str              # "v5e:4x4"
  chip: Chip
  devices: tuple         # jax devices of the topology (compile-only)
  chips: int
  hosts: int

  @property
  def per_device(self) -> float:
    """The share of a chip one device is (1, or 1/2 for v4's per-core devices)."""
    return self.chips / len(self.devices)

  @property
  def peak_flops(self) -> float:
    return self.chip.peak_flops * self.per_device

  @property
  def hbm_bytes(self) -> float:
    return self.chip.hbm_bytes * self.per_device

  @property
  def hbm_bandwidth(self) -> float:
    return self.chip.hbm_bandwidth * self.per_device


def chip(generation: str) -> Chip:
  if generation not in CHIPS:
    raise ValueError(f"unknown TPU generation {generation!r}: use one of {', '.join(CHIPS)}")
  return CHIPS[generation]


def pod_slice(name: str) -> Slice:
  """The devices of slice `name` ("v5e:4x4"), from libtpu's topology description."""
  generation, _, shape = name.partition(":")
  spec = chip(generation)
  if not shape:
    raise ValueError(f"slice {name!r} has no shape: name one such as {generation}:{spec.slices[0]}, "
                     f"or pass --smallest to try {', '.join(spec.slices)} in turn")
  try:
    from jax.experimental import topologies  # noqa: PLC0415 - loads libtpu
    devices = topologies.get_topology_desc(topology_name=name, platform="tpu").devices
  except Exception as e:  # noqa: BLE001 - libtpu missing, held by another process, or a shape it refuses
    import importlib.util  # noqa: PLC0415
    fix = ("install the TPU compiler with `pip install -e .[tpu]`" if importlib.util.find_spec("libtpu") is None
           else "another process holds libtpu: set ALLOW_MULTIPLE_LIBTPU_LOAD=1 before jax starts"
           if "lockfile" in str(e) else f"use a shape of {', '.join(spec.slices)}")
    raise ValueError(f"cannot describe TPU slice {name!r} ({type(e).__name__}: {str(e)[:200]}): {fix}") from e
  chips = math.prod(int(n) for n in shape.split("x"))
  return Slice(name, spec, tuple(devices), chips, len({d.process_index for d in devices}))
