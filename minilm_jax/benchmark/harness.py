"""The timing harness: time a `Built`, measure the matmul peak, isolate each measurement in
its own subprocess (so memory peaks, OOMs and JAX's preallocation stay apart), and search
the largest batch that fits (doubling, then bisection)."""

import gc
import json
import math
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from minilm_jax.benchmark import jax_routes, torch_routes
from minilm_jax.benchmark.workloads import Built, Workload, workload


def measure(built: Built, warmup: int, timed: int) -> dict[str, Any]:
  """Times `timed` steps after `warmup` steps (the first compiles); median and spread."""
  t0 = time.perf_counter()
  loss = built.sync(built.step())
  first = time.perf_counter() - t0
  for _ in range(warmup - 1):
    loss = built.sync(built.step())
  times = []
  for _ in range(timed):
    t0 = time.perf_counter()
    loss = built.sync(built.step())
    times.append(time.perf_counter() - t0)
  return {"step_time_s": statistics.median(times), "step_time_min_s": min(times),
          "step_time_max_s": max(times), "first_step_s": first, "timed_steps": timed,
          "loss": loss, "peak_memory_bytes": built.peak_memory()}


def peak_matmul_flops(n: int, chain: int = 10, repeats: int = 5) -> float:
  """Measured bf16 FLOP/s of n x n x n `jnp.matmul`s: `chain` of them in one jit call (so one
  dispatch's host overhead, large under a sandboxed runtime, is shared), median of `repeats`.

  x <- x @ w with w ~ N(0, 1/n) keeps x at unit scale, so every product sees random data.
  """
  import jax
  import jax.numpy as jnp
  ka, kb = jax.random.split(jax.random.key(0))
  x = jax.random.normal(ka, (n, n), jnp.bfloat16)
  w = (jax.random.normal(kb, (n, n), jnp.float32) / math.sqrt(n)).astype(jnp.bfloat16)
  f = jax.jit(lambda x, w: jax.lax.fori_loop(0, chain, lambda _, x: x @ w, x))
  f(x, w).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(x, w).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * n ** 3 * chain / statistics.median(times)


def is_oom(e: BaseException) -> bool:
  """True for a device out-of-memory error of either framework."""
  text = f"{type(e).__name__}: {e}".lower()
  return any(s in text for s in ("out of memory", "outofmemory", "resource_exhausted", "resource exhausted"))


def largest_batch(fits: Callable[[int], bool], start: int, limit: int = 1 << 16) -> tuple[int, int | None]:
  """(largest batch that fits, smallest that failed): doubling from `start`, then
  bisection down to 1/8 of the answer (each probe may compile, so probes are few)."""
  lo, hi = 0, start
  while hi <= limit and fits(hi):
    lo, hi = hi, 2 * hi
  if hi > limit:
    return lo, None
  while hi - lo > max(1, lo // 8):
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if fits(mid) else (lo, mid)
  return lo, hi


ROUTE_BUILDERS: dict[str, Callable[[Workload, int, int], Built]] = {
    "jax": jax_routes.jax_route, "torch-eager": torch_routes.torch_eager_route,
    "torch-compiled": torch_routes.torch_compiled_route}


def best_routes(routes: Sequence[str]) -> list[str]:
  """Per framework, the fastest of `routes` by design: what the largest-batch search uses."""
  best = {}
  for r in sorted(routes, key=("torch-compiled", "jax", "torch-eager").index):
    best.setdefault(r.split("-")[0], r)
  return list(best.values())


# -------------------------------------------------------------------------- workers


def device_name() -> str:
  """Sanitised name of the device the routes run on: "cpu", "nvidia-h100", ..."""
  import jax
  words = re.findall(r"[a-z0-9]+", jax.devices()[0].device_kind.lower())
  words = words[:next((i for i, x in enumerate(words) if re.fullmatch(r"\d+gb|sxm\d*|pcie|hbm\d*e?", x)), len(words))]
  return "-".join(words) or "unknown"


def work(spec: dict) -> dict:
  """One unit of work, in this process: "peak", "step" (a measurement) or "fits"."""
  if spec["kind"] == "peak":
    return {"device": device_name(), "peak_flops": peak_matmul_flops(spec["n"])}
  w = workload(spec["mode"], spec["config"])
  route = ROUTE_BUILDERS[spec["route"]]
  try:
    built = route(w, spec["batch"], spec["seq"])
    if spec["kind"] == "fits":
      built.sync(built.step())
      return {"fits": math.isfinite(built.sync(built.step()))}
    return measure(built, spec["warmup"], spec["timed"])
  except Exception as e:  # noqa: BLE001 - an OOM (or any failure) becomes a row, not a crash
    if spec["kind"] == "fits" and is_oom(e):
      return {"fits": False}
    return {"error": f"{type(e).__name__}: {str(e)[:500]}"}
  finally:
    built = None
    gc.collect()


RESULT_MARK = "BENCHMARK_RESULT "


def run_work(spec: dict, isolate: bool, timeout: float | None = None) -> dict:
  """`work(spec)` in this process, or in a fresh `python -m minilm_jax.benchmark` worker."""
  if not isolate:
    return work(spec)
  cmd = [sys.executable, "-m", "minilm_jax.benchmark", "--worker", json.dumps(spec)]
  try:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout} s"}
  for line in reversed(done.stdout.splitlines()):
    if line.startswith(RESULT_MARK):
      return json.loads(line[len(RESULT_MARK):])
  if spec["kind"] == "fits" and is_oom(RuntimeError(done.stderr[-4000:])):
    return {"fits": False}
  return {"error": f"worker exited {done.returncode}: {done.stderr[-500:]}"}
