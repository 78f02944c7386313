"""The report: a measurement -> one JSON row with its rates; rows -> the markdown table."""

import json
import math
import pathlib
from collections.abc import Sequence

from minilm_jax.benchmark.workloads import DROPOUT, ROUTES, Workload, step_flops


def versions() -> dict[str, str]:
  import importlib.metadata as md
  out = {}
  for name in ("jax", "jaxlib", "flax", "optax", "torch", "transformers"):
    try:
      out[name] = md.version(name)
    except md.PackageNotFoundError:
      pass
  return out


def step_row(common: dict, w: Workload, batch: int, seq: int, route: str, result: dict) -> dict:
  """One measurement as a JSON-ready row: the result plus the rates derived from it."""
  flops = step_flops(w, batch, seq)
  row = common | {"kind": "step", "route": route, "framework": route.split("-")[0],
                  "config": w.name, "version": w.version, "relation_heads": w.relation_heads,
                  "attention_dropout": w.attention_dropout,
                  "teacher": w.teacher.name, "teacher_layer": w.teacher_layer, "student": w.student.name,
                  "batch": batch, "seq": seq, "model_flops": flops["total"]} | result
  loss = row.get("loss")
  if loss is not None and not math.isfinite(loss):
    row["loss"], row["error"] = None, row.get("error") or f"non-finite loss {loss}"
  if "step_time_s" in row:
    t = row["step_time_s"]
    row |= {"tokens_per_s": batch * seq / t, "examples_per_s": batch / t,
            "model_tflops_per_s": flops["total"] / t / 1e12,
            "mfu": flops["total"] / t / row["peak_flops"]}
  return row


def markdown(rows: Sequence[dict]) -> str:
  """Tables of the latest row per (route, config, shape): steps, then largest batches."""
  latest = {}
  for r in rows:
    latest[(r["kind"], r["mode"], r["route"], r["config"], r.get("batch"), r["seq"])] = r
  steps = sorted((r for r in latest.values() if r["kind"] == "step"),
                 key=lambda r: (r["config"], -r["batch"], r["seq"], ROUTES.index(r["route"])))
  # Speed relative to the best PyTorch route (the yardstick): its step time / this one's.
  best_torch = {(r["config"], r["batch"], r["seq"]): r.get("step_time_s") for r in steps
                if r["route"] == "torch-compiled"}
  lines = ["| config | teacher -> student | B x T | route | step ms | tokens/s | TFLOP/s | MFU "
           "| peak GiB | vs torch-compiled | loss |", "|" + "---|" * 11]
  for r in steps:
    name = (f"{r['config']} | {r['teacher']}@{r['teacher_layer']} -> {r['student']} {r['version']} "
            f"R{r['relation_heads']} attn-drop {r.get('attention_dropout', DROPOUT):g}")
    if "error" in r:
      lines.append(f"| {name} | {r['batch']}x{r['seq']} | {r['route']} | error: {r['error'][:80]} |||||||")
      continue
    t, base, mem = r["step_time_s"], best_torch.get((r["config"], r["batch"], r["seq"])), r.get("peak_memory_bytes")
    lines.append(
        f"| {name} | {r['batch']}x{r['seq']} | {r['route']} | {t * 1e3:.2f} | {r['tokens_per_s']:,.0f} "
        f"| {r['model_tflops_per_s']:.3g} | {r['mfu']:.1%} | {'-' if mem is None else f'{mem / 2**30:.2f}'} "
        f"| {'-' if not base else f'{base / t:.2f}x'} | {r['loss']:.4f} |")
  fits = [r for r in latest.values() if r["kind"] == "max_batch"]
  if fits:
    lines += ["", "| config | seq | route | largest batch | fails at |", "|---|---|---|---|---|"]
    lines += [f"| {r['config']} | {r['seq']} | {r['route']} | {r.get('max_batch', r.get('error'))} "
              f"| {r.get('fails_at') or '-'} |" for r in sorted(fits, key=lambda r: (r["config"], r["route"]))]
  peak = next((r["peak_flops"] for r in reversed(rows)), None)
  head = f"Device {rows[-1]['device']}, measured bf16 matmul peak {peak / 1e12:.3g} TFLOP/s.\n\n" if rows else ""
  return head + "\n".join(lines) + "\n"


def write_table(jsonl: str | pathlib.Path, mode: str) -> str:
  """Writes the markdown table of `jsonl`'s rows of `mode` beside it (benchmark-<device>.md)
  and returns it; `--table` runs this alone, e.g. on the rows of a run cut short."""
  jsonl = pathlib.Path(jsonl)
  rows = [r for r in map(json.loads, jsonl.read_text().splitlines()) if r["mode"] == mode]
  if not rows:
    raise ValueError(f"{jsonl} has no rows of --mode {mode}")
  table = markdown(rows)
  jsonl.with_suffix(".md").write_text(f"# Distillation step benchmark ({mode} mode)\n\n{MODEL_FLOPS_NOTE}\n\n{table}")
  return table


MODEL_FLOPS_NOTE = ("Model FLOPs = teacher forward to the distilled q/k/v + 3 x student forward to its last "
                    "q/k/v + relation matmuls (matmuls only; see `minilm_jax/benchmark/workloads.py`). MFU = model "
                    "FLOPs / step time / measured bf16 matmul peak. Step time = median of timed steps.")
