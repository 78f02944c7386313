"""`python -m minilm_jax.benchmark`: the command line, or (`--worker SPEC`) one measurement
of `harness.run_work`'s subprocess, its result printed after `harness.RESULT_MARK`."""

import json
import sys

from minilm_jax.benchmark import harness, main

if sys.argv[1:2] == ["--worker"]:
  print(harness.RESULT_MARK + json.dumps(harness.work(json.loads(sys.argv[2]))), flush=True)
else:
  main.main(sys.argv[1:])
