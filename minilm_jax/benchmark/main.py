"""`run`: every (config, shape, route) of a mode, rows appended as they come; and the
command line, `python -m minilm_jax benchmark` / `python experiments/benchmark.py`."""

import argparse
import datetime
import json
import pathlib
from collections.abc import Sequence

from minilm_jax import benchmark
from minilm_jax.benchmark import harness, report
from minilm_jax.benchmark.workloads import MODES, ROUTES, workload


def run(mode: str = "cpu", routes: Sequence[str] = ROUTES, configs: Sequence[str] | None = None,
        shapes: Sequence[tuple[int, int]] | None = None, out_dir: str | pathlib.Path = "experiments/results",
        max_batch: bool = False, isolate: bool | None = None, timed: int | None = None,
        timeout: float | None = None) -> list[dict]:
  """Measures every (config, shape, route); appends JSON rows, rewrites the markdown table.

  Returns this run's rows. `isolate` (default: on in gpu mode) runs each measurement in a
  fresh subprocess, `timeout` bounds each one; `max_batch` adds the largest-batch search
  at the mode's longest seq for the best of `routes` of each framework (`shapes=[]`: only that).
  """
  m = MODES[mode]
  if bad := [r for r in routes if r not in ROUTES]:
    raise ValueError(f"unknown routes {bad}: choose from {', '.join(ROUTES)}")
  works = [workload(mode, c) for c in configs] if configs else list(m.workloads)
  isolate = m.isolate if isolate is None else isolate
  # The peak always runs in its own process: in-process XLA CPU threads would slow the
  # PyTorch routes that follow (which is also why those run before the JAX route).
  peak = harness.run_work({"kind": "peak", "n": m.peak_n}, True, timeout)
  if "error" in peak:
    raise RuntimeError(f"measuring the matmul peak failed: {peak['error']}")
  common = {"mode": mode, "device": peak["device"], "peak_flops": peak["peak_flops"], "versions": report.versions(),
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  jsonl = out / f"benchmark-{peak['device']}.jsonl"
  rows = []

  def emit(row):
    rows.append(row)
    with jsonl.open("a") as f:
      f.write(json.dumps(row) + "\n")
    print(json.dumps({k: row.get(k) for k in ("route", "config", "batch", "seq", "step_time_s", "mfu",
                                              "max_batch", "error") if k in row}), flush=True)

  shapes = m.shapes if shapes is None else shapes
  pairs = sorted(((w, shape) for w in works for shape in shapes),  # the mode's `first` first, stably
                 key=lambda p: m.first.index((p[0].name, p[1])) if (p[0].name, p[1]) in m.first else len(m.first))
  if isolate:  # workload by workload, the JAX route first: a run cut short keeps whole comparisons
    units = [(w, shape, r) for w, shape in pairs for r in sorted(routes, key=ROUTES.index)]
  else:  # route by route, JAX last (its in-process XLA threads would slow the PyTorch routes)
    units = [(w, shape, r) for r in sorted(routes, key=lambda r: r == "jax") for w, shape in pairs]
  for w, (batch, seq), route in units:
    spec = {"kind": "step", "mode": mode, "config": w.name, "route": route, "batch": batch, "seq": seq,
            "warmup": m.warmup, "timed": timed or m.timed}
    emit(report.step_row(common, w, batch, seq, route, harness.run_work(spec, isolate, timeout)))
  if max_batch:
    seq = max(s for _, s in m.shapes)
    for w in works:
      for route in harness.best_routes(routes):
        spec = {"kind": "fits", "mode": mode, "config": w.name, "route": route, "seq": seq}
        probes = []
        def fits(batch):
          probes.append(batch)
          result = harness.run_work(spec | {"batch": batch}, isolate, timeout)
          if "error" in result:
            raise RuntimeError(f"{route} {w.name} batch {batch}: {result['error']}")
          return result["fits"]
        try:
          found, fails_at = harness.largest_batch(fits, m.max_batch_start, m.max_batch_limit)
          result = {"max_batch": found, "fails_at": fails_at}
        except RuntimeError as e:
          result = {"error": str(e)[:500]}
        emit(common | {"kind": "max_batch", "route": route, "framework": route.split("-")[0],
                       "config": w.name, "seq": seq, "probes": probes} | result)
  print(report.write_table(jsonl, mode))
  return rows


def parse_shape(text: str) -> tuple[int, int]:
  batch, _, seq = text.partition("x")
  if not (batch.isdigit() and seq.isdigit()):
    raise argparse.ArgumentTypeError(f"shape {text!r} is not BATCHxSEQ, e.g. 256x128")
  return int(batch), int(seq)


def main(argv: Sequence[str] | None = None) -> list[dict]:
  """`python -m minilm_jax benchmark` / `python experiments/benchmark.py`."""
  p = argparse.ArgumentParser(prog="benchmark", description=benchmark.__doc__.split("\n")[0])
  p.add_argument("--mode", choices=sorted(MODES), default="cpu", help="cpu: tiny, seconds; gpu: the real workload")
  p.add_argument("--routes", default=",".join(ROUTES), help=f"comma list of {', '.join(ROUTES)}")
  p.add_argument("--configs", help="comma list of workload names (default: all of the mode)")
  p.add_argument("--shapes", help="comma list of BATCHxSEQ (default: the mode's)")
  p.add_argument("--out-dir", default="experiments/results", help="where the .jsonl and .md go")
  p.add_argument("--max-batch", action="store_true", help="also search the largest batch at the longest seq")
  p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                 help="one subprocess per measurement (default: on in gpu mode)")
  p.add_argument("--timed", type=int, help="timed steps per measurement (default: the mode's)")
  p.add_argument("--timeout", type=float, help="seconds allowed per measurement subprocess")
  p.add_argument("--table", metavar="JSONL", help="only rewrite the markdown table of these rows")
  a = p.parse_args(argv)
  if a.table:
    print(report.write_table(a.table, a.mode))
    return []
  return run(a.mode, a.routes.split(","), a.configs.split(",") if a.configs else None,
             [parse_shape(s) for s in a.shapes.split(",")] if a.shapes else None, a.out_dir, a.max_batch,
             a.isolate, a.timed, a.timeout)
