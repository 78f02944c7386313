"""The distillation step: data parallelism, gradient accumulation, learning, dropout keys."""

import json
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import distilbert_cosine
from minilm_jax import model as model_lib, optimizer as optimizer_lib, sharding
from minilm_jax import step as step_lib
from minilm_jax.config import DistillConfig
from tiny import assert_same_training, build, mask_of, packed_batch, random_batch, tiny_cfg


def test_gradient_accumulation_equals_one_big_batch(teacher):
  cfg = tiny_cfg(student_dropout=0.0, student_attention_dropout=0.0, global_batch_size=16)
  mesh = sharding.make_mesh()
  batch = sharding.global_batch(random_batch(16), mesh)  # unequal lengths: token weighting matters
  results = []
  for micro in (1, 4):
    step, state, tp = build(cfg, teacher, mesh, micro)
    for _ in range(2):
      state, metrics = step(state, tp, batch)
    results.append((state.params, metrics))
  assert_same_training(*results)


EIGHT_DEVICES = r"""
import json, sys
import jax, numpy as np
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/.."]  # tests/ (tiny.py) and the checkout (experiments/)
from tiny import tiny_cfg, random_batch, build
from minilm_jax import convert, sharding
teacher = convert.load_hf("all-MiniLM-L6-v2")
cfg = tiny_cfg(global_batch_size=16, dropout_prng=sys.argv[2])
out = {}
for name, devices in (("one", jax.devices()[:1]), ("eight", jax.devices())):
  mesh = sharding.make_mesh(devices)
  step, state, tp = build(cfg, teacher, mesh)
  losses = []
  for i in range(3):
    state, metrics = step(state, tp, sharding.global_batch(random_batch(16, seed=i), mesh))
    losses.append(float(metrics["loss/total"]))
  out[name] = (losses, [np.asarray(x) for x in jax.tree.leaves(state.params)])
  out[name + "_devices"] = len(state.params["layers"][0]["query"]["kernel"].get_value().sharding.device_set)
diff = max(float(np.abs(a - b).max()) for a, b in zip(out["one"][1], out["eight"][1]))
print(json.dumps({"devices": jax.device_count(), "loss_one": out["one"][0], "loss_eight": out["eight"][0],
                  "param_max_abs_diff": diff, "replicated_on": out["eight_devices"]}))
"""


@pytest.mark.parametrize("prng", ["threefry2x32", "rbg"])  # the CPU's and TPU's default, the GPU's
def test_eight_devices_equal_one_device(prng):
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
         "PATH": "/usr/bin:/bin"}
  result = subprocess.run([sys.executable, "-c", EIGHT_DEVICES, str(pathlib.Path(__file__).parent), prng],
                          capture_output=True, text=True, timeout=600, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  got = json.loads(result.stdout.strip().splitlines()[-1])
  assert got["devices"] == 8 and got["replicated_on"] == 8
  np.testing.assert_allclose(got["loss_eight"], got["loss_one"], rtol=1e-5)
  assert got["param_max_abs_diff"] <= 1e-5, got


def test_a_few_hundred_steps_lower_the_loss_clearly(teacher):
  cfg = tiny_cfg(max_steps=200)
  mesh = sharding.make_mesh()
  step, state, tp = build(cfg, teacher, mesh)
  batches = [sharding.global_batch(random_batch(8, seed=i), mesh) for i in range(4)]
  losses = []
  for i in range(cfg.max_steps):
    state, metrics = step(state, tp, batches[i % 4])
    losses.append(metrics["loss/total"])
  losses = np.asarray(jax.device_get(losses))
  assert np.isfinite(losses).all()
  assert losses[-10:].mean() < 0.6 * losses[:10].mean(), (losses[:10].mean(), losses[-10:].mean())


def _tiny_step_inputs(micro_batches=1, **cfg_changes):
  teacher = model_lib.ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                                  max_position_embeddings=16)
  cfg = DistillConfig(student_layers=1, student_hidden=32, student_heads=4, max_seq_len=8,
                      global_batch_size=4, **cfg_changes)
  setup = step_lib.make_setup(cfg, teacher)
  optimizer = optimizer_lib.for_distillation(cfg)
  step = step_lib.make_train_step(setup, optimizer, sharding.make_mesh(), micro_batches)
  batch = {k: jnp.ones((4, 8), jnp.int32) for k in ("input_ids", "attention_mask", "token_type_ids")}
  return step, (step_lib.init_state(cfg, setup, optimizer),
                step_lib.truncate_teacher(setup, model_lib.init_params(teacher)), batch), setup


