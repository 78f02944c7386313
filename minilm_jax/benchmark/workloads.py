"""What the benchmark measures: workloads, their model FLOPs, random batches, and `Built`.

Every route trains the student with hidden dropout 0.1, the workload's attention-
probability dropout (0.1 as in BERT, or 0 in the `-attn0` workloads) and constant-rate
AdamW(lr 1e-4, b1 .9, b2 .999, eps 1e-6, weight decay .01).

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

"""

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

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


@dataclasses.dataclass
class Built:
  """A ready-to-time step: everything a route builds for one workload and shape."""
  step: Callable[[], Any]               # one training step; returns the loss, maybe unfinished
  sync: Callable[[Any], float]          # waits for a step's loss and returns it as a float
  peak_memory: Callable[[], int | None]  # peak device bytes so far; None on CPU

