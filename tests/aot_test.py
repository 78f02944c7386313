"""The distillation step compiled for TPU slices by libtpu (no TPU needed), and what is read
off the compiled program."""

import dataclasses
import importlib.util
import json
import re

import jax
import pytest

from experiments.scripts import tpu_compile_report
from minilm_jax import model as model_lib, sharding
from minilm_jax import step as core_step
from minilm_jax.config import DistillConfig
from minilm_jax.aot import chips, hlo, main as aot_main, report, step as step_lib

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="the TPU compiler is the `tpu` extra: pip install -e .[tpu]")

TEACHER = model_lib.ModelConfig(vocab_size=512, hidden_size=64, num_layers=4, num_heads=4,
                                intermediate_size=128, max_position_embeddings=128)
TINY = DistillConfig(teacher="tiny", student_layers=2, student_hidden=64, student_heads=4,
                     teacher_assistant="off", max_seq_len=128, global_batch_size=8)


def _bytes_per_device(tree, devices: int) -> int:
  """What each device holds of `tree`: replicated leaves whole, batch-sharded ones a share."""
  return sum(x.size * x.dtype.itemsize // (devices if x.sharding.spec else 1)
             for x in jax.tree.leaves(tree))


@needs_libtpu
def test_the_step_compiles_for_a_tpu_with_every_auto_resolved_for_it():
  pod = chips.pod_slice("v5e:2x2")
  row = step_lib.compile_stage(step_lib.Stage("", TINY, TEACHER), pod)
  assert (pod.chips, pod.hosts, row["devices"], row["batch_per_device"]) == (4, 1, 4, 2)
  setup = core_step.make_setup(TINY, TEACHER, platform="tpu")
  # "auto" is bf16 compute and threefry (partitionable) dropout keys on a TPU, as on this CPU host.
  assert (setup.teacher.dtype, setup.student.dtype, setup.dropout_prng) == ("bfloat16", "bfloat16", "threefry2x32")
  # XLA's argument bytes are the state and teacher (replicated) and a quarter of the batch,
  # plus the padding of TPU tiles (8 x 128 for matrices: up to a quarter at these widths).
  mesh = sharding.make_mesh(list(pod.devices))
  _, optimizer, _ = core_step.make_step(TINY, setup, mesh)
  logical = _bytes_per_device(core_step.abstract_inputs(TINY, setup, optimizer, mesh), 4)
  assert logical <= row["hbm"]["arguments"] <= 1.3 * logical
  assert row["fits"] and row["hbm"]["total"] > row["hbm"]["arguments"]
  assert row["collectives"].get("all-reduce", 0) >= 1  # the gradients' mean over the data axis
  assert row["model_flops"] == step_lib.model_flops(setup, TINY, 2) > 0
  assert row["flop_time"] == pytest.approx(max(row["xla_flops"], row["model_flops"]) / pod.peak_flops)
  bound = max(row["flop_time"], row["byte_time"])
  assert row["mfu_bound"] == pytest.approx(row["model_flops"] / bound / pod.peak_flops)
  assert row["tokens_per_sec_bound"] == pytest.approx(2 * 128 / bound)
  moved = [h["bytes"] for h in row["heaviest"]]
  assert len(moved) == 10 and moved == sorted(moved, reverse=True)
  # The teacher's attention is splash (no declared cost: its operands and results are added
  # to XLA's bytes); the relation KL is its own kernel, which declares its cost.
  assert row["custom_calls"].get("tpu_custom_call", 0) >= 2 and row["kernel_bytes"] > 0
  assert row["byte_time"] == pytest.approx((row["bytes_accessed"] + row["kernel_bytes"]) / pod.hbm_bandwidth)
  # The HBM traffic reads every argument from HBM at least once, and is a part of what XLA
  # counts over every memory space (most of the step's buffers are kept on chip).
  assert logical <= row["hbm_traffic"] < (row["bytes_accessed"] + row["kernel_bytes"]) / 2
  traffic_bound = max(row["flop_time"], row["hbm_traffic"] / pod.hbm_bandwidth)
  assert row["hbm_traffic_mfu_bound"] == pytest.approx(row["model_flops"] / traffic_bound / pod.peak_flops)


