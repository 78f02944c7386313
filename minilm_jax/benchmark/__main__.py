"""`python -m minilm_jax.benchmark --worker SPEC`: one measurement in `harness.run_work`'s
subprocess, its result printed after `harness.RESULT_MARK`. The command is
`python -m minilm_jax benchmark`."""

import json
import sys

from minilm_jax.benchmark import harness

if sys.argv[1:2] != ["--worker"] or len(sys.argv) != 3:
  sys.exit("usage: python -m minilm_jax.benchmark --worker SPEC (one measurement of a benchmark "
           "run); to benchmark, run python -m minilm_jax benchmark")
print(harness.RESULT_MARK + json.dumps(harness.work(json.loads(sys.argv[2]))), flush=True)
