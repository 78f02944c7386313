"""Digests of saved checkpoint steps: what was saved is what is read back.

At save, process 0 records a SHA-256 of each item of a step (`digest`: parameters,
optimizer state, step and PRNG key, data iterator state) in `digests.json` beside the
steps; a restore recomputes them from what it read and refuses a step whose bytes changed
since (damaged storage, a torn copy, an edit). Hashing the restored host arrays costs one
pass over the state, and gives the same digest on every process and topology.
"""

import hashlib
import json
import logging
import pathlib
from typing import Any

import jax
import numpy as np

from minilm_jax import atomic

FILE = "digests.json"  # {step: {item: SHA-256 of what was saved}}


class DamagedStep(ValueError):
  """A saved step whose contents cannot be trusted: the message names it, the caller the fix."""


def digest(tree: Any) -> str:
  """SHA-256 of a pytree as saved: each leaf's key path, dtype, shape and bytes, leaves in
  the order of their key paths, read on the host (a replicated array's local copy).

  Deterministic across processes and topologies, and the same for an `nnx.State` and the
  tree Orbax restores it as. Strings, ints and the like (a data iterator state) are hashed
  by their JSON text.
  """
  h = hashlib.sha256()
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  names = ["/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
           for path, _ in leaves]
  for name, (_, leaf) in sorted(zip(names, leaves), key=lambda x: x[0]):
    if isinstance(leaf, jax.Array):
      leaf = leaf.addressable_data(0)
    if isinstance(leaf, (np.ndarray, np.generic, jax.Array)):
      leaf = np.ascontiguousarray(leaf)
      h.update(f"{name}:{leaf.dtype}{leaf.shape}:".encode())
      h.update(leaf.tobytes())
    else:
      h.update(f"{name}:{json.dumps(leaf)}:".encode())
  return h.hexdigest()


def record(directory: pathlib.Path, step: int, items: dict, *, keep=()) -> None:
  """Records `step`'s item digests in `directory/digests.json` (process 0, written whole),
  keeping those of the steps in `keep` and of later ones (saves still in flight)."""
  path = directory / FILE
  try:
    old = json.loads(path.read_text()) if path.is_file() else {}
  except ValueError:  # damaged: the steps it held are read unverified, with a warning
    old = {}
  kept = {k: v for k, v in old.items() if int(k) in keep or int(k) > max(keep, default=-1)}
  kept[str(step)] = {name: digest(tree) for name, tree in items.items()}
  atomic.write_file(path, json.dumps(kept, indent=1, sort_keys=True) + "\n")


def verify(directory: pathlib.Path, step: int, items: dict) -> None:
  """Raises `DamagedStep` if any of `items` (read back from `step`) differs from its digest
  at save. A step saved without digests is read with a warning."""
  path = directory / FILE
  try:
    saved = json.loads(path.read_text()).get(str(step)) if path.is_file() else None
  except ValueError as e:
    raise DamagedStep(f"{path} is damaged ({e}), so step {step} cannot be verified") from e
  if saved is None:
    logging.warning("%s/%d has no digest in %s (saved before digests were kept): its contents "
                    "are not verified", directory, step, FILE)
    return
  changed = [name for name, tree in items.items() if name in saved and digest(tree) != saved[name]]
  if changed:
    raise DamagedStep(f"checkpoint {directory}/{step} does not match what was saved: its "
                      f"{' and '.join(changed)} changed on disk since (damaged storage or an edit)")
