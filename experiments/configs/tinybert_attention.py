"""Bring your own loss: TinyBERT's attention-score MSE on MiniLM's machinery.

TinyBERT (Jiao et al., 2020, Eq. 3-4) matches the *unnormalised* attention scores of
paired layers, A = q k^T / sqrt(d_k), head by head with a mean squared error:

    L_attn = sum_m 1/N sum_n MSE(A^S_{m,n}, A^T_{g(m),n}),   g(m) = m * L / M.

Here the demo teacher (6 layers) meets a 2-layer student at g = (3, 6): `internals_loss`
names `attention_mse` below, `loss_teacher_layers` / `loss_student_layers` the layers it
receives, and the step, checkpoints, metrics (one `loss/attention_mse_<m>` per pair) and
export are the ordinary ones; nothing in minilm_jax changes.

    python -m minilm_jax distill --config experiments/configs/tinybert_attention.py --workdir runs/tinybert

`:smoke` is a seconds-long variant for tests (a 96-wide student).
"""

import pathlib

import jax.numpy as jnp

from experiments.configs import common
from minilm_jax import internals_loss
from minilm_jax.config import DistillConfig

NAMES = ("",)  # "" = the run itself


def masked_score_mse(teacher_logits, student_logits, mask):
  """Mean of (A_S - A_T)^2 over heads and real (query, key) pairs; [B, N, T, S] float32 logits."""
  keep = (mask[:, :, None] * mask[:, None, :]).astype(jnp.float32)[:, None]   # [B, 1, T, S]
  squared = (student_logits.astype(jnp.float32) - teacher_logits.astype(jnp.float32)) ** 2
  return jnp.sum(squared * keep) / (jnp.maximum(jnp.sum(keep), 1.0) * teacher_logits.shape[1])


# The `InternalsLoss`: one attention-score MSE per (teacher, student) layer pair, summed.
attention_mse = internals_loss.layer_pairs(
    "attention_mse", lambda t, s, mask: masked_score_mse(t.logits, s.logits, mask))


def get_config(variant: str = "") -> DistillConfig:
  _, smoke = common.parse(__file__, variant, NAMES, default="")
  cfg = DistillConfig(
      teacher="all-MiniLM-L6-v2", student_layers=2, student_hidden=384, student_heads=12,
      internals_loss=f"{pathlib.Path(__file__).resolve()}:attention_mse",
      loss_teacher_layers=(3, 6), loss_student_layers=(1, 2),
      corpus="demo", max_seq_len=128, global_batch_size=16, max_steps=200, learning_rate=5e-4,
      warmup_steps=20, log_every=10, checkpoint_every=100)
  return common.smoke(cfg, student_hidden=96) if smoke else cfg
