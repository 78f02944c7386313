"""Pre-emption: SIGTERM on any process stops every process after the same step.

A run asked to stop saves that step and exits with `PREEMPTED_EXIT_CODE`; the same command
resumes it.
"""

import logging
import signal

import jax
import jax.numpy as jnp
import numpy as np

from minilm_jax import sharding

# Exit status of a run that SIGTERM stopped after saving: EX_TEMPFAIL of sysexits.h ("try
# again"), so a scheduler never reads a pre-empted run as finished; the same command resumes.
PREEMPTED_EXIT_CODE = 75


class Preemption:
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
