"""Speed of one MiniLM distillation step: the JAX step against PyTorch `transformers`.

One step = teacher forward up to the distilled layer (frozen, eval mode, no gradient,
bf16) + student forward and backward + the MiniLM relation losses + an AdamW update,
on random weights with the real models' shapes. Every (route, config, shape) gives one
JSON row (step time = median of the timed steps, each ended by `block_until_ready` /
`torch.cuda.synchronize()`; tokens/s, examples/s, peak device memory, MFU) appended to
`<out_dir>/benchmark-<device>.jsonl`; the markdown table of the latest rows goes to
`<out_dir>/benchmark-<device>.md` and stdout.

Routes (one builder each, `(Workload, batch, seq) -> Built`, the step ready to time):
  jax             `minilm_jax.train.make_train_step` (see `jax_step`).
  torch-eager     what a user writes first: full `BertModel`s, eager attention, fp32
                  weights under bf16 autocast, q/k/v of the distilled layers captured by
                  forward hooks on their `query`/`key`/`value` Linears (the attention
                  probabilities `output_attentions` returns in training are after dropout,
                  so relations are built from pre-dropout q, k, v), stock AdamW.
  torch-compiled  the best PyTorch route found: SDPA attention, the teacher cut after the
                  q/k/v projections of its distilled layer (bf16 weights) and the student
                  after those of its last layer, `torch.compile` of forward + loss (its
                  backward compiled by AOTAutograd), bf16 autocast, fused AdamW.
Every route trains the student with hidden dropout 0.1, the workload's attention-
probability dropout (0.1 as in BERT, or 0 in the `-attn0` workloads) and constant-rate
AdamW(lr 1e-4, b1 .9, b2 .999, eps 1e-6, weight decay .01); the PyTorch routes share one
loss, `torch_minilm_loss`.

Model FLOPs per step (`step_flops`): matrix multiplications only, 2 FLOPs per
multiply-add; embedding lookups, LayerNorm, GELU, softmax, dropout and the KL count 0.
Per token of a batch of B sequences of length T, a full layer of width D and feed-forward
width F costs 8D^2 + 4DF + 4TD (q, k, v, output projections; two FFN matmuls; QK^T and
PV), and "q, k, v only" costs 6D^2. A relation softmax(a b^T) over all its heads costs
2 B T^2 D. With teacher layer L_T distilled, a student of L_S layers and n relations
(v1: q-k and v-v, n=2; v2: q-q, k-k, v-v, n=3):
  teacher  = B T [(L_T - 1)(8D^2 + 4DF + 4TD) + 6D^2]        (forward only, width D_T)
  student  = B T [(L_S - 1)(8D^2 + 4DF + 4TD) + 6D^2]        (width D_S)
  flops    = teacher + n 2 B T^2 D_T + 3 (student + n 2 B T^2 D_S)
the factor 3 being forward + backward (gradients for activations and for weights). Work
past the distilled q, k, v is not model work, so routes that run it (torch-eager runs
both models whole) are charged only these FLOPs: MFU = flops / step time / peak, the
peak being a bf16 matmul (`peak_matmul_flops`) measured on the device in the same run.

Run: `python experiments/benchmark.py --mode cpu` (tiny models, seconds, what the tests
run) or `--mode gpu` (the real workload; each measurement in its own process so memory
peaks, OOMs and JAX's preallocation stay apart). `--max-batch` adds the largest batch
that fits at seq 512, per framework's best route (doubling, then bisection).
"""

import argparse
import dataclasses
import datetime
import gc
import json
import math
import pathlib
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

try:
  import torch
except ImportError:  # only the PyTorch routes need it; the JAX route runs without
  torch = None

ROUTES = ("jax", "torch-compiled", "torch-eager")
ADAMW = dict(lr=1e-4, b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.01)
DROPOUT = 0.1  # student hidden dropout (the teacher is in eval mode)


