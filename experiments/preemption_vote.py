"""What the pre-emption vote of several processes costs per step (`preemption.Preemption`).

Each vote here is cast and read at once, so it waits for a whole one-number all-reduce:
an upper bound of what it adds to a step (in `distill.run` the vote read is one step old
and long computed; one process votes nothing, it reads its own flag).

    JAX_PLATFORMS=cpu python experiments/preemption_vote.py                       # 1 process
    for i in 0 1; do JAX_PLATFORMS=cpu python experiments/preemption_vote.py localhost:12357 2 $i & done; wait
"""

import sys
import time

import jax

from minilm_jax import preemption as preemption_lib, sharding


def main(argv):
  if argv:
    address, processes, index = argv
    jax.distributed.initialize(address, num_processes=int(processes), process_id=int(index))
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
  main(sys.argv[1:])
