"""Compile rows as people read them: a line per row, markdown tables, and the results page
(`experiments/results/tpu-compile.md`) from the rows before and after a change."""

import json
import pathlib
from collections.abc import Sequence

from minilm_jax.aot import chips
from minilm_jax.aot.step import moved_bytes, roofline

GIB = 2**30


def read(path: str | pathlib.Path) -> list[dict]:
  path = pathlib.Path(path)
  return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def _mfu(row: dict, key: str = "mfu_bound") -> str:
  """An MFU bound as a percentage: XLA's bytes' (`mfu_bound`) or HBM traffic's
  (`hbm_traffic_mfu_bound`; "-" for a row compiled before it was counted)."""
  return "-" if row.get(key) is None else f"{100 * row[key]:.0f}%"


def _traffic(row: dict) -> str:
  return "-" if "hbm_traffic" not in row else f"{row['hbm_traffic'] / 1e9:.1f}"


def line(row: dict) -> str:
  """One row as a line of text: what a person reads first."""
  if "out_of_memory" in row:
    oom = row["out_of_memory"]
    return (f"{row['config']}{':' + row['stage'] if row['stage'] else ''} on {row['slice']} "
            f"({row['devices']} devices, {row['hosts']} hosts), {row['batch_per_device']} x {row['seq']} "
            f"per device: DOES NOT FIT, the compiler needs {oom['temporaries'] / GIB:.2f} GiB of "
            f"temporaries and has {oom['available'] / GIB:.2f} GiB of HBM; {row['compile_seconds']:.0f} s")
  hbm = row["hbm"]
  return (f"{row['config']}{':' + row['stage'] if row['stage'] else ''} on {row['slice']} "
          f"({row['devices']} devices, {row['hosts']} hosts), {row['batch_per_device']} x {row['seq']} "
          f"per device: HBM {hbm['total'] / GIB:.2f} of {row['capacity'] / GIB:.0f} GiB "
          f"({'fits' if row['fits'] else 'DOES NOT FIT'}), FLOP time {1e3 * row['flop_time']:.1f} ms, "
          f"byte time {1e3 * row['byte_time']:.1f} ms, <= {row['tokens_per_sec_bound']:,.0f} tokens/s/device, "
          f"MFU <= {_mfu(row)}"
          + (f" (HBM traffic alone: {1e3 * row['hbm_traffic_time']:.1f} ms, MFU <= "
             f"{_mfu(row, 'hbm_traffic_mfu_bound')})" if "hbm_traffic_time" in row else "")
          + f"; compiled in {row['compile_seconds']:.0f} s"
          + (f", loops x{row['loops']} counted unrolled" if row.get("counted") == "unrolled" else ""))


def table(rows: Sequence[dict]) -> str:
  """Every field of `rows` that a reader compares, one row each."""
  head = ("| config | stage | slice | chips / hosts | batch x seq per device | attn dropout | dropout keys | HBM GiB "
          "(args / temp / total of capacity) | fits | XLA TFLOP | model TFLOP | GB accessed | FLOP ms | "
          "byte ms | tokens/s/device bound | MFU bound | HBM traffic GB | MFU bound on HBM traffic | collectives | "
          "compile s |")
  out = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in rows:
    if "out_of_memory" in r:
      out.append(f"| {r['config']} | {r['stage'] or '-'} | {r['slice']} | {r['chips']} / {r['hosts']} | "
                 f"{r['batch_per_device']} x {r['seq']} | {r['student_attention_dropout']:g} | {r['dropout_prng']} | needs "
                 f"{r['out_of_memory']['temporaries'] / GIB:.1f} of temporaries, {r['capacity'] / GIB:.2f} "
                 f"available | no |" + " - |" * 10 + f" {r['compile_seconds']:.0f} |")
      continue
    hbm = r["hbm"]
    collectives = ", ".join(f"{k} x{v}" for k, v in r["collectives"].items()) or "none"
    model = "-" if r["model_flops"] is None else f"{r['model_flops'] / 1e12:.2f}"
    out.append(
        f"| {r['config']} | {r['stage'] or '-'} | {r['slice']} | {r['chips']} / {r['hosts']} | "
        f"{r['batch_per_device']} x {r['seq']} | {r['student_attention_dropout']:g} | {r['dropout_prng']} | "
        f"{hbm['arguments'] / GIB:.2f} / {hbm['temporaries'] / GIB:.2f} / {hbm['total'] / GIB:.2f} of "
        f"{r['capacity'] / GIB:.0f} | {'yes' if r['fits'] else 'no'} | {r['xla_flops'] / 1e12:.2f} | {model} | "
        f"{r['bytes_accessed'] / 1e9:.1f} | {1e3 * r['flop_time']:.1f} | {1e3 * r['byte_time']:.1f} | "
        f"{r['tokens_per_sec_bound']:,.0f} | {_mfu(r)} | {_traffic(r)} | {_mfu(r, 'hbm_traffic_mfu_bound')} | "
        f"{collectives} | {r['compile_seconds']:.0f} |")
  return "\n".join(out) + "\n"


