"""The step `distill` would run for a config, compiled for a TPU slice by the real compiler.

Nothing runs: `jax.jit(step).lower(<shapes placed on the slice's mesh>).compile()` is the
same call a TPU host makes before its first step, so the memory per device it reports is
what that host would allocate, and XLA's FLOP and byte counts are the program's own. The
step is `minilm_jax.step.make_step`'s (the run's `Setup`, optimizer, shardings and micro-batches),
every "auto" resolved for a TPU; a config that `distill` runs through a teacher assistant
compiles as its two stages.

A roofline bounds the step: it takes at least max(FLOPs / peak, bytes / bandwidth), which
bounds tokens/s per device and the model-FLOP utilisation (MFU: the step's matmul FLOPs,
`benchmark.workloads.step_flops`, over that time at peak). With XLA's bytes, which count the
buffers kept on chip at HBM's price, it is the pessimistic bound; with the HBM traffic alone
(`hlo.hbm_traffic`) the optimistic one. Bounds, not measurements.
"""

import dataclasses
import pathlib
import time

from minilm_jax import convert, loops, objective, sharding, teacher_assistant, tokenization
from minilm_jax import step as step_lib
from minilm_jax import model as model_lib
from minilm_jax.config import DistillConfig
from minilm_jax.aot import hlo
from minilm_jax.aot.chips import Slice
from minilm_jax.benchmark import workloads
from minilm_jax.teachers import resolve_model_dir

# The `config.json` fields of public teachers the paper configs name, so that they compile
# without their weights: https://huggingface.co/<name>/blob/main/config.json
PUBLIC_TEACHERS = {
    "bert-base-uncased": dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12,
                              num_attention_heads=12, intermediate_size=3072, max_position_embeddings=512),
    "bert-large-uncased": dict(vocab_size=30522, hidden_size=1024, num_hidden_layers=24,
                               num_attention_heads=16, intermediate_size=4096, max_position_embeddings=512),
    "roberta-large": dict(model_type="roberta", vocab_size=50265, hidden_size=1024, num_hidden_layers=24,
                          num_attention_heads=16, intermediate_size=4096, max_position_embeddings=514,
                          type_vocab_size=1, pad_token_id=1, layer_norm_eps=1e-5),
    "xlm-roberta-base": dict(model_type="xlm-roberta", vocab_size=250002, hidden_size=768,
                             num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                             max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                             layer_norm_eps=1e-5),
}


def read_teacher(name: str) -> tuple[model_lib.ModelConfig, pathlib.Path | None]:
  """The teacher's shape (and its directory when local): a local or packaged teacher's
  `config.json`, else a public teacher's known fields (nothing is downloaded)."""
  try:
    directory = resolve_model_dir(name)
  except FileNotFoundError:
    if name in PUBLIC_TEACHERS:
      return model_lib.ModelConfig.from_hf(PUBLIC_TEACHERS[name]), None
    raise
  return convert.read_hf_config(directory)[0], directory


@dataclasses.dataclass(frozen=True)
class Stage:
  """One distillation the config runs: its config and its teacher's shape."""
  name: str                          # "" (a single run), "assistant" or "student"
  cfg: DistillConfig
  teacher: model_lib.ModelConfig


def stages(cfg: DistillConfig, teacher: model_lib.ModelConfig) -> list[Stage]:
  """What `distill` runs for `cfg` (`teacher_assistant.stages`): itself, or the assistant
  stage then the student stage, whose teacher is the assistant as exported."""
  return [Stage(s.name, s.cfg, s.teacher) for s in teacher_assistant.stages(cfg, teacher, pathlib.Path("."))]


def model_flops(setup: step_lib.Setup, cfg: DistillConfig, batch: int) -> float | None:
  """Matmul FLOPs of one step over `batch` sequences (the benchmark's formula); None for an
  objective or loss it does not describe (masked LM, your own loss)."""
  if cfg.objective != "distill" or cfg.internals_loss:
    return None
  def bert(c: model_lib.ModelConfig) -> workloads.Bert:
    return workloads.Bert(c.num_layers, c.hidden_size, c.num_heads, c.intermediate_size)
  w = workloads.Workload("", bert(setup.teacher), bert(setup.student), setup.teacher.num_layers,
                         cfg.version, setup.relation_heads)
  return float(workloads.step_flops(w, batch, cfg.max_seq_len)["total"])


def _lower(stage: Stage, mesh, tokenizer_dir):
  cfg = stage.cfg
  setup = step_lib.make_setup(cfg, stage.teacher, platform="tpu")
  goal = objective.choose(cfg, setup, tokenization.for_pretraining(tokenizer_dir) if tokenizer_dir else None)
  _, optimizer, step = step_lib.make_step(cfg, setup, mesh, goal)
  return setup, step.lower(*step_lib.abstract_inputs(cfg, setup, optimizer, mesh, goal))