@needs_libtpu
def test_the_teachers_word_table_is_read_at_the_batch_rows_not_cast_whole():
  """`nnx.Embed` casts its whole table to float32 before the lookup: for the bf16 teacher a
  float32 copy of its word table in every step (BERT-base: 30522 x 768, 0.14 GB of XLA's bytes
  per step on v5e). The lookup (`model._lookup`) gathers the rows first."""
  pod = chips.pod_slice("v5e:2x2")
  _, lowered = step_lib._lower(step_lib.Stage("", TINY, TEACHER), sharding.make_mesh(list(pod.devices)), None)
  instructions = hlo.executed(lowered.compile().as_text())
  shapes = {i.name: re.sub(r"\{[^}]*\}", "", i.shape) for i in instructions}
  assert "bf16[512,64]" in shapes.values()  # the teacher's table, in the step
  whole = [i.name for i in instructions if shapes[i.name] == "f32[512,64]"
           and "bf16[512,64]" in (shapes.get(o) for o in i.operands)]
  assert not whole, whole


@needs_libtpu
def test_a_step_that_does_not_fit_is_a_row_saying_what_it_needs():
  """The TPU compiler refuses a program larger than HBM: the row says so, with its numbers."""
  pod = chips.pod_slice("v5e:2x2")
  row = step_lib.compile_stage(step_lib.at_batch(step_lib.Stage("", TINY, TEACHER), 2**16, pod), pod)
  assert not row["fits"] and row["out_of_memory"]["temporaries"] > row["out_of_memory"]["available"]
  assert 15 * 2**30 < row["capacity"] == row["out_of_memory"]["available"] <= 16 * 2**30
  assert "DOES NOT FIT, the compiler needs" in report.line(row | {"config": "tiny"})
  assert hlo.out_of_memory("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required "
                           "for HLO temporaries (56.90G) exceeds available HBM (15.75G).") == {
                               "temporaries": 56.9 * 2**30, "available": 15.75 * 2**30}
  assert hlo.out_of_memory("INVALID_ARGUMENT: something else") is None


@needs_libtpu
def test_a_step_with_loops_is_counted_unrolled():
  """XLA counts a loop's body once: two micro-batches are a loop of 2, and the row's counts
  are those of the step compiled again with the loop unrolled (about twice the work)."""
  pod = chips.pod_slice("v5e:2x2")
  stage = step_lib.Stage("", dataclasses.replace(TINY, grad_accum_steps=2), TEACHER)
  looped = step_lib.compile_stage(stage, pod, counted=False)
  row = step_lib.recount(looped, stage, pod)
  assert 2 in looped["loops"] and looped["counted"] == "loops counted once"
  assert row["counted"] == "unrolled" and row["hbm"] == looped["hbm"]
  assert row["as_compiled"] == {k: looped[k] for k in ("xla_flops", "bytes_accessed", "kernel_bytes", "hbm_traffic")}
  assert 1.5 * looped["xla_flops"] < row["xla_flops"] and row["bytes_accessed"] > looped["bytes_accessed"]


@needs_libtpu
def test_the_compile_command_prints_and_records_a_row_per_slice(tmp_path, capsys):
  out = tmp_path / "rows.jsonl"
  aot_main.main(["--config", "experiments/configs/demo.py:smoke", "--slice", "v5e:2x2",
                 "--out", str(out), "--markdown", str(tmp_path / "rows.md")])
  [row] = [json.loads(line) for line in out.read_text().splitlines()]
  assert (row["config"], row["slice"], row["batch_per_device"], row["seq"]) == (
      "experiments/configs/demo.py:smoke", "v5e:2x2", 2, 32)
  assert "experiments/configs/demo.py:smoke on v5e:2x2 (4 devices, 1 hosts), 2 x 32 per device" in capsys.readouterr().out
  assert "| experiments/configs/demo.py:smoke | - | v5e:2x2 | 4 / 1 | 2 x 32 |" in (tmp_path / "rows.md").read_text()


