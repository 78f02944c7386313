"""What the pre-emption vote of several processes costs per step (`preemption.Preemption`).

Each vote here is cast and read at once, so it waits for a whole one-number all-reduce:
an upper bound of what it adds to a step (in `distill.run` the vote read is one step old
and long computed; one process votes nothing, it reads its own flag).

    JAX_PLATFORMS=cpu python -m experiments.scripts.preemption_vote          # 1 process
    for i in 0 1; do JAX_PLATFORMS=cpu python -m experiments.scripts.preemption_vote \
        --coordinator localhost:12357 --processes 2 --process-id $i & done; wait
"""

import sys
import time

import jax
from absl import flags

from minilm_jax import cli_flags, sharding
from minilm_jax import preemption as preemption_lib


def main(argv=None):
  usage = ("usage: python -m experiments.scripts.preemption_vote "
           "[--coordinator HOST:PORT --processes N --process-id I]")

  def define(fv):
    flags.DEFINE_string("coordinator", None, "process 0's address; none: one process", flag_values=fv)
    flags.DEFINE_integer("processes", 1, "how many processes vote", flag_values=fv)
    flags.DEFINE_integer("process-id", 0, "this process's index", flag_values=fv)

  fv = cli_flags.parse("preemption_vote", sys.argv[1:] if argv is None else argv, define, usage)
  if fv.coordinator:
    jax.distributed.initialize(fv.coordinator, num_processes=fv.processes,
                               process_id=fv["process-id"].value)
  preemption = preemption_lib.Preemption(sharding.make_mesh())
  try:
    vote = lambda: bool(preemption._cast().addressable_data(0))  # pylint: disable=protected-access
    for _ in range(20):  # compile and warm up
      vote()
    calls = 500
    start = time.perf_counter()
    for _ in range(calls):
      vote()
    seconds = (time.perf_counter() - start) / calls
  finally:
    preemption.restore()
  if jax.process_index() == 0:
    print(f"{jax.process_count()} process(es), {jax.device_count()} device(s), "
          f"{jax.devices()[0].device_kind}: {seconds * 1e3:.3f} ms per vote, back to back")


if __name__ == "__main__":
  main()
