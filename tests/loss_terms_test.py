"""Loss ablations as config (term lists) and bring-your-own losses of internals."""

import jax
import numpy as np
import pytest

from experiments.configs import tinybert_attention
from minilm_jax import distill, optimizer as optimizer_lib, sharding
from minilm_jax import step as step_lib
from minilm_jax.config import DistillConfig
from minilm_jax.metric_writer import read_metrics
from tiny import build, internals, mask_of, random_batch, tiny_cfg

TINYBERT = tinybert_attention.__file__


def test_config_term_list_reaches_the_step_and_its_metrics(teacher):
  mesh = sharding.make_mesh()
  batch = sharding.global_batch(random_batch(8), mesh)
  got = {}
  for terms in (None, ("value_relation",)):
    cfg = tiny_cfg(loss_terms=terms, student_dropout=0.0, student_attention_dropout=0.0)
    step, state, tp = build(cfg, teacher, mesh)
    got[terms] = jax.device_get(step(state, tp, batch)[1])
  assert {"loss/attention_transfer", "loss/value_relation", "loss/total"} <= set(got[None])
  assert "loss/attention_transfer" not in got[("value_relation",)]
  # The same weights and batch: the -AT run's total is the full run's value-relation term.
  np.testing.assert_allclose(got[("value_relation",)]["loss/total"], got[None]["loss/value_relation"],
                             rtol=1e-6)
  np.testing.assert_allclose(got[None]["loss/total"],
                             got[None]["loss/attention_transfer"] + got[None]["loss/value_relation"], rtol=1e-6)


def test_bad_term_lists_are_rejected_with_the_fix(teacher):
  config = teacher[0]
  cases = [(dict(loss_terms=()), "loss_terms is empty: name at least one of v1's terms"),
           (dict(version="v2", relation_heads=12, loss_terms=("qq",)), "did you mean 'qq_relation'"),
           (dict(loss_terms=("value_relaton",)), "unknown loss term 'value_relaton'.*did you mean 'value_relation'"),
           (dict(loss_terms=("kk_relation",)), "it is a v2 term: set version='v2'"),
           (dict(loss_terms=("value_relation", "value_relation")), "names a term twice"),
           (dict(loss_terms="value_relation"), r"is a string: give a tuple of terms, e.g. \('value_relation',\)"),
           (dict(internals_loss=f"{TINYBERT}:attention_mse", loss_terms=("value_relation",)),
            "leave loss_terms unset"),
           (dict(loss_teacher_layers=(3,)), "choose the layers of an internals_loss"),
           (dict(internals_loss=f"{TINYBERT}:attention_mse", loss_teacher_layers=(7,)),
            r"loss_teacher_layers \[7\] are out of range: the teacher has 6 layers"),
           (dict(internals_loss=f"{TINYBERT}:nothing_here"), "has no function 'nothing_here'"),
           (dict(internals_loss="no_such_module_xyz:f"), "cannot be imported"),
           (dict(internals_loss="attention_mse"), "is not 'module:function'")]
  for fields, message in cases:
    with pytest.raises(ValueError, match=message):
      step_lib.make_setup(DistillConfig(**fields), config)
  with pytest.raises(FileNotFoundError, match="internals_loss file /nowhere/loss.py does not exist"):
    step_lib.make_setup(DistillConfig(internals_loss="/nowhere/loss.py:f"), config)


def numpy_score_mse(t, s, mask):
  """Loops over examples; float64; squared error over heads and real (query, key) pairs."""
  total, count = 0.0, 0
  for b in range(t.shape[0]):
    n = int(mask[b].sum())
    total += np.sum((np.float64(s[b, :, :n, :n]) - np.float64(t[b, :, :n, :n])) ** 2)
    count += t.shape[1] * n * n
  return total / count


