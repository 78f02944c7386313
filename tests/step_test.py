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

from minilm_jax import model as model_lib, optimizer as optimizer_lib, sharding
from minilm_jax import step as step_lib
from minilm_jax.config import DistillConfig

def tiny_cfg(**kw):
  base = dict(student_layers=1, student_hidden=96, student_heads=12, max_seq_len=32,
              global_batch_size=8, max_steps=300, warmup_steps=10, learning_rate=1e-3)
  return DistillConfig(**(base | kw))


def random_batch(batch=8, seq=32, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1000, 8000, size=(batch, seq)).astype(np.int32)
  ids[:, 0] = 101
  lengths = rng.integers(seq // 2, seq + 1, size=batch)
  mask = (np.arange(seq)[None] < lengths[:, None]).astype(np.int32)
  return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def build(cfg, teacher, mesh, micro_batches=1):
  setup = step_lib.make_setup(cfg, teacher[0])
  optimizer = optimizer_lib.for_distillation(cfg)
  state = jax.device_put(step_lib.init_state(cfg, setup, optimizer), sharding.replicated(mesh))
  teacher_params = jax.device_put(step_lib.truncate_teacher(setup, teacher[1]), sharding.replicated(mesh))
  return step_lib.make_train_step(setup, optimizer, mesh, micro_batches), state, teacher_params


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


def assert_same_training(one, many):
  """(params, metrics) of 1 and several micro-batches: metrics to rtol 1e-5, params to 1e-5."""
  (p1, m1), (p4, m4) = one, many
  for k in m1:
    np.testing.assert_allclose(m4[k], m1[k], rtol=1e-5, err_msg=k)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)


EIGHT_DEVICES = r"""
import json, sys
import jax, numpy as np
sys.path.insert(0, sys.argv[1])
from step_test import tiny_cfg, random_batch, build
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


@pytest.mark.parametrize("prng", ["threefry2x32", "rbg"])  # CPU's default, accelerators' default
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


def test_decay_mask_spares_biases_and_layer_norm():
  params = model_lib.init_params(model_lib.ModelConfig(num_layers=1, hidden_size=32, num_heads=4,
                                                       intermediate_size=64, vocab_size=64))
  mask = optimizer_lib.decay_mask(params)
  assert mask["layers"][0]["query"]["kernel"].get_value() is True
  assert mask["embeddings"]["word_embeddings"]["embedding"].get_value() is True
  assert mask["layers"][0]["query"]["bias"].get_value() is False
  assert mask["layers"][0]["output_norm"]["scale"].get_value() is False


def test_schedule_warms_up_then_decays():
  schedule = optimizer_lib.warmup_linear_decay(1e-3, 10, 110)
  np.testing.assert_allclose([schedule(0), schedule(5), schedule(10), schedule(60), schedule(110)],
                             [0, 5e-4, 1e-3, 5e-4, 0], atol=1e-9)


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


def test_attention_dropout_is_its_own_field():
  _, _, setup = _tiny_step_inputs(student_dropout=0.2, student_attention_dropout=0.0)
  assert setup.student.hidden_dropout == 0.2 and setup.student.attention_dropout == 0.0
  assert DistillConfig().student_attention_dropout == 0.1  # BERT's and the papers' default


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