@dataclasses.dataclass(frozen=True)
class Bert:
  """Shape of a BERT encoder (random weights of this shape are all a benchmark needs)."""
  layers: int                # L
  hidden: int                # D
  heads: int                 # N attention heads
  intermediate: int          # F
  vocab: int = 30522         # word-embedding rows
  max_positions: int = 512   # position-embedding rows

  @property
  def name(self) -> str:
    return f"L{self.layers}-H{self.hidden}"


@dataclasses.dataclass(frozen=True)
class Workload:
  """One distillation setting: teacher -> student, MiniLM version, relation heads."""
  name: str
  teacher: Bert
  student: Bert
  teacher_layer: int         # distilled teacher layer, 1-based; the student's is its last
  version: str               # "v1" (attention transfer + value relation) or "v2" (q-q, k-k, v-v)
  relation_heads: int        # R; v1 uses the attention heads
  attention_dropout: float = DROPOUT  # the student's attention-probability dropout


BERT_BASE = Bert(12, 768, 12, 3072)
BERT_LARGE = Bert(24, 1024, 16, 4096)
L6_H384 = Bert(6, 384, 12, 1536)
TINY_T, TINY_T3, TINY_S = Bert(2, 64, 4, 256, 1024, 64), Bert(3, 96, 4, 384, 1024, 64), Bert(1, 32, 4, 128, 1024, 64)


@dataclasses.dataclass(frozen=True)
class Mode:
  """What `--mode` selects: workloads, shapes and how long to time."""
  workloads: tuple[Workload, ...]
  shapes: tuple[tuple[int, int], ...]  # (batch, seq)
  warmup: int                # untimed steps, the first one compiling
  timed: int                 # timed steps; the step time is their median
  peak_n: int                # size of the square bf16 matmul that measures the peak
  isolate: bool              # each measurement in a fresh subprocess
  max_batch_start: int       # first batch the largest-batch search tries (longest seq)
  max_batch_limit: int       # and the largest (a CPU never runs out of memory quickly)
  first: tuple[tuple[str, tuple[int, int]], ...] = ()  # (config, shape) measured before the rest


MODES = {
    "gpu": Mode((Workload("base-v1", BERT_BASE, L6_H384, 12, "v1", 12),
                 Workload("base-v1-attn0", BERT_BASE, L6_H384, 12, "v1", 12, attention_dropout=0.0),
                 Workload("base-v2", BERT_BASE, L6_H384, 12, "v2", 48),
                 Workload("large-v2", BERT_LARGE, L6_H384, 21, "v2", 64)),
                ((256, 128), (64, 512)), warmup=5, timed=30, peak_n=8192, isolate=True,
                max_batch_start=64, max_batch_limit=1 << 14,
                # What the targets need first, so that a run cut short still answers them.
                first=(("base-v1", (256, 128)), ("base-v1", (64, 512)), ("base-v2", (64, 512)))),
    "cpu": Mode((Workload("tiny-v1", TINY_T, TINY_S, 2, "v1", 4),
                 Workload("tiny-v2", TINY_T, TINY_S, 2, "v2", 8),
                 Workload("tiny-large-v2", TINY_T3, TINY_S, 2, "v2", 8)),
                ((4, 32),), warmup=2, timed=3, peak_n=256, isolate=False, max_batch_start=2,
                max_batch_limit=8),
}


def workload(mode: str, name: str) -> Workload:
  found = {w.name: w for w in MODES[mode].workloads}
  if name not in found:
    raise ValueError(f"unknown config {name!r} for --mode {mode}: choose from {', '.join(found)}")
  return found[name]


# ------------------------------------------------------------------------------- FLOPs


def layer_flops(b: Bert, tokens: int, seq: int, *, qkv_only: bool = False) -> int:
  """Matmul FLOPs of one layer's forward over `tokens` tokens in sequences of `seq`."""
  d, f = b.hidden, b.intermediate
  return tokens * (6 * d * d if qkv_only else 8 * d * d + 4 * d * f + 4 * seq * d)


