"""`run`: every (config, shape, route) of a mode, rows appended as they come; and the
command line, `python -m minilm_jax benchmark`."""

import datetime
import json
import pathlib
import sys
from collections.abc import Sequence

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
        emit(common | _largest_batch(mode, w.name, route, seq, isolate, timeout))
  print(report.write_table(jsonl, mode))
  return rows


def _largest_batch(mode: str, config: str, route: str, seq: int, isolate: bool,
                   timeout: float | None) -> dict:
  """The largest batch of `config` at `seq` that fits `route`, and the probes that found it."""
  m = MODES[mode]
  spec = {"kind": "fits", "mode": mode, "config": config, "route": route, "seq": seq}
  probes = []

  def fits(batch):
    probes.append(batch)
    result = harness.run_work(spec | {"batch": batch}, isolate, timeout)
    if "error" in result:
      raise RuntimeError(f"{route} {config} batch {batch}: {result['error']}")
    return result["fits"]

  try:
    found, fails_at = harness.largest_batch(fits, m.max_batch_start, m.max_batch_limit)
    result = {"max_batch": found, "fails_at": fails_at}
  except RuntimeError as e:
    result = {"error": str(e)[:500]}
  return {"kind": "max_batch", "route": route, "framework": route.split("-")[0],
          "config": config, "seq": seq, "probes": probes} | result


def parse_shape(text: str) -> tuple[int, int]:
  batch, _, seq = text.partition("x")
  if not (batch.isdigit() and seq.isdigit()):
    raise ValueError(f"shape {text!r} is not BATCHxSEQ, e.g. 256x128")
  return int(batch), int(seq)


def main(argv: Sequence[str] | None = None) -> list[dict]:
  """`python -m minilm_jax benchmark`, flags read as
  every command's (`cli_flags.parse`)."""
  from absl import flags
  from minilm_jax import cli_flags
  usage = ("usage: python -m minilm_jax benchmark [--mode cpu|gpu] [--routes R,...] [--configs C,...] "
           "[--shapes BxS,...] [--out-dir DIR] [--max-batch] [--[no]isolate] [--timed N] "
           "[--timeout S] [--table JSONL]")

  def define(fv):
    flags.DEFINE_enum("mode", "cpu", sorted(MODES), "cpu: tiny, seconds; gpu: the real workload",
                      flag_values=fv)
    flags.DEFINE_list("routes", list(ROUTES), f"comma list of {', '.join(ROUTES)}", flag_values=fv)
    flags.DEFINE_list("configs", None, "comma list of workload names (default: all of the mode)",
                      flag_values=fv)
    flags.DEFINE_list("shapes", None, "comma list of BATCHxSEQ (default: the mode's)", flag_values=fv)
    flags.DEFINE_string("out-dir", "experiments/results", "where the .jsonl and .md go", flag_values=fv)
    flags.DEFINE_bool("max-batch", False, "also search the largest batch at the longest seq",
                      flag_values=fv)
    flags.DEFINE_bool("isolate", None, "one subprocess per measurement (default: on in gpu mode)",
                      flag_values=fv)
    flags.DEFINE_integer("timed", None, "timed steps per measurement (default: the mode's)",
                         flag_values=fv)
    flags.DEFINE_float("timeout", None, "seconds allowed per measurement subprocess", flag_values=fv)
    flags.DEFINE_string("table", None, "only rewrite the markdown table of these rows (a .jsonl)",
                        flag_values=fv)

  argv = sys.argv[1:] if argv is None else list(argv)
  fv = cli_flags.parse("benchmark", argv, define, usage)
  if fv.table:
    print(report.write_table(fv.table, fv.mode))
    return []
  try:
    shapes = [parse_shape(s) for s in fv.shapes] if fv.shapes else None
  except ValueError as e:
    raise SystemExit(f"error: {e}\n{usage}") from e
  return run(fv.mode, fv.routes, fv.configs, shapes, fv["out-dir"].value, fv["max-batch"].value,
             fv.isolate, fv.timed, fv.timeout)
