"""Bring your own loss on hidden states: DistilBERT's cosine loss, from teacher layers.

DistilBERT (Sanh et al., 2019) starts its student from every second teacher layer and,
beside its soft-label and MLM losses, aligns the directions of the student's and the
teacher's last hidden states, token by token (its `CosineEmbeddingLoss` with target 1):

    L_cos = mean over real tokens t of 1 - cos(h^S_t, h^T_t).

Here the demo teacher (6 layers of width 384) meets a student of its width and 3 layers
initialised from teacher layers 2, 4, 6 (`student_init="spaced"`); `internals_loss`
names `cosine_loss` below, which reads the `hidden` field of the internals of the
teacher's last layer and the student's last layer (`loss_teacher_layers` /
`loss_student_layers`). The step, checkpoints, metrics (`loss/hidden_cosine_1`) and export
are the ordinary ones.

    python -m minilm_jax distill --config experiments/configs/distilbert_cosine.py --workdir runs/distilbert

`:smoke` is a seconds-long variant for tests (the same student: its width is the teacher's).
"""

import pathlib

import jax.numpy as jnp

from experiments.configs import common
from minilm_jax import internals_loss
from minilm_jax.config import DistillConfig

NAMES = ("",)  # "" = the run itself
EPS = 1e-8      # torch.nn.CosineSimilarity's floor on each norm


def hidden_cosine(teacher_hidden, student_hidden, mask):
  """Mean of 1 - cos(h_S, h_T) over real tokens; [B, T, D] hidden states, [B, T] mask."""
  t, s = teacher_hidden.astype(jnp.float32), student_hidden.astype(jnp.float32)
  norms = (jnp.maximum(jnp.linalg.norm(s, axis=-1), EPS) * jnp.maximum(jnp.linalg.norm(t, axis=-1), EPS))
  cosine = jnp.sum(s * t, axis=-1) / norms
  real = mask.astype(jnp.float32)
  return jnp.sum((1.0 - cosine) * real) / jnp.maximum(jnp.sum(real), 1.0)


# The `InternalsLoss`: one hidden-state cosine loss per (teacher, student) layer pair, summed.
cosine_loss = internals_loss.layer_pairs(
    "hidden_cosine", lambda t, s, mask: hidden_cosine(t.hidden, s.hidden, mask))


def get_config(variant: str = "") -> DistillConfig:
  _, smoke = common.parse(__file__, variant, NAMES, default="")
  cfg = DistillConfig(
      teacher="all-MiniLM-L6-v2", student_layers=3, student_hidden=384, student_heads=12,
      student_init="spaced", internals_loss=f"{pathlib.Path(__file__).resolve()}:cosine_loss",
      loss_teacher_layers=(6,), loss_student_layers=(3,),
      corpus="demo", max_seq_len=128, global_batch_size=16, max_steps=200, learning_rate=5e-4,
      warmup_steps=20, log_every=10, checkpoint_every=100)
  return common.smoke(cfg) if smoke else cfg
