"""experiments/results/tpu-compile.md from the compile rows that `experiments/scripts/tpu_compile.sh` writes.

    python -m experiments.scripts.tpu_compile_report --rows experiments/results/tpu-compile-rows \
        --out experiments/results/tpu-compile.md

Rows: before.jsonl (the step before the TPU attention route and the HBM cuts), xla-relation.jsonl
(splash and 8-bit masks, the relation KL still XLA's), after.jsonl
(the benchmark's workloads on v5e:2x2), paper.jsonl (the paper configs at the papers' global
batch, smallest slice per generation), maxbatch.jsonl (largest batch per generation). The
targets are computed from the rows.
"""

import pathlib
import sys

from absl import flags

from minilm_jax import cli_flags
from minilm_jax.aot import chips, report
from minilm_jax.aot.report import GIB

# (workload, batch per chip, seq, MFU bound the target asks for, attention dropout 0, on v5e).
TARGETS = (("base-v1", 64, 128, 0.5), ("base-v2", 64, 128, 0.5), ("base-v1", 16, 512, 0.5),
           ("base-v2", 16, 512, 0.5), ("base-v2", 64, 512, 0.4))


def targets(after: list[dict]) -> str:
  found = {(r["config"], r["batch_per_device"], r["seq"]): r for r in after
           if r["slice"] == "v5e:2x2" and r["student_attention_dropout"] == 0}
  out = ["| workload (attention dropout 0, v5e) | batch x seq per chip | MFU bound | target | met | "
         "MFU bound on HBM traffic |", "|---|---|---|---|---|---|"]
  for name, batch, seq, want in TARGETS:
    r = found.get((name, batch, seq))
    got = "not compiled" if r is None else f"{100 * r['mfu_bound']:.0f}%"
    met = "-" if r is None else ("yes" if r["mfu_bound"] >= want else "no")
    traffic = "-" if r is None or r.get("hbm_traffic_mfu_bound") is None else f"{100 * r['hbm_traffic_mfu_bound']:.0f}%"
    out.append(f"| {name} | {batch} x {seq} | {got} | >= {100 * want:.0f}% | {met} | {traffic} |")
  return "\n".join(out) + "\n"


