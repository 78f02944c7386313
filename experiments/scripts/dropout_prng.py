"""Step time of the JAX distillation step by dropout PRNG implementation (`dropout_prng`).

  python -m experiments.scripts.dropout_prng [--impls threefry2x32,rbg,philox4x32] [--shape 16x128]

The demo's shapes with random weights (teacher L6-H384, 12 heads, layer 6; student L3-H384; v1,
float32 on CPU, bfloat16 elsewhere), hidden and attention dropout 0.1, one device; the median of
`--timed` steps after 3 untimed ones (`minilm_jax.benchmark.harness.measure`), one process per run.
"""

import json
import subprocess
import sys

from absl import flags

from minilm_jax import cli_flags

ONE = r"""
import json, sys
import jax
from minilm_jax import config as config_lib
from minilm_jax.benchmark import harness, jax_routes, workloads as wl
batch, seq = map(int, sys.argv[2].split("x"))
w = wl.Workload("demo", wl.L6_H384, wl.Bert(3, 384, 12, 1536), 6, "v1", 12)
if jax.default_backend() == "cpu":  # the benchmark's JAX route is bf16; a CPU trains in float32
  setup = jax_routes.jax_setup
  jax_routes.jax_setup = lambda w, batch, seq, dtype="float32": setup(w, batch, seq, dtype)
make_config = config_lib.DistillConfig
config_lib.DistillConfig = lambda **kw: make_config(**kw, dropout_prng=sys.argv[1])
built = jax_routes.jax_route(w, batch, seq)
print(json.dumps({"impl": sys.argv[1], "device": jax.devices()[0].device_kind,
                  **harness.measure(built, warmup=3, timed=int(sys.argv[3]))}))
"""


def main(argv=None):
  usage = "usage: python -m experiments.scripts.dropout_prng [--impls A,B] [--shape BxT] [--timed N]"

  def define(fv):
    flags.DEFINE_string("impls", "threefry2x32,rbg,philox4x32", "jax.random implementations, in order",
                        flag_values=fv)
    flags.DEFINE_string("shape", "16x128", "batch x sequence", flag_values=fv)
    flags.DEFINE_integer("timed", 10, "timed steps per run (the median is reported)", flag_values=fv)

  a = cli_flags.parse("dropout_prng", sys.argv[1:] if argv is None else argv, define, usage)
  for impl in a.impls.split(","):
    done = subprocess.run([sys.executable, "-c", ONE, impl, a.shape, str(a.timed)], capture_output=True, text=True)
    line = done.stdout.strip().splitlines()[-1] if done.returncode == 0 else json.dumps(
        {"impl": impl, "error": done.stderr.strip().splitlines()[-1][:300]})
    print(line, flush=True)


if __name__ == "__main__":
  main()
