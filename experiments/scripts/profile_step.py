"""Where the JAX distillation step's time goes: wall time per step against the device's
busy time, and the kernels that take it (from a `jax.profiler` trace).

  python -m experiments.scripts.profile_step --mode gpu --config base-v1 --shape 256x128 --out DIR

Times `--steps` steps of the benchmark's JAX route (`minilm_jax.benchmark.harness.measure`), then traces
3 more with `jax.profiler.trace(create_perfetto_trace=True)` and sums the trace's device
events by name. Device busy time far below the wall time means the host is the bottleneck.
Writes DIR/profile-<config>-<shape>.json and the trace (perfetto_trace.json.gz) under DIR.
"""

import collections
import gzip
import json
import pathlib
import sys
import time

import jax
from absl import flags

from minilm_jax import cli_flags
from minilm_jax.benchmark import harness, jax_routes, main as benchmark_main, workloads


def summarize(trace_file: pathlib.Path, steps: int) -> dict:
  """Seconds per step of a perfetto trace: per (process, thread) track, the top events of
  the device's streams (kernels), and the top events of the host's Python thread."""
  events = json.loads(gzip.open(trace_file).read())
  events = events["traceEvents"] if isinstance(events, dict) else events
  meta = [e for e in events if e.get("ph") == "M"]
  procs = {e["pid"]: e["args"]["name"] for e in meta if e["name"] == "process_name"}
  threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in meta if e["name"] == "thread_name"}
  tracks, kernels, host = collections.Counter(), collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") != "X":
      continue
    proc, thread, sec = procs.get(e["pid"], "?"), threads.get((e["pid"], e.get("tid")), "?"), e.get("dur", 0) / 1e6 / steps
    tracks[f"{proc} | {thread}"] += sec
    if "/device:" in proc and thread.lower().startswith("stream"):
      kernels[e["name"][:120]] += sec
    if thread == "python":
      host[e["name"][:120]] += sec
  top = lambda c, n: [(k, round(v, 6)) for k, v in c.most_common(n)]
  return {"tracks_s_per_step": top(tracks, 30), "stream_kernels_s_per_step": top(kernels, 25),
          "host_python_s_per_step": top(host, 15)}


def main(argv=None):
  usage = ("usage: python -m experiments.scripts.profile_step [--mode gpu] [--config base-v1] "
           "[--shape 256x128] [--steps 10] [--out DIR] [--notrace]")

  def define(fv):
    flags.DEFINE_string("mode", "gpu", "the benchmark's workloads: gpu (real shapes) or cpu (tiny)",
                        flag_values=fv)
    flags.DEFINE_string("config", "base-v1", "the benchmark workload", flag_values=fv)
    flags.DEFINE_string("shape", "256x128", "batch x sequence", flag_values=fv)
    flags.DEFINE_integer("steps", 10, "timed steps", flag_values=fv)
    flags.DEFINE_string("out", "runs/profile", "where the profile and the trace go", flag_values=fv)
    flags.DEFINE_boolean("trace", True, "trace 3 more steps and sum the device events", flag_values=fv)

  a = cli_flags.parse("profile_step", sys.argv[1:] if argv is None else argv, define, usage)
  batch, seq = benchmark_main.parse_shape(a.shape)
  built = jax_routes.jax_route(workloads.workload(a.mode, a.config), batch, seq)
  timing = harness.measure(built, warmup=3, timed=a.steps)
  result = {"config": a.config, "batch": batch, "seq": seq, "device": jax.devices()[0].device_kind,
            "step_s_median": timing["step_time_s"], "step_s_min": timing["step_time_min_s"],
            "step_s_max": timing["step_time_max_s"]}
  out = pathlib.Path(a.out)
  if a.trace:
    with jax.profiler.trace(str(out / "trace"), create_perfetto_trace=True):
      t0 = time.perf_counter()
      for _ in range(3):
        built.sync(built.step())
      result["traced_wall_s_per_step"] = (time.perf_counter() - t0) / 3
    result |= summarize(next((out / "trace").rglob("perfetto_trace.json.gz")), 3)
  out.mkdir(parents=True, exist_ok=True)
  (out / f"profile-{a.config}-{batch}x{seq}.json").write_text(json.dumps(result, indent=1))
  print(json.dumps(result, indent=1)[:9000])


if __name__ == "__main__":
  main()