@needs_libtpu
def test_two_compiles_at_once_share_libtpu(tmp_path):
  """libtpu admits one process unless ALLOW_MULTIPLE_LIBTPU_LOAD is set: the command sets it."""
  import os
  import subprocess
  import sys
  env = {k: v for k, v in os.environ.items() if k != "ALLOW_MULTIPLE_LIBTPU_LOAD"} | {"JAX_PLATFORMS": "cpu"}
  command = [sys.executable, "-m", "minilm_jax", "compile", "--config", "experiments/configs/demo.py:smoke",
             "--slice", "v5e:2x2"]
  both = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
          for _ in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in both]
  assert [p.returncode for p in both] == [0, 0], outs
  assert all("experiments/configs/demo.py:smoke on v5e:2x2" in out for out in outs)


def test_a_config_that_uses_an_assistant_compiles_as_its_two_stages():
  cfg = DistillConfig(teacher="bert-base-uncased", student_layers=6, student_hidden=384)
  teacher, directory = step_lib.read_teacher(cfg.teacher)
  assistant, student = step_lib.stages(cfg, teacher)
  assert directory is None and teacher.hidden_size == 768
  assert (assistant.name, assistant.cfg.student_layers, assistant.cfg.student_hidden) == ("assistant", 12, 384)
  assert (student.name, student.teacher.num_layers, student.teacher.hidden_size) == ("student", 12, 384)
  assert student.cfg.student_layers == 6


@needs_libtpu
def test_each_chip_draws_the_dropout_bits_of_its_own_shard_only():
  """rbg keys (XLA's RngBitGenerator, which is not partitioned) made each of the 4 chips draw the
  hidden dropout bits of the whole batch, u32[8, 128, 64]: 4 times its share, 16 times on a
  16-chip slice. The TPU's "auto" keys (threefry, partitionable) draw u32[2, 128, ...] per chip."""
  pod = chips.pod_slice("v5e:2x2")
  lowered = step_lib._lower(step_lib.Stage("", TINY, TEACHER), sharding.make_mesh(list(pod.devices)), None)[1]
  drawn = set(re.findall(r"u32\[(\d+),128,", lowered.compile().as_text()))
  assert drawn == {"2"}, drawn

def test_a_refusal_with_room_for_the_temporaries_but_not_beside_the_rest_is_read():
  """v4 at 640 x 512 per device: the temporaries (14.77G) are smaller than HBM (15.25G) but
  not with the arguments and the rest beside them. This form of the refusal was not read, and
  the largest-batch search stopped with the compiler's error."""
  message = ("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: XLA:TPU compile permanent error. Ran out of "
             "memory in memory space hbm. Used 15.26G of 15.25G hbm. Exceeded hbm capacity by 16.82M.\n"
             "Total hbm usage >= 32.02G:\n    reserved         16.75G \n    program          14.81G \n"
             "    arguments       461.35M \nProgram hbm requirement 14.81G:\n    global            48.5K\n"
             "    scoped            2.88M\n    HLO temp         14.77G (61.7% utilization)\n")
  got = hlo.out_of_memory(message)
  assert got == pytest.approx({"temporaries": 14.77 * 2**30, "available": (15.25 - 15.26 + 14.77) * 2**30})
  assert got["temporaries"] > got["available"]