def paper(rows: list[dict]) -> str:
  out = ["| config | stage | generation | smallest slice that fits | chips / hosts | batch x seq per device | "
         "HBM GiB of capacity | MFU bound | collectives | compile s |", "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if not r.get("smallest"):
      fits = f"{r['slice']} ({'fits' if r['fits'] else 'does not fit'}; smaller slices not tried)"
    else:
      fits = r["slice"] if r["fits"] else f"none up to {r['slice']}"
    collectives = ", ".join(f"{k} x{v}" for k, v in r.get("collectives", {}).items()) or "-"
    mfu = "-" if r.get("mfu_bound") is None else f"{100 * r['mfu_bound']:.0f}%"
    memory = (f"needs {r['out_of_memory']['temporaries'] / GIB:.1f} of {r['capacity'] / GIB:.2f}"
              if "out_of_memory" in r else f"{r['hbm']['total'] / GIB:.2f} of {r['capacity'] / GIB:.0f}")
    out.append(f"| {r['config'].removeprefix('experiments/')} | {r['stage'] or '-'} | {r['slice'].split(':')[0]} | "
               f"{fits} | {r['chips']} / {r['hosts']} | {r['batch_per_device']} x {r['seq']} | "
               f"{memory} | {mfu} | {collectives} | {r['compile_seconds']:.0f} |")
  return "\n".join(out) + "\n"


def largest(rows: list[dict]) -> str:
  """A memory question: each row's compiles skip the loop recount, so no roofline is shown."""
  out = ["| workload | slice | seq | largest batch per device | does not fit | tokens per device | "
         "HBM GiB of capacity | compiles | compile s |", "|---|---|---|---|---|---|---|---|---|"]
  out += [f"| {r['config']} | {r['slice']} | {r['seq']} | {r['batch_per_device']:,} | "
          f"{r['first_too_large']:,} | {r['batch_per_device'] * r['seq']:,} | "
          f"{r['hbm']['total'] / GIB:.2f} of {r['capacity'] / GIB:.0f} | "
          f"{r['search_compiles']} | {r['search_seconds']:.0f} |" for r in rows]
  return "\n".join(out) + "\n"


def write(rows_dir: pathlib.Path) -> str:
  before, after = report.read(rows_dir / "before.jsonl"), report.read(rows_dir / "after.jsonl")
  papers, biggest = report.read(rows_dir / "paper.jsonl"), report.read(rows_dir / "maxbatch.jsonl")
  heavy = [r for r in after if (r["config"], r["batch_per_device"], r["seq"], r["student_attention_dropout"])
           == ("base-v2", 64, 512, 0)]
  parts = [
      "# The distillation step compiled for TPU pods\n",
      "Compiled by libtpu's TPU compiler on a CPU host (`bash experiments/scripts/tpu_compile.sh`): **nothing "
      "ran on a TPU**. Memory per device is the compiled program's (`memory_analysis()`); FLOPs and "
      "bytes are XLA's counts (`cost_analysis()`); step times, tokens/s and MFU are roofline bounds "
      "from them (the step takes at least max(FLOPs / peak, bytes / bandwidth)), not measurements. "
      "MFU counts the step's matmul FLOPs (`benchmark.workloads.step_flops`). XLA counts the bytes of "
      "every memory space alike, and the compiler keeps most of this step's buffers on chip, so the "
      "byte time is an upper bound on HBM time and the MFU bound the pessimistic one; the \"HBM "
      "traffic\" columns count only the buffers left in HBM (`hlo.hbm_traffic`) and give the "
      "optimistic bound. The step runs somewhere between the two (docs/tpu-compile.md); the targets "
      "are judged on XLA's count, the yardstick they were set with.\n",
      "## Chips\n", report.chip_table(),
      "## The benchmark's workloads on v5e:2x2, before and after\n",
      "Before: the step as it was (XLA attention everywhere, the relation KL in XLA blocks, 32-bit "
      "dropout masks); after: Pallas splash attention for every layer without attention dropout (q, k "
      "and v sequence-minor), the relation KL in its own Pallas kernel, 8-bit attention-dropout masks, "
      "threefry dropout keys (the \"dropout keys\" column: with rbg keys, XLA's RngBitGenerator, which "
      "is not partitioned, each chip draws the bits of the whole global batch; with threefry, its own "
      "shard's), the student's feed-forward recomputed in its backward pass (`remat`), the attention's "
      "output projection contracting the heads in one matmul, the word lookup gathering its rows "
      "before casting them, the relation kernel reading a self relation's input once, and LayerNorm "
      "statistics in one pass (docs/tpu-compile.md says what each cut). XLA's cost "
      "analysis counts a while loop's body once, and the step has loops (the blockwise relation KL's "
      "query blocks): \"loops once\" compares before and after as XLA counts them, \"unrolled\" "
      "counts the same step with every loop unrolled, the bytes it really moves, and the targets "
      "read those.\n",
      report.before_after(before, after, chips.CHIPS["v5e"].peak_flops, chips.CHIPS["v5e"].hbm_bandwidth),
      "### Targets\n",
      "Judged on XLA's count. The last column is the optimistic bound: at 100% the step's HBM traffic "
      "takes less time at full bandwidth than its FLOPs at peak, so on HBM alone the step is FLOP-bound; "
      "only a TPU profile places the step between the two.\n", targets(after),
  ]
  if xla_relation := report.read(rows_dir / "xla-relation.jsonl"):
    parts += ["### The relation KL's share\n",
              "The same compiles with splash attention and 8-bit masks but the relation KL left to XLA's "
              "blocks (loops unrolled), against the after rows; those compiles had rbg dropout keys, so "
              "where the after row has threefry keys the difference holds both changes:\n",
              report.before_after([{k: v for k, v in r.items() if k != "as_compiled"} for r in xla_relation],
                                  after, chips.CHIPS["v5e"].peak_flops, chips.CHIPS["v5e"].hbm_bandwidth,
                                  compared="unrolled, left -> right")]
  if papers:
    parts += ["## Paper configs at the papers' global batch (1024 x 512): the smallest slice per generation\n",
              "A config that `distill` runs through a teacher assistant compiles as its two stages. The "
              "slices of each generation are tried smallest first; the first that fits is shown. These "
              "rows (and the largest batches below) were compiled before the byte cuts of "
              "docs/tpu-compile.md, which also lower the memory per chip (see the after rows' HBM column), "
              "so a smaller slice or a larger batch may fit now than these rows show.\n",
              paper(papers)]
  if biggest:
    parts += ["## The largest batch per device (base-v2, attention dropout 0)\n",
              "The largest multiple of 8 sequences per device whose compiled step fits, searched on "
              "compiled memory (`compile --max-batch`: a line through the compiles nearest a full chip "
              "picks each next batch) until the smallest batch seen not to fit is within 1/16 of it; "
              "every compile of the search is counted.\n", largest(biggest)]
  if heavy:
    parts += ["## Where the bytes go: the ten heaviest kernels of base-v2 at 64 x 512 per chip, after\n",
              "Logical bytes of each kernel's operands and result in the optimized HLO (async copies and "
              "slices are XLA's prefetches into on-chip memory).\n", report.heaviest(heavy[-1])]
  parts += ["## Every row\n", report.table(before + after + papers + biggest)]
  return "\n".join(parts)


def main(argv=None):
  usage = "usage: python -m experiments.scripts.tpu_compile_report --rows DIR --out FILE.md"

  def define(fv):
    flags.DEFINE_string("rows", None, "folder of before / after / paper / maxbatch .jsonl", flag_values=fv)
    flags.DEFINE_string("out", None, "the markdown page to write", flag_values=fv)

  fv = cli_flags.parse("tpu_compile_report", sys.argv[1:] if argv is None else argv, define, usage,
                       required=("rows", "out"))
  pathlib.Path(fv.out).write_text(write(pathlib.Path(fv.rows)))


if __name__ == "__main__":
  main()
