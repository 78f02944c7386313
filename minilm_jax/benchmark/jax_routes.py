"""The JAX route: `minilm_jax.step.make_train_step` on one device at a workload's shape."""

import numpy as np

from minilm_jax.benchmark.workloads import ADAMW, DROPOUT, Built, Workload, make_batch


def jax_setup(w: Workload, batch: int, seq: int, dtype: str = "bfloat16"):
  """(DistillConfig, Setup, full teacher ModelConfig) of `minilm_jax.step` for a workload."""
  from minilm_jax import step
  cfg, teacher_full = jax_config(w, batch, seq, dtype)
  return cfg, step.make_setup(cfg, teacher_full), teacher_full


def jax_config(w: Workload, batch: int, seq: int, dtype: str = "bfloat16"):
  """(DistillConfig, full teacher ModelConfig) of a workload.

  As in the PyTorch routes: the workload's dropouts, the attention dropout fused in cuDNN on
  a GPU (`fused_attention_dropout`, as PyTorch's SDPA fuses its own); AdamW(b1 .9, b2 .999, eps 1e-6, wd .01)
  with no gradient clipping (`DistillConfig`'s default clips at norm 1; the workload has no
  clipping), at the constant rate `jax_optimizer` gives it; one step, teacher to student
  (no teacher assistant).
  """
  from minilm_jax.config import DistillConfig
  from minilm_jax.model import ModelConfig
  t, s = w.teacher, w.student
  teacher_full = ModelConfig(vocab_size=t.vocab, hidden_size=t.hidden, num_layers=t.layers, num_heads=t.heads,
                             intermediate_size=t.intermediate, max_position_embeddings=t.max_positions,
                             use_pooler=False)
  cfg = DistillConfig(
      teacher_layer=w.teacher_layer, version=w.version, relation_heads=w.relation_heads,
      student_layers=s.layers, student_hidden=s.hidden, student_heads=s.heads,
      student_intermediate=s.intermediate, student_dropout=DROPOUT,
      student_attention_dropout=w.attention_dropout, fused_attention_dropout=True, compute_dtype=dtype,
      max_seq_len=seq, global_batch_size=batch, learning_rate=ADAMW["lr"], warmup_steps=0,
      weight_decay=ADAMW["weight_decay"], adam_b1=ADAMW["b1"], adam_b2=ADAMW["b2"],
      adam_eps=ADAMW["eps"], clip_grad_norm=0.0, teacher_assistant="off")
  return cfg, teacher_full


def jax_optimizer(cfg):
  """`optimizer.for_distillation` at the PyTorch routes' constant learning rate, not the run's
  warmup + decay schedule (which would decay over `cfg.max_steps`)."""
  from minilm_jax import optimizer
  return optimizer.for_distillation(cfg, ADAMW["lr"])


def jax_step(w: Workload, batch: int, seq: int):
  """(step, (state, teacher_params, batch)): `minilm_jax.step.make_train_step` on one
  device, with its own state init, teacher truncation (bf16) and batch placement."""
  import jax
  from minilm_jax import model as model_lib, sharding, step
  cfg, setup, teacher_full = jax_setup(w, batch, seq)
  mesh = sharding.make_mesh(jax.devices()[:1])
  optimizer = jax_optimizer(cfg)
  state = sharding.put_replicated(step.init_state(cfg, setup, optimizer), mesh)
  teacher = step.truncate_teacher(setup, model_lib.init_params(teacher_full, seed=1))
  data = make_batch(w.teacher.vocab, batch, seq)
  data["token_type_ids"] = np.zeros_like(data["input_ids"])
  args = (state, sharding.put_replicated(teacher, mesh), sharding.global_batch(data, mesh))
  return step.make_train_step(setup, optimizer, mesh), args


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