def test_the_largest_batch_is_searched_on_compiled_memory(monkeypatch):
  """A fake compiler whose temporaries grow by 1 GiB per sequence beside 44.5 GiB of room:
  44 sequences fit. The line through the first two compiles points at 40, the largest
  multiple of 8 that fits, and 48 confirms it: four compiles where doubling then bisecting
  needs six. A compile that does not fit reports what the compiler's refusal says."""
  asked, gib = [], 2**30

  def fake(stage, pod, tokenizer_dir=None, counted=True):
    b = stage.cfg.global_batch_size // 4
    asked.append(b)
    row = {"fits": b <= 44, "batch_per_device": b, "loops": [], "capacity": 46.5 * gib, "compile_seconds": 60.0}
    if row["fits"]:
      return row | {"hbm": {"temporaries": b * gib, "total": (b + 2) * gib}}
    return row | {"out_of_memory": {"temporaries": b * gib, "available": 44.5 * gib}}
  monkeypatch.setattr(step_lib, "compile_stage", fake)
  pod = chips.Slice("v5e:2x2", chips.CHIPS["v5e"], tuple(range(4)), 4, 1)
  row = step_lib.largest_batch(step_lib.Stage("", TINY, TEACHER), pod)
  assert row["batch_per_device"] == 40 and row["largest_batch"] and asked == [8, 16, 40, 48]
  assert row["search_compiles"] == 4 and row["search_seconds"] == 240


def test_the_largest_batch_search_survives_memory_that_is_not_linear(monkeypatch):
  """Temporaries that grow with the square of the batch mislead every line: the bracket still
  closes on the largest multiple of 8 that fits (72 of 75), each batch compiled once."""
  asked, gib = [], 2**30

  def fake(stage, pod, tokenizer_dir=None, counted=True):
    b = stage.cfg.global_batch_size // 4
    asked.append(b)
    need = b * b / 100 * gib
    row = {"fits": b <= 75, "batch_per_device": b, "loops": [], "capacity": 58.25 * gib, "compile_seconds": 1.0}
    if row["fits"]:
      return row | {"hbm": {"temporaries": need, "total": need + gib}}
    return row | {"out_of_memory": {"temporaries": need, "available": 57.25 * gib}}
  monkeypatch.setattr(step_lib, "compile_stage", fake)
  pod = chips.Slice("v5e:2x2", chips.CHIPS["v5e"], tuple(range(4)), 4, 1)
  row = step_lib.largest_batch(step_lib.Stage("", TINY, TEACHER), pod)
  assert row["batch_per_device"] == 72 and len(asked) == len(set(asked)) <= 8, asked


def test_the_largest_batch_search_halves_its_bracket_when_the_line_crawls(monkeypatch):
  """Memory that is not monotone in the batch, as the TPU compiler's is past ~1,000 sequences
  of BERT-base at seq 128 on v5e (91% full at 1,120, 89% at 1,800): the line through the
  compiles nearest a full chip then points at the largest fit again and again, and its
  `low + step` probes crawled 8 sequences a compile (26 compiles here). Whenever a probe leaves
  the bracket more than half as wide, the next one bisects: 14 compiles to the last multiple of
  8, 11 to the default precision (a batch that fits within 1/16 of one that does not)."""
  gib = 2**30

  def load(b):  # through the compiles seen: 600 54%, 1,120 91%, 1,800 89%, 2,480 109% full
    points = [(0, 0.0), (600, 0.54), (1120, 0.91), (1240, 0.97), (1700, 0.88), (1800, 0.89), (2200, 1.0),
              (2480, 1.09)]
    for (b0, l0), (b1, l1) in zip(points, points[1:]):
      if b <= b1:
        return l0 + (l1 - l0) * (b - b0) / (b1 - b0)
    return 1.09 + (b - 2480) / 2000

  def fake(stage, pod, tokenizer_dir=None, counted=True):
    b = stage.cfg.global_batch_size // 4
    asked.append(b)
    row = {"fits": load(b) <= 1.0, "batch_per_device": b, "loops": [], "capacity": 17 * gib,
           "compile_seconds": 1.0}
    if row["fits"]:
      return row | {"hbm": {"temporaries": load(b) * 15 * gib, "total": load(b) * 15 * gib + 2 * gib}}
    return row | {"out_of_memory": {"temporaries": load(b) * 15 * gib, "available": 15 * gib}}
  monkeypatch.setattr(step_lib, "compile_stage", fake)
  pod = chips.Slice("v5e:2x2", chips.CHIPS["v5e"], tuple(range(4)), 4, 1)
  asked = []
  row = step_lib.largest_batch(step_lib.Stage("", TINY, TEACHER), pod, precision=0)
  assert row["batch_per_device"] == 2200 and len(asked) == len(set(asked)) <= 14, asked
  asked = []
  row = step_lib.largest_batch(step_lib.Stage("", TINY, TEACHER), pod)
  low, high = row["batch_per_device"], row["first_too_large"]
  assert load(low) <= 1 < load(high) and high - low <= low / 16, (low, high)
  assert len(asked) == len(set(asked)) <= 11, asked