def compile_stage(stage: Stage, pod: Slice, tokenizer_dir: pathlib.Path | None = None, *,
                  counted: bool = True) -> dict:
  """Compiles `stage`'s step for `pod` at the stage config's global batch; one row.

  Memory, collectives and kernels are the step's as it runs. Its FLOPs and bytes are XLA's
  counts of the same step with every loop unrolled (`recount`), since XLA counts a loop's
  body once; `counted=False` keeps the as-compiled counts (enough for a memory search).
  """
  cfg = stage.cfg
  mesh = sharding.make_mesh(list(pod.devices))
  sharding.check_batch_size(cfg.global_batch_size, mesh, cfg.grad_accum_steps)
  if cfg.objective == "mlm" and tokenizer_dir is None:
    raise ValueError(f"objective 'mlm' reads the teacher's tokenizer: {cfg.teacher!r} must be a local directory")
  start = time.perf_counter()
  setup, lowered = _lower(stage, mesh, tokenizer_dir)
  per_device = cfg.global_batch_size // mesh.size
  row = {"stage": stage.name, "slice": pod.name, "devices": mesh.size, "chips": pod.chips, "hosts": pod.hosts,
         "batch_per_device": per_device, "seq": cfg.max_seq_len, "global_batch": cfg.global_batch_size,
         "micro_batches": cfg.grad_accum_steps, "student_attention_dropout": cfg.student_attention_dropout,
         "dropout_prng": setup.dropout_prng, "remat": cfg.resolved_remat("tpu"), "model_flops": model_flops(setup, cfg, per_device)}
  try:
    got = hlo.analyse(lowered.compile())
  except Exception as e:  # noqa: BLE001 - the compiler's "does not fit" is a runtime error
    if (needed := hlo.out_of_memory(str(e))) is None:
      raise
    return row | {"capacity": needed["available"], "fits": False, "out_of_memory": needed, "loops": [],
                  "compile_seconds": time.perf_counter() - start}
  row |= {"capacity": pod.hbm_bytes, "fits": got["hbm"]["total"] <= pod.hbm_bytes,
          "compile_seconds": time.perf_counter() - start,
          "counted": "loops counted once" if got["loops"] else "as compiled", **got}
  row = _roofline(row, pod)
  return recount(row, stage, pod, tokenizer_dir) if counted else row


def recount(row: dict, stage: Stage, pod: Slice, tokenizer_dir=None) -> dict:
  """`row` with XLA's FLOPs and bytes of its step compiled again with every loop unrolled
  (`loops.counting`), where it has loops; the roofline follows."""
  if not row["loops"] or row.get("counted") == "unrolled":
    return row
  start = time.perf_counter()
  with loops.counting():
    counts = hlo.counts(_lower(stage, sharding.make_mesh(list(pod.devices)), tokenizer_dir)[1].compile())
  as_compiled = {k: row[k] for k in counts}  # comparable with rows of steps without loops
  return _roofline(row | counts | {"counted": "unrolled", "as_compiled": as_compiled,
                                   "counting_seconds": time.perf_counter() - start}, pod)


def moved_bytes(counts: dict) -> float:
  """XLA's bytes and those of the Pallas kernels that declare none (`hlo.undeclared_kernel_bytes`)."""
  return counts["bytes_accessed"] + counts.get("kernel_bytes", 0.0)


def roofline(counts: dict, model_flops: float | None, peak: float, bandwidth: float) -> dict:
  """The step time bound max(FLOPs / peak, bytes / bandwidth) and the MFU it bounds, twice.

  FLOPs: XLA's, but at least the model's (XLA does not count a Pallas kernel's FLOPs
  unless it declares them). Bytes: XLA's and those of the kernels that declare none
  (`byte_time`, `mfu_bound`); and the HBM traffic alone (`hbm_traffic_time`,
  `hbm_traffic_mfu_bound`, where the counts have it), since XLA's bytes include the buffers
  kept on chip (`hlo.hbm_traffic`). The step's time lies between the two bounds.
  """
  flop_time = max(counts["xla_flops"], model_flops or 0.0) / peak
  byte_time = moved_bytes(counts) / bandwidth
  bound = max(flop_time, byte_time)
  mfu = lambda time: None if model_flops is None else model_flops / (time * peak)
  got = {"flop_time": flop_time, "byte_time": byte_time, "bound": bound, "mfu_bound": mfu(bound)}
  if "hbm_traffic" in counts:
    got["hbm_traffic_time"] = counts["hbm_traffic"] / bandwidth
    got["hbm_traffic_mfu_bound"] = mfu(max(flop_time, got["hbm_traffic_time"]))
  return got