def test_tinybert_loss_matches_numpy():
  rng = np.random.default_rng(6)
  mask = mask_of([7, 4, 1])
  logits = lambda: rng.normal(size=(3, 4, 7, 7)).astype(np.float32) * 3
  pairs = [(internals(rng, 16).replace(logits=logits()), internals(rng, 16).replace(logits=logits()))
           for _ in range(2)]
  got = tinybert_attention.attention_mse(tuple(p[0] for p in pairs), tuple(p[1] for p in pairs), mask)
  want = [numpy_score_mse(t.logits, s.logits, mask) for t, s in pairs]
  np.testing.assert_allclose([got["attention_mse_1"], got["attention_mse_2"]], want, rtol=1e-6)
  np.testing.assert_allclose(got["total"], sum(want), rtol=1e-6)


def test_custom_loss_gets_its_layers_and_trains(teacher):
  """The TinyBERT example through the ordinary step: its layers, its terms, a falling loss."""
  cfg = tinybert_attention.get_config("smoke")
  cfg.max_steps, cfg.student_dropout, cfg.learning_rate = 30, 0.0, 2e-3
  cfg.student_attention_dropout = 0.0
  setup = step_lib.make_setup(cfg, teacher[0])
  assert setup.teacher.num_layers == 6 and setup.teacher_layers == (2, 5)
  assert setup.student_layers == (0, 1) and setup.return_logits
  mesh = sharding.make_mesh()
  step, state, tp = build(cfg, teacher, mesh)
  batches = [sharding.global_batch(random_batch(8, seed=i), mesh) for i in range(2)]
  # The first step's terms equal the example's function on the models' own internals.
  from minilm_jax import model as model_lib
  b = jax.device_get(batches[0])
  args = (b["input_ids"], b["attention_mask"], b["token_type_ids"])
  t_out = model_lib.apply(setup.teacher, tp, *args, capture=(2, 5), return_logits=True).internals
  s_out = model_lib.apply(setup.student, state.params, *args, capture=(0, 1), return_logits=True).internals
  want = tinybert_attention.attention_mse((t_out[2], t_out[5]), (s_out[0], s_out[1]), b["attention_mask"])
  totals = []
  for i in range(cfg.max_steps):
    state, metrics = step(state, tp, batches[i % 2])
    if i == 0:
      first = jax.device_get(metrics)
      assert set(first) == {"loss/attention_mse_1", "loss/attention_mse_2", "loss/total", "grad_norm",
                            "tokens"}
      for k in ("attention_mse_1", "attention_mse_2", "total"):
        np.testing.assert_allclose(first[f"loss/{k}"], want[k], rtol=1e-5, err_msg=k)
    totals.append(metrics["loss/total"])
  totals = np.asarray(jax.device_get(totals))
  assert totals[-6:].mean() < 0.7 * totals[:6].mean(), (totals[:6].mean(), totals[-6:].mean())


def test_custom_loss_run_logs_its_terms(tmp_path):
  cfg = tinybert_attention.get_config("smoke")
  cfg.export_hf, cfg.teacher_assistant = False, "off"
  summary = distill.run(cfg, tmp_path)
  assert summary["steps"] == 4 and np.isfinite(summary["last_loss"])
  records = read_metrics(tmp_path)
  assert [r["step"] for r in records] == [2, 4]
  assert {"loss/attention_mse_1", "loss/attention_mse_2", "loss/total"} <= set(records[-1])
  assert not any(k.startswith("loss/") and "relation" in k for k in records[-1])


def broken_loss(teacher_internals, student_internals, mask):
  return {"mse": (student_internals[0].query ** 2).mean()}


def test_a_loss_without_total_is_refused_by_name(teacher):
  cfg = tiny_cfg(internals_loss=f"{__file__}:broken_loss")
  setup = step_lib.make_setup(cfg, teacher[0])
  batch = random_batch(8)
  params = step_lib.init_state(cfg, setup, optimizer_lib.for_distillation(cfg)).params
  with pytest.raises(ValueError, match=r"returned dict \['mse'\].*with a 'total'"):
    step_lib.distill_loss(params, step_lib.truncate_teacher(setup, teacher[1]), batch, None, setup)