def step_flops(w: Workload, batch: int, seq: int) -> dict[str, int]:
  """Model FLOPs of one distillation step, by part (formula in the module docstring)."""
  tokens, n_rel = batch * seq, 2 if w.version == "v1" else 3
  def forward(b: Bert, layers: int) -> int:
    return (layers - 1) * layer_flops(b, tokens, seq) + layer_flops(b, tokens, seq, qkv_only=True)
  parts = {"teacher": forward(w.teacher, w.teacher_layer),
           "teacher_relations": n_rel * 2 * batch * seq * seq * w.teacher.hidden,
           "student": 3 * forward(w.student, w.student.layers),
           "student_relations": 3 * n_rel * 2 * batch * seq * seq * w.student.hidden}
  return parts | {"total": sum(parts.values())}


def make_batch(vocab: int, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Random token ids with padding: lengths drawn from [seq/2, seq], one full row."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(seq // 2, seq + 1, batch)
  lengths[0] = seq
  mask = (np.arange(seq)[None] < lengths[:, None]).astype(np.int32)
  return {"input_ids": rng.integers(1, vocab, (batch, seq)).astype(np.int32) * mask, "attention_mask": mask}


# ------------------------------------------------------------------------------ timing


@dataclasses.dataclass
class Built:
  """A ready-to-time step: everything a route builds for one workload and shape."""
  step: Callable[[], Any]               # one training step; returns the loss, maybe unfinished
  sync: Callable[[Any], float]          # waits for a step's loss and returns it as a float
  peak_memory: Callable[[], int | None]  # peak device bytes so far; None on CPU


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


# -------------------------------------------------------------------------- PyTorch


def torch_relation_loss(a_t, b_t, a_s, b_s, mask, heads: int):
  """MiniLM relation KL (Wang et al. 2020, eq. 5-7; MiniLMv2 eq. 2-4) in PyTorch.

  Each [B, T, D] tensor is split into `heads` relation heads of size D/R (teacher and
  student each by their own D); relation = softmax(a b^T / sqrt(D/R)) over unpadded keys.
  Returns KL(teacher || student), float32, averaged over (example, head, real query).
  """
  keys = mask.bool()[:, None, None, :]

  def log_relation(a, b):
    bsz, t, d = a.shape
    a = a.view(bsz, t, heads, d // heads).transpose(1, 2)
    b = b.view(bsz, t, heads, d // heads).transpose(1, 2)
    logits = torch.matmul(a, b.transpose(-1, -2)).float() / math.sqrt(d // heads)
    # A finite fill keeps p (log p - log q) at exactly 0, and its gradient finite, on padding.
    return torch.log_softmax(logits.masked_fill(~keys, -1e9), dim=-1)

  log_p, log_q = log_relation(a_t, b_t), log_relation(a_s, b_s)
  kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # [B, R, T]
  queries = mask.float()[:, None, :]
  return (kl * queries).sum() / (queries.sum() * heads)


def torch_minilm_loss(teacher_qkv, student_qkv, mask, version: str, heads: int):
  """v1: attention transfer (q-k) + value relation (v-v); v2: q-q + k-k + v-v relations."""
  (qt, kt, vt), (qs, ks, vs) = teacher_qkv, student_qkv
  pairs = ([(qt, kt, qs, ks), (vt, vt, vs, vs)] if version == "v1"
           else [(x, x, y, y) for x, y in zip(teacher_qkv, student_qkv)])
  return sum(torch_relation_loss(*p, mask, heads) for p in pairs)


def torch_bert(b: Bert, attn: str, device, dropout: float = DROPOUT, attention_dropout: float = DROPOUT):
  """A randomly initialised `transformers.BertModel` of shape `b`, made on `device`."""
  import transformers
  config = transformers.BertConfig(
      vocab_size=b.vocab, hidden_size=b.hidden, num_hidden_layers=b.layers, num_attention_heads=b.heads,
      intermediate_size=b.intermediate, max_position_embeddings=b.max_positions,
      hidden_dropout_prob=dropout, attention_probs_dropout_prob=attention_dropout, attn_implementation=attn)
  with torch.device(device):
    return transformers.BertModel(config, add_pooling_layer=False)


def _hook_qkv(layer, store: dict) -> None:
  """Keeps the outputs of a BertLayer's query/key/value Linears (pre-dropout) in `store`."""
  for name in ("query", "key", "value"):
    getattr(layer.attention.self, name).register_forward_hook(
        lambda module, args, out, name=name: store.__setitem__(name, out))


def _qkv_up_to(model, layer: int):
  """`model` cut after the q, k, v projections of its 1-based `layer`: a module returning
  (q, k, v) [B, T, D], pre-dropout, that never runs the rest of that layer or above."""
  class QKVUpTo(torch.nn.Module):
    def __init__(self):
      super().__init__()
      attention = model.encoder.layer[layer - 1].attention.self
      model.encoder.layer = torch.nn.ModuleList(model.encoder.layer[:layer - 1])
      self.body, self.query, self.key, self.value = model, attention.query, attention.key, attention.value

    def forward(self, input_ids, attention_mask):
      h = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
      return self.query(h), self.key(h), self.value(h)
  return QKVUpTo()


def _torch_built(step, device) -> Built:
  cuda = device.type == "cuda"
  def sync(loss):
    if cuda:
      torch.cuda.synchronize(device)
    return float(loss)
  peak = (lambda: torch.cuda.max_memory_allocated(device)) if cuda else (lambda: None)
  return Built(step, sync, peak)


def _torch_setup(w: Workload, batch: int, seq: int):
  if torch is None:
    raise ImportError("the PyTorch routes need torch: pip install torch (or pass --routes jax)")
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  if device.type == "cuda":
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
  torch.manual_seed(0)
  data = make_batch(w.teacher.vocab, batch, seq)
  ids, mask = (torch.tensor(data[k], dtype=torch.long, device=device) for k in ("input_ids", "attention_mask"))
  return device, ids, mask


def _adamw(params, fused: bool):
  return torch.optim.AdamW(params, lr=ADAMW["lr"], betas=(ADAMW["b1"], ADAMW["b2"]), eps=ADAMW["eps"],
                           weight_decay=ADAMW["weight_decay"], fused=fused or None)


def torch_eager_route(w: Workload, batch: int, seq: int) -> Built:
  """Full models, eager attention, fp32 weights + bf16 autocast, q/k/v by forward hooks."""
  device, ids, mask = _torch_setup(w, batch, seq)
  teacher = torch_bert(w.teacher, "eager", device).eval().requires_grad_(False)
  student = torch_bert(w.student, "eager", device, attention_dropout=w.attention_dropout).train()
  t_qkv, s_qkv = {}, {}
  _hook_qkv(teacher.encoder.layer[w.teacher_layer - 1], t_qkv)
  _hook_qkv(student.encoder.layer[-1], s_qkv)
  opt = _adamw(student.parameters(), fused=False)
  qkv = lambda d: (d["query"], d["key"], d["value"])

  def step():
    with torch.autocast(device.type, torch.bfloat16):
      with torch.no_grad():
        teacher(input_ids=ids, attention_mask=mask)
      student(input_ids=ids, attention_mask=mask)
      loss = torch_minilm_loss(qkv(t_qkv), qkv(s_qkv), mask, w.version, w.relation_heads)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()
  return _torch_built(step, device)


def torch_compiled_route(w: Workload, batch: int, seq: int, *, compile: bool = True) -> Built:
  """SDPA, both models cut after the distilled q/k/v, bf16 teacher, torch.compile, fused AdamW."""
  device, ids, mask = _torch_setup(w, batch, seq)
  teacher = _qkv_up_to(torch_bert(w.teacher, "sdpa", device), w.teacher_layer)
  teacher = teacher.to(torch.bfloat16).eval().requires_grad_(False)
  student = _qkv_up_to(torch_bert(w.student, "sdpa", device, attention_dropout=w.attention_dropout),
                       w.student.layers).train()
  opt = _adamw(student.parameters(), fused=True)

  def loss_fn(ids, mask):
    with torch.autocast(device.type, torch.bfloat16):
      with torch.no_grad():
        t = teacher(ids, mask)
      return torch_minilm_loss(t, student(ids, mask), mask, w.version, w.relation_heads)
  if compile:
    torch._dynamo.reset()
    loss_fn = torch.compile(loss_fn)

  def step():
    loss = loss_fn(ids, mask)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()
  return _torch_built(step, device)


# ------------------------------------------------------------------------------ JAX


def jax_setup(w: Workload, batch: int, seq: int, dtype: str = "bfloat16"):
  """(DistillConfig, Setup, full teacher ModelConfig) of `minilm_jax.train` for a workload.

  As in the PyTorch routes: the workload's dropouts, the attention dropout fused in cuDNN on
  a GPU (`fused_attention_dropout`, as PyTorch's SDPA fuses its own); AdamW(b1 .9, b2 .999, eps 1e-6, wd .01)
  with no gradient clipping (train.py's default clips at norm 1; the workload has no
  clipping), at the constant rate `jax_optimizer` gives it.
  """
  from minilm_jax import train
  from minilm_jax.model import ModelConfig
  t, s = w.teacher, w.student
  teacher_full = ModelConfig(vocab_size=t.vocab, hidden_size=t.hidden, num_layers=t.layers, num_heads=t.heads,
                             intermediate_size=t.intermediate, max_position_embeddings=t.max_positions,
                             use_pooler=False)
  cfg = train.DistillConfig(
      teacher_layer=w.teacher_layer, version=w.version, num_relation_heads=w.relation_heads,
      student_layers=s.layers, student_hidden=s.hidden, student_heads=s.heads,
      student_intermediate=s.intermediate, student_dropout=DROPOUT,
      student_attention_dropout=w.attention_dropout, fused_attention_dropout=True, compute_dtype=dtype,
      max_seq_len=seq, global_batch_size=batch, learning_rate=ADAMW["lr"], warmup_steps=0,
      weight_decay=ADAMW["weight_decay"], adam_b1=ADAMW["b1"], adam_b2=ADAMW["b2"],
      adam_eps=ADAMW["eps"], clip_grad_norm=0.0)
  return cfg, train.make_setup(cfg, teacher_full), teacher_full


def jax_optimizer(cfg):
  """`train.make_optimizer` at the PyTorch routes' constant learning rate, not the run's
  warmup + decay schedule (which would decay over `cfg.max_steps`)."""
  from minilm_jax import train
  return train.make_optimizer(cfg, ADAMW["lr"])


def jax_step(w: Workload, batch: int, seq: int):
  """(step, (state, teacher_params, batch)): `minilm_jax.train.make_train_step` on one
  device, with its own state init, teacher truncation (bf16) and batch placement."""
  import jax
  from minilm_jax import model as model_lib, sharding, train
  cfg, setup, teacher_full = jax_setup(w, batch, seq)
  mesh = sharding.make_mesh(jax.devices()[:1])
  optimizer = jax_optimizer(cfg)
  state = sharding.put_replicated(train.init_state(cfg, setup, optimizer), mesh)
  teacher = train.truncate_teacher(setup, model_lib.init_params(teacher_full, seed=1))
  data = make_batch(w.teacher.vocab, batch, seq)
  data["token_type_ids"] = np.zeros_like(data["input_ids"])
  args = (state, sharding.put_replicated(teacher, mesh), sharding.global_batch(data, mesh))
  return train.make_train_step(setup, optimizer, mesh), args


def jax_route(w: Workload, batch: int, seq: int) -> Built:
  """The JAX step (`jax_step`), its train state carried from call to call."""
  import jax
  step, (state, teacher, data) = jax_step(w, batch, seq)
  carry = [state]

  def run_step():
    carry[0], metrics = step(carry[0], teacher, data)
    return metrics["loss/total"]
  return Built(run_step, lambda loss: float(jax.block_until_ready(loss)), _jax_peak_memory)


def _jax_peak_memory() -> int | None:
  import jax
  device = jax.devices()[0]
  stats = device.memory_stats() if device.platform != "cpu" else None
  return stats.get("peak_bytes_in_use") if stats else None


ROUTE_BUILDERS: dict[str, Callable[[Workload, int, int], Built]] = {
    "jax": jax_route, "torch-eager": torch_eager_route, "torch-compiled": torch_compiled_route}


def _best_routes(routes: Sequence[str]) -> list[str]:
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


# --------------------------------------------------------------------------- output


def _versions() -> dict[str, str]:
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


# ------------------------------------------------------------------------------ run


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
  peak = run_work({"kind": "peak", "n": m.peak_n}, True, timeout)
  if "error" in peak:
    raise RuntimeError(f"measuring the matmul peak failed: {peak['error']}")
  common = {"mode": mode, "device": peak["device"], "peak_flops": peak["peak_flops"], "versions": _versions(),
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
    emit(step_row(common, w, batch, seq, route, run_work(spec, isolate, timeout)))
  if max_batch:
    seq = max(s for _, s in m.shapes)
    for w in works:
      for route in _best_routes(routes):
        spec = {"kind": "fits", "mode": mode, "config": w.name, "route": route, "seq": seq}
        probes = []
        def fits(batch):
          probes.append(batch)
          result = run_work(spec | {"batch": batch}, isolate, timeout)
          if "error" in result:
            raise RuntimeError(f"{route} {w.name} batch {batch}: {result['error']}")
          return result["fits"]
        try:
          found, fails_at = largest_batch(fits, m.max_batch_start, m.max_batch_limit)
          result = {"max_batch": found, "fails_at": fails_at}
        except RuntimeError as e:
          result = {"error": str(e)[:500]}
        emit(common | {"kind": "max_batch", "route": route, "framework": route.split("-")[0],
                       "config": w.name, "seq": seq, "probes": probes} | result)
  print(write_table(jsonl, mode))
  return rows


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
                    "q/k/v + relation matmuls (matmuls only; see `minilm_jax/benchmark.py`). MFU = model "
                    "FLOPs / step time / measured bf16 matmul peak. Step time = median of timed steps.")


def _shape(text: str) -> tuple[int, int]:
  batch, _, seq = text.partition("x")
  if not (batch.isdigit() and seq.isdigit()):
    raise argparse.ArgumentTypeError(f"shape {text!r} is not BATCHxSEQ, e.g. 256x128")
  return int(batch), int(seq)


def main(argv: Sequence[str] | None = None) -> list[dict]:
  """`python -m minilm_jax benchmark` / `python experiments/benchmark.py`."""
  p = argparse.ArgumentParser(prog="benchmark", description=__doc__.split("\n")[0])
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
    print(write_table(a.table, a.mode))
    return []
  return run(a.mode, a.routes.split(","), a.configs.split(",") if a.configs else None,
             [_shape(s) for s in a.shapes.split(",")] if a.shapes else None, a.out_dir, a.max_batch,
             a.isolate, a.timed, a.timeout)


if __name__ == "__main__":
  if sys.argv[1:2] == ["--worker"]:
    print(RESULT_MARK + json.dumps(work(json.loads(sys.argv[2]))), flush=True)
  else:
    main(sys.argv[1:])