def _eqns(jaxpr):
  """Every equation of a jaxpr and of the jaxprs inside it (jit, scan, custom_vjp bodies)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jax.core.jaxprs_in_params(eqn.params):
      yield from _eqns(sub)


@pytest.mark.parametrize("prng", ["rbg", "auto"])
def test_one_micro_batch_needs_no_scan_and_masks_use_the_chosen_prng(prng):
  """grad_accum_steps == 1 traces no `scan` (a scan of one is still a loop), 2 do. With
  rbg, every dropout mask is drawn from an rbg key (`key<rbg>`), only the step key's 128
  bits from threefry (`key<fry>`); "auto" on a CPU draws them all from threefry."""
  for micro, loops in ((1, False), (2, True)):
    step, args, setup = _tiny_step_inputs(micro, dropout_prng=prng)
    eqns = list(_eqns(jax.make_jaxpr(step)(*args).jaxpr))
    assert any(e.primitive.name == "scan" for e in eqns) == loops
    draws = {(re.match(r"key<\w+>", str(e.invars[0].aval)).group(), tuple(e.params["shape"]))
             for e in eqns if e.primitive.name == "random_bits"}
    masks = {k for k, shape in draws if shape != (4,)}
    if prng == "rbg":
      assert ("key<fry>", (4,)) in draws and masks == {"key<rbg>"}, draws
    elif jax.default_backend() == "cpu":
      assert setup.dropout_prng == "threefry2x32" and {k for k, _ in draws} == {"key<fry>"}, draws


def _mask_shapes(**cfg_changes):
  """The shapes of the random bits the step draws: one per dropout mask."""
  step, args, _ = _tiny_step_inputs(**cfg_changes)
  return {tuple(e.params["shape"]) for e in _eqns(jax.make_jaxpr(step)(*args).jaxpr)
          if e.primitive.name == "random_bits"}


def test_attention_dropout_is_its_own_field():
  """student_attention_dropout alone decides whether the student's attention probabilities
  [B, N, T, S] get a dropout mask, student_dropout whether its hidden states [B, T, H] do."""
  probs, hidden = (4, 4, 8, 8), (4, 8, 32)
  assert _mask_shapes(student_dropout=0.0) == {probs}  # the default attention dropout, 0.1
  assert _mask_shapes(student_dropout=0.2, student_attention_dropout=0.0) == {hidden}
  assert _mask_shapes(student_dropout=0.0, student_attention_dropout=0.0) == set()


def test_cudnn_fused_dropout_is_opt_in():
  """cuDNN's dropout masks ignore the JAX key (no exact resume), so only a student whose
  run asks for them gets them; the frozen teacher never does."""
  assert not _tiny_step_inputs()[2].student.cudnn_dropout
  _, _, setup = _tiny_step_inputs(fused_attention_dropout=True)
  assert setup.student.cudnn_dropout and not setup.teacher.cudnn_dropout


def test_metrics_count_real_tokens():
  step, (state, teacher, batch), _ = _tiny_step_inputs()
  batch["attention_mask"] = jnp.array([[1] * 8, [1] * 5 + [0] * 3, [1] * 2 + [0] * 6, [0] * 8], jnp.int32)
  _, metrics = step(state, teacher, batch)
  assert float(metrics["tokens"]) == 15


def numpy_cosine_loss(teacher_hidden, student_hidden, mask):
  """DistilBERT's cosine loss in numpy (float64): mean over real tokens of 1 - cos(h_S, h_T)."""
  t, s = np.asarray(teacher_hidden, np.float64), np.asarray(student_hidden, np.float64)
  real = np.asarray(mask, bool)
  t, s = t[real], s[real]
  cosine = (s * t).sum(-1) / (np.linalg.norm(s, axis=-1) * np.linalg.norm(t, axis=-1))
  return (1 - cosine).mean()


def test_distilbert_cosine_loss_matches_numpy():
  rng = np.random.default_rng(0)
  teacher, student = (rng.normal(size=(3, 7, 16)).astype(np.float32) for _ in range(2))
  student[0, :2] = 2.5 * teacher[0, :2]  # same direction: cosine 1, no loss
  mask = mask_of([7, 4, 2])
  got = distilbert_cosine.hidden_cosine(teacher, student, mask)
  np.testing.assert_allclose(got, numpy_cosine_loss(teacher, student, mask), rtol=1e-6)
  student[mask == 0] = 1e3  # padded positions do not count
  np.testing.assert_allclose(distilbert_cosine.hidden_cosine(teacher, student, mask), got, rtol=1e-6)


def test_a_custom_loss_on_hidden_states_trains_a_teacher_initialised_student(teacher):
  """distilbert_cosine.py through the ordinary step: the student starts from teacher layers
  2, 4, 6, its first loss is numpy's cosine loss between the two models' last hidden states,
  and the loss falls."""
  cfg = distilbert_cosine.get_config("smoke")
  cfg.max_steps, cfg.student_dropout, cfg.student_attention_dropout = 8, 0.0, 0.0
  setup = step_lib.make_setup(cfg, teacher[0])
  assert (setup.student_init, setup.teacher_layers, setup.student_layers) == ((1, 3, 5), (5,), (2,))
  optimizer = optimizer_lib.for_distillation(cfg)
  mesh = sharding.make_mesh()
  state = jax.device_put(step_lib.init_state(cfg, setup, optimizer, teacher_params=teacher[1]),
                         sharding.replicated(mesh))
  tp = step_lib.truncate_teacher(setup, teacher[1])
  batches = [packed_batch(8, 32, seed=i) for i in range(2)]
  args = (batches[0]["input_ids"], batches[0]["attention_mask"], batches[0]["token_type_ids"])
  want = numpy_cosine_loss(model_lib.apply(setup.teacher, tp, *args).last_hidden_state,
                           model_lib.apply(setup.student, state.params, *args).last_hidden_state,
                           batches[0]["attention_mask"])
  step = step_lib.make_train_step(setup, optimizer, mesh)
  totals = []
  for i in range(cfg.max_steps):
    state, metrics = step(state, tp, sharding.global_batch(batches[i % 2], mesh))
    totals.append(float(metrics["loss/total"]))
    if i == 0:
      assert set(metrics) == {"loss/hidden_cosine_1", "loss/total", "grad_norm", "tokens"}
      np.testing.assert_allclose(float(metrics["loss/hidden_cosine_1"]), want, rtol=1e-5)
  assert np.mean(totals[-2:]) < 0.7 * np.mean(totals[:2]), totals
