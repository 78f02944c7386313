"""Parameters no loss reaches: `optimizer_lib.untrained_mask` is exactly where the gradient is 0,
and the optimizer leaves them untouched (AdamW's weight decay used to shrink them)."""

import pathlib

import jax
import numpy as np
import pytest

from minilm_jax import objective as objective_lib, optimizer as optimizer_lib, sharding, tokenization
from minilm_jax import step as step_lib
from minilm_jax.config import DistillConfig
from tiny import packed_batch

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"


def _cfg(objective, version="v1"):
  return DistillConfig(objective=objective, version=version, student_layers=2, student_hidden=96,
                       student_heads=12, relation_heads=12, student_dropout=0.0,
                       max_seq_len=40, global_batch_size=4, max_steps=50, warmup_steps=1,
                       learning_rate=1e-2, weight_decay=0.5)


@pytest.mark.parametrize("objective,version", [("distill", "v1"), ("distill", "v2"), ("mlm", "v1")])
def test_untrained_mask_is_where_the_gradient_is_zero(teacher, teacher_dir, objective, version):
  cfg = _cfg(objective, version)
  setup = step_lib.make_setup(cfg, teacher[0])
  goal = objective_lib.choose(cfg, setup, tokenization.for_pretraining(teacher_dir, setup.student.vocab_size))
  state = step_lib.init_state(cfg, setup, optimizer_lib.for_distillation(cfg), goal)
  teacher_params = {} if objective == "mlm" else step_lib.truncate_teacher(setup, teacher[1])
  loss_fn = goal.loss
  batch = jax.tree.map(np.asarray, packed_batch())
  grads = jax.grad(lambda p: loss_fn(p, teacher_params, batch, jax.random.key(0))[0])(state.params)
  zero = jax.tree.map(lambda g: bool(np.all(np.asarray(g) == 0)), grads)
  mask = optimizer_lib.untrained_mask(cfg, state.params)
  assert jax.tree.leaves(zero) == jax.tree.leaves(mask)
  assert 0 < sum(jax.tree.leaves(mask)) < len(jax.tree.leaves(mask))


def test_untrained_parameters_are_unchanged_after_steps(teacher):
  cfg = _cfg("distill")
  setup = step_lib.make_setup(cfg, teacher[0])
  mesh = sharding.make_mesh()
  optimizer = optimizer_lib.for_distillation(cfg)
  state = jax.device_put(step_lib.init_state(cfg, setup, optimizer), sharding.replicated(mesh))
  before = jax.tree.map(np.array, state.params)
  step = step_lib.make_train_step(setup, optimizer, mesh)
  teacher_params = jax.device_put(step_lib.truncate_teacher(setup, teacher[1]), sharding.replicated(mesh))
  for i in range(5):
    state, _ = step(state, teacher_params, sharding.global_batch(packed_batch(seed=i), mesh))
  after = jax.tree.map(np.array, state.params)
  last = before["layers"][1]
  for name in ("attention_out", "intermediate", "output", "attention_norm", "output_norm"):
    for leaf in last[name]:
      np.testing.assert_array_equal(after["layers"][1][name][leaf], last[name][leaf], err_msg=name)
  np.testing.assert_array_equal(after["pooler"]["kernel"], before["pooler"]["kernel"])
  # The trained ones moved (the step is not a no-op).
  assert np.abs(after["layers"][1]["query"]["kernel"] - last["query"]["kernel"]).max() > 1e-3
  assert np.abs(after["layers"][0]["output"]["kernel"] - before["layers"][0]["output"]["kernel"]).max() > 1e-3


def test_an_internals_loss_of_a_lower_layer_leaves_the_layers_above_untouched(teacher):
  """TinyBERT's attention MSE on the student's layer 1 of 2 (`loss_student_layers`): the
  mask covers layer 2 whole and layer 1 past q/k/v, and never a parameter that learns (the
  loss reads no values, so their zero gradient stays outside the structural mask)."""
  cfg = DistillConfig(
      student_layers=2, student_hidden=96, student_heads=12, student_dropout=0.0, max_seq_len=40,
      internals_loss=f"{EXPERIMENTS / 'configs' / 'tinybert_attention.py'}:attention_mse",
      loss_teacher_layers=(3,), loss_student_layers=(1,))
  setup = step_lib.make_setup(cfg, teacher[0])
  state = step_lib.init_state(cfg, setup, optimizer_lib.for_distillation(cfg))
  teacher_params = step_lib.truncate_teacher(setup, teacher[1])
  batch = jax.tree.map(np.asarray, packed_batch())
  grads = jax.grad(lambda p: step_lib.distill_loss(p, teacher_params, batch, None, setup)[0])(state.params)
  zero = jax.tree.leaves(jax.tree.map(lambda g: bool(np.all(np.asarray(g) == 0)), grads))
  mask = optimizer_lib.untrained_mask(cfg, state.params)
  assert all(z for z, m in zip(zero, jax.tree.leaves(mask)) if m)  # masked => no gradient
  assert all(jax.tree.leaves(mask["layers"][1]))
  assert not mask["layers"][0]["query"]["kernel"].get_value()
  assert mask["layers"][0]["output"]["kernel"].get_value()
