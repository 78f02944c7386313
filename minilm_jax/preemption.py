"""Pre-emption and Ctrl-C: SIGTERM or SIGINT on any process stops every process after the
same step.

A run asked to stop saves that step and exits with the signal's code in `EXIT_CODES` (75
for SIGTERM, 130 for SIGINT); the same command resumes it. A second Ctrl-C ends the
process at once, unsaved (the last checkpoint stays; the next run cleans what it left).
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
# ... and of one that Ctrl-C stopped: 128 + SIGINT, what a shell reports for a Ctrl-C'd command.
INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT
EXIT_CODES = {"SIGTERM": PREEMPTED_EXIT_CODE, "SIGINT": INTERRUPTED_EXIT_CODE}


class Preemption:
  """SIGTERM or SIGINT on any process stops every process after the same step.

  The handler only records this process's signal; one process stops on it at once. Several
  vote after each step: a `max` over one signal number per device, a tiny all-reduce queued
  behind the step and read one step later (so it stalls nothing). Every process reads the
  same vote after the same step, so all save that step and exit together, with the same
  code (SIGTERM, pre-emption, outranks a Ctrl-C). Each host checking its own flag instead
  let one wait in Orbax's save barrier while the others waited in the next step's
  all-reduce: a deadlock.
  """

  def __init__(self, mesh):
    self.signum = 0  # the signal this process received (SIGTERM outranks SIGINT); 0: none
    self._mesh = mesh
    self._any = jax.jit(jnp.max, out_shardings=sharding.replicated(mesh))
    self._vote = None  # the last step's vote, read at the next step
    self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

  def _handle(self, signum, frame):
    if signum == signal.SIGINT:
      signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C ends the process at once
      logging.warning("Ctrl-C: every process will save the same step and exit (Ctrl-C again "
                      "to abort at once, without saving)")
    else:
      logging.warning("SIGTERM: every process will save the same step and exit")
    self.signum = max(self.signum, signum)

  def agreed(self) -> str | None:
    """After a step: the signal on which every process stops now (the vote cast after the
    previous step), "SIGTERM" or "SIGINT"; None to go on."""
    if jax.process_count() == 1:
      return _name(self.signum)
    previous, self._vote = self._vote, self._cast()
    return None if previous is None else _name(int(previous.addressable_data(0)))

  def _cast(self) -> jax.Array:
    flags = np.full(len(self._mesh.local_devices), self.signum, np.int32)
    return self._any(jax.make_array_from_process_local_data(sharding.batch_sharded(self._mesh),
                                                            flags))

  def any_requested(self) -> str | None:
    """At the end of a run: the signal any process got (a vote read at once), or None."""
    if jax.process_count() == 1:
      return _name(self.signum)
    return _name(int(self._cast().addressable_data(0)))

  def restore(self):
    for s, handler in self._previous.items():
      signal.signal(s, handler)


def _name(signum: int) -> str | None:
  return signal.Signals(signum).name if signum else None