def _roofline(row: dict, pod: Slice) -> dict:
  """`row` with its roofline on `pod` and the tokens/s per device it bounds."""
  got = roofline(row, row["model_flops"], pod.peak_flops, pod.hbm_bandwidth)
  bound = got.pop("bound")
  return row | got | {"tokens_per_sec_bound": row["batch_per_device"] * row["seq"] / bound}


def at_batch(stage: Stage, per_device: int, pod: Slice, seq: int | None = None) -> Stage:
  """`stage` with `per_device` sequences per device on `pod` (and `seq` tokens each)."""
  cfg = dataclasses.replace(stage.cfg, global_batch_size=per_device * len(pod.devices),
                            max_seq_len=seq or stage.cfg.max_seq_len)
  return dataclasses.replace(stage, cfg=cfg)


def _load(row: dict) -> float:
  """How full a compiled step's memory is: its temporaries over the room they have (1 = full).
  A step that does not fit says both in the compiler's refusal."""
  if row["fits"]:
    hbm = row["hbm"]
    return hbm["temporaries"] / (row["capacity"] - hbm["total"] + hbm["temporaries"])
  return row["out_of_memory"]["temporaries"] / row["out_of_memory"]["available"]


def largest_batch(stage: Stage, pod: Slice, tokenizer_dir=None, start: int = 8, step: int = 8, *,
                  counted: bool = True, precision: float = 1 / 16) -> dict:
  """The row of the largest per-device batch (a multiple of `step`) whose compiled step fits,
  searched until the smallest batch seen not to fit (`first_too_large`) is within `precision`
  of it (or `step`): near a full chip each compile takes the TPU compiler 5-8 minutes on two
  cores, and a batch is picked by a round number, not to the last 8 sequences.

  A search on compiled memory that keeps the bracket [largest batch that fits, smallest that
  does not]. The temporaries grow about linearly with the batch (the arguments do not), so
  each next batch is where the line through the two compiles nearest the bracket's edge
  reaches a full chip (or, when it lands on the largest fit, the next multiple of `step`); a
  guess that leaves the bracket is replaced by its middle (doubling while nothing failed yet),
  and so is every guess after a probe that left the bracket more than half as wide: the
  compiler's memory is not monotone in the batch (BERT-base at seq 128 on v5e: 91% full at
  1,120 sequences, 89% at 1,800), and a line through far compiles can point at the largest fit
  again and again. Each probe is a compile of minutes, and this one usually needs four where
  doubling then bisecting needs a dozen.
  """
  rows = {}

  def compiled(batch: int) -> dict:
    if batch not in rows:
      rows[batch] = compile_stage(at_batch(stage, batch, pod), pod, tokenizer_dir, counted=False)
      print(f"  {pod.name}, seq {stage.cfg.max_seq_len}: {batch} per device "
            f"{'fits' if rows[batch]['fits'] else 'does not fit'} ({100 * _load(rows[batch]):.0f}% of the "
            f"room for temporaries; {rows[batch]['compile_seconds']:.0f} s)", flush=True)
    return rows[batch]

  if not compiled(start)["fits"]:
    raise ValueError(f"not even {start} sequences per device fit {pod.name}: use a larger chip "
                     "or a shorter seq")
  low, high, guess = start, None, 2 * start
  while high is None or high - low > max(step, low * precision):
    width = None if high is None else high - low
    if compiled(guess)["fits"]:
      low = max(low, guess)
    else:
      high = guess if high is None else min(high, guess)
    near = sorted(rows, key=lambda b: abs(_load(rows[b]) - 1))[:2]
    slope = (_load(rows[near[1]]) - _load(rows[near[0]])) / (near[1] - near[0])
    guess = (near[0] + (1 - _load(rows[near[0]])) / slope) // step * step if slope > 0 else 0
    if 0 < guess <= low:  # the line puts the edge at `low`: the next multiple decides
      guess = low + step
    crawling = width is not None and high - low > width / 2  # the last probe did not halve the bracket
    if crawling or not low < guess < (high or float("inf")) or guess in rows:
      guess = 2 * low if high is None else (low + high) // 2 // step * step
    guess = int(guess)
  row = recount(rows[low], at_batch(stage, low, pod), pod, tokenizer_dir) if counted else rows[low]
  return row | {"largest_batch": True, "first_too_large": high, "search_compiles": len(rows),
                "search_seconds": sum(r["compile_seconds"] for r in rows.values())}