def heaviest(row: dict) -> str:
  """The kernels of one row that move the most bytes."""
  out = ["| MB | kernel | result | from |", "|---|---|---|---|"]
  out += [f"| {h['bytes'] / 1e6:,.0f} | {h['opcode']} | `{h['shape'][:70]}` | `{h['op'][-90:]}` |"
          for h in row["heaviest"]]
  return "\n".join(out) + "\n"


def chip_table() -> str:
  out = ["| chip | bf16 peak TFLOP/s | HBM GiB | HBM GB/s | slices | source |", "|---|---|---|---|---|---|"]
  out += [f"| {c.name} | {c.peak_flops / 1e12:g} | {c.hbm_bytes / GIB:g} | {c.hbm_bandwidth / 1e9:,.0f} | "
          f"{', '.join(c.slices)} | {c.source} |" for c in chips.CHIPS.values()]
  return "\n".join(out) + "\n"


def _key(row: dict) -> tuple:
  """What makes two rows the same compile (a benchmark's `-attn0` workload is its base at 0)."""
  return (row["config"].removesuffix("-attn0"), row["stage"], row["slice"], row["batch_per_device"], row["seq"],
          row["student_attention_dropout"])


def _once(row: dict) -> dict:
  """The counts with each loop body counted once (as every row counted before `recount`)."""
  return row.get("as_compiled", row)


def before_after(before: Sequence[dict], after: Sequence[dict], peak: float, bandwidth: float, *,
                 compared: str = "loops once") -> str:
  """The same compile before and after a change, side by side (latest row of each key).

  Before and after compare XLA's as-compiled counts (a loop's body counted once, as the
  rows before this report counted; `compared` names them in the header); the after row's
  unrolled counts, the true ones, follow.
  """
  old = {_key(r): r for r in before}
  out = [f"| workload | batch x seq per chip | attn dropout | dropout keys | HBM GiB | GB accessed, {compared} | "
         f"MFU bound, {compared} | GB accessed, unrolled | FLOP / byte ms, unrolled | MFU bound, unrolled | "
         "HBM traffic GB, unrolled | MFU bound on HBM traffic, unrolled |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|"]

  def mfu_once(r: dict) -> str:
    return _mfu(roofline(_once(r), r["model_flops"], peak, bandwidth))

  for r in {_key(r): r for r in after}.values():
    b = old.get(_key(r))
    pair = lambda f: f"{f(b)} -> {f(r)}" if b else f"(not compiled) -> {f(r)}"
    out.append(f"| {r['config'].removesuffix('-attn0')} | {r['batch_per_device']} x {r['seq']} | "
               f"{r['student_attention_dropout']:g} | {pair(lambda x: x['dropout_prng'])} | "
               f"{pair(lambda x: format(x['hbm']['total'] / GIB, '.2f'))} | "
               f"{pair(lambda x: format(moved_bytes(_once(x)) / 1e9, '.1f'))} | {pair(mfu_once)} | "
               f"{moved_bytes(r) / 1e9:.1f} | "
               f"{1e3 * r['flop_time']:.1f} / {1e3 * r['byte_time']:.1f} | "
               f"{_mfu(r)} | {_traffic(r)} | {_mfu(r, 'hbm_traffic_mfu_bound')} |")
  return "\n".join(out) + "\n"