HLO = """\
HloModule jit_step, entry_computation_layout={(f32[8,4]{1,0})->f32[8,4]{1,0}}

%fused_computation (param_0: f32[8,4]) -> f32[8,4] {
  %param_0 = f32[8,4]{1,0} parameter(0)
  ROOT %multiply.1 = f32[8,4]{1,0} multiply(%param_0, %param_0)
}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

ENTRY %main (p: f32[8,4]) -> f32[8,4] {
  %p = f32[8,4]{1,0:T(8,128)} parameter(0)
  %fusion = bf16[8,4]{1,0} fusion(%p), kind=kLoop, calls=%fused_computation, metadata={op_name="jit(step)/mul"}
  %all-reduce-start = f32[8,4]{1,0} all-reduce-start(%p), to_apply=%add
  %all-reduce-done = f32[8,4]{1,0} all-reduce-done(%all-reduce-start)
  ROOT %tuple = (f32[8,4]{1,0}, bf16[8,4]{1,0}) tuple(%all-reduce-done, %fusion)
}
"""


def test_the_hlo_reader_counts_kernels_collectives_and_their_bytes():
  executed = hlo.executed(HLO)
  assert [i.name for i in executed] == ["p", "fusion", "all-reduce-start", "all-reduce-done", "tuple"]
  assert hlo.loops(HLO) == [] and hlo.custom_calls(HLO) == {}
  loop = ("%c (i: s32[]) -> pred[] {\n  %i = s32[] parameter(0)\n  %n = s32[]{:T(128)} constant(8)\n"
          "  ROOT %lt = pred[] compare(%i, %n), direction=LT\n}\n\n"
          "ENTRY %e (p: s32[]) -> s32[] {\n  %p = s32[] parameter(0)\n"
          "  ROOT %w = s32[] while(%p), condition=%c, body=%b\n}\n")
  assert hlo.loops(loop) == [8]
  assert hlo.collectives(executed) == {"all-reduce": 1}
  assert hlo.shape_bytes("(f32[8,4]{1,0}, bf16[8,4]{1,0}, s32[])") == 128 + 64 + 4
  heaviest = hlo.heaviest(executed)
  assert [(h["opcode"], h["bytes"], h["op"]) for h in heaviest] == [
      ("all-reduce-start", 256, "all-reduce-start"), ("fusion", 128 + 64, "jit(step)/mul")]


def test_the_hbm_traffic_counts_only_the_buffers_left_in_hbm():
  """Memory-space assignment marks a buffer kept on chip `S(1)` in its layout. A fusion moves
  its HBM operand and result (1,024 + 512 bytes), not its on-chip operand; a prefetch reads
  HBM once (4 KiB into S(1)), an eviction writes it once (2 KiB), an async slice reads its
  slice (1 KiB of a 64 KiB parameter); flags (`S(2)`) and buffer plumbing move nothing."""
  text = """\
ENTRY %main (w: f32[128,128], x: f32[16,16]) -> f32[16,8] {
  %w = f32[128,128]{1,0:T(8,128)} parameter(0)
  %x = f32[16,16]{1,0:T(8,128)} parameter(1)
  %copy-start = (f32[32,32]{1,0:T(8,128)S(1)}, f32[32,32]{1,0:T(8,128)}, u32[]{:S(2)}) copy-start(%w.s)
  %copy-done = f32[32,32]{1,0:T(8,128)S(1)} copy-done(%copy-start)
  %slice-start = ((f32[128,128]{1,0:T(8,128)}), f32[2,128]{1,0:T(8,128)S(1)}, s32[]{:S(2)}) slice-start(%w), slice={[0:2], [0:128]}
  %slice-done = f32[2,128]{1,0:T(8,128)S(1)} slice-done(%slice-start)
  %fusion = f32[16,8]{1,0:T(8,128)} fusion(%x, %slice-done), kind=kOutput, calls=%f
  %copy-start.1 = (f32[16,32]{1,0:T(8,128)}, f32[16,32]{1,0:T(8,128)S(1)}, u32[]{:S(2)}) copy-start(%y)
  %copy-done.1 = f32[16,32]{1,0:T(8,128)} copy-done(%copy-start.1)
  ROOT %tuple = (f32[16,8]{1,0}, f32[16,32]{1,0}) tuple(%fusion, %copy-done.1)
}
"""
  assert hlo.hbm_traffic(hlo.executed(text)) == 4096 + 1024 + (1024 + 512) + 2048


