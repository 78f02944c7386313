"""Joining the processes of a run (`jax.distributed.initialize`) within a stated time.

`jax.distributed.initialize` returns once every process has registered with the coordinator
that process 0 serves; when one never starts, it waits its `initialization_timeout` in
silence and then the runtime aborts from C++ ("another task died"). `join` bounds the wait
itself: a watchdog thread (the wait releases the GIL) ends the process at `timeout_s` with
one line naming the coordinator, the process count and the processes missing, as far as
they can be known: JAX does not say which processes registered, so a process names the
others when they are one, and the others that are not the coordinator when a probe finds
the coordinator's port open.
"""

import os
import socket
import sys
import threading

import jax

# sysexits' EX_UNAVAILABLE: a peer never came, unlike a crash (1) or a pre-emption (75).
JOIN_FAILED_EXIT_CODE = 69
_JAX_GRACE_S = 30  # JAX's own deadline lies past ours, so ours reports first


def join(coordinator_address: str | None = None, num_processes: int | None = None,
         process_id: int | None = None, *, timeout_s: int, **kwargs) -> None:
  """`jax.distributed.initialize(...)`, or exit `JOIN_FAILED_EXIT_CODE` after `timeout_s` seconds."""
  joined = threading.Event()

  def watch():
    if not joined.wait(timeout_s):
      up = coordinator_reachable(coordinator_address) if process_id else None
      message = not_joined(coordinator_address, num_processes, process_id, timeout_s, up)
      sys.stderr.write(f"error: {message}\n")
      sys.stderr.flush()
      os._exit(JOIN_FAILED_EXIT_CODE)  # the main thread is inside the runtime's wait

  print(f"process {_or(process_id)} of {_or(num_processes)}: joining the coordinator at "
        f"{_or(coordinator_address)} (up to {timeout_s} s, --join-timeout)", file=sys.stderr, flush=True)
  threading.Thread(target=watch, daemon=True).start()
  jax.distributed.initialize(coordinator_address, num_processes, process_id,
                             initialization_timeout=timeout_s + _JAX_GRACE_S, **kwargs)
  joined.set()


def not_joined(address: str | None, num_processes: int | None, process_id: int | None,
               timeout_s: int, coordinator_up: bool | None) -> str:
  """The one line a process that waited `timeout_s` for its peers in vain ends with."""
  head = (f"process {_or(process_id)} waited {timeout_s} s at the coordinator {_or(address)}, "
          f"but the run's {_or(num_processes)} processes did not all join: ")
  fix = ("start every process with the same --coordinator-address and --num-processes and its own "
         "--process-id (or raise --join-timeout when hosts start slowly)")
  if coordinator_up is False:
    return head + (f"process 0, the coordinator, is not reachable at {address} (nothing accepts "
                   f"connections there): start it, or check the address and the firewall; {fix}")
  if num_processes is None or process_id is None:
    return head + f"JAX does not say which are missing; {fix}"
  others = [i for i in range(num_processes) if i not in (process_id, 0 if coordinator_up else None)]
  if not others:
    return head + (f"the coordinator at {address} answers but did not admit this process: it may "
                   f"serve another run, or one with another process count; {fix}")
  missing = (f"process {others[0]} never joined" if len(others) == 1 else
             f"one or more of processes {', '.join(map(str, others))} never joined (JAX does not "
             "say which; each process logs 'joining' when it starts)")
  return head + f"{missing}; {fix}"


def coordinator_reachable(address: str | None) -> bool | None:
  """Whether something accepts TCP connections at HOST:PORT (None: no address known)."""
  if not address:
    return None
  host, _, port = address.rpartition(":")
  try:
    with socket.create_connection((host.strip("[]"), int(port)), timeout=5):
      return True
  except (OSError, ValueError):
    return False


def _or(value) -> str:
  return "?" if value is None else str(value)