def test_a_slice_is_named_by_generation_and_shape():
  with pytest.raises(ValueError, match="unknown TPU generation 'v7x': use one of v4, v5e, v5p, v6e"):
    chips.pod_slice("v7x:2x2")
  with pytest.raises(ValueError, match="has no shape: name one such as v5e:2x2"):
    chips.pod_slice("v5e")


def _row(config, dropout, mfu, gb, batch=64, seq=128, keys="threefry2x32"):
  return {"config": config, "stage": "", "slice": "v5e:2x2", "batch_per_device": batch, "seq": seq,
          "student_attention_dropout": dropout, "dropout_prng": keys, "hbm": {"total": 2 * 2**30}, "bytes_accessed": gb * 1e9,
          "flop_time": 0.0095, "byte_time": gb * 1e9 / 819e9, "mfu_bound": mfu}


def test_the_report_pairs_each_compile_with_its_before_and_computes_the_targets():
  before = [_row("base-v1-attn0", 0, 0.29, 26.3, keys="rbg") | {"model_flops": 0.29 * 0.0321 * 197e12, "xla_flops": 1.87e12}]
  unrolled = _row("base-v1", 0, 0.20, 40.0) | {"model_flops": 1.83e12, "xla_flops": 1.9e12,
                                               "hbm_traffic": 2.7e9, "hbm_traffic_mfu_bound": 0.93}
  after = [unrolled | {"as_compiled": {"xla_flops": 1.8e12, "bytes_accessed": 22.3e9}},
           _row("base-v2", 0, 0.55, 12.0) | {"model_flops": 1.83e12, "xla_flops": 1.8e12}]
  table = report.before_after(before, after, 197e12, 819e9)
  # Before and after as XLA counts loops (once); the unrolled, true counts of the after row.
  assert ("| base-v1 | 64 x 128 | 0 | rbg -> threefry2x32 | 2.00 -> 2.00 | 26.3 -> 22.3 | 29% -> 34% | 40.0 | "
          "9.5 / 48.8 | 20% | 2.7 | 93% |") in table
  assert "| base-v2 | 64 x 128 | 0 | (not compiled) -> threefry2x32 | (not compiled) -> 2.00 |" in table
  targets = tpu_compile_report.targets(after)
  assert "| base-v1 | 64 x 128 | 20% | >= 50% | no | 93% |" in targets  # the unrolled, true bound
  assert "| base-v2 | 64 x 128 | 55% | >= 50% | yes | - |" in targets  # a row without HBM traffic
  assert "| base-v2 | 64 x 512 | not compiled | >= 40% | - |" in targets


def test_the_largest_batch_table_gives_the_bracket_the_search_closed():
  """The largest batch that fits beside the smallest seen not to: how precise the search was."""
  row = {"config": "base-v2", "slice": "v5e:2x2", "seq": 128, "batch_per_device": 2168,
         "first_too_large": 2248, "hbm": {"total": 15.5 * 2**30}, "capacity": 16 * 2**30,
         "search_compiles": 11, "search_seconds": 3300.0}
  assert ("| base-v2 | v5e:2x2 | 128 | 2,168 | 2,248 | 277,504 | 15.50 of 16 | 11 | 3300 |"
          in tpu_compile_report.largest([row]))
