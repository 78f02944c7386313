"""Masked LM baseline: masking statistics, the loss vs numpy, the head vs BertForMaskedLM, a run."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from minilm_jax import checkpoint, convert, distill, mlm, optimizer as optimizer_lib, sharding
from minilm_jax import step as step_lib
from minilm_jax.config import DistillConfig
from minilm_jax import model as model_lib
from tiny import TINY_BERT, assert_same_training, packed_batch

TINY = TINY_BERT.replace(hidden_dropout=0.0, attention_dropout=0.0)
SPEC = mlm.MaskingSpec(mask_id=103, special_ids=(101, 102, 0), vocab_size=30522)


def _randomized(params: dict, seed=1) -> dict:
  """Head parameters away from their 0 / 1 initialisation, so that a wrong mapping shows."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: x + rng.normal(0, 0.2, x.shape).astype(np.float32), params)


def test_masking_follows_bert_statistics_and_is_a_function_of_the_key():
  batch = packed_batch(batch=512, seq=64, seed=3)
  ids, mask = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
  m = jax.device_get(mlm.mask_tokens(jax.random.key(0), ids, mask, SPEC))
  again = jax.device_get(mlm.mask_tokens(jax.random.key(0), ids, mask, SPEC))
  other = jax.device_get(mlm.mask_tokens(jax.random.key(1), ids, mask, SPEC))
  np.testing.assert_array_equal(again.input_ids, m.input_ids)
  np.testing.assert_array_equal(again.positions, m.positions)
  assert (other.input_ids != m.input_ids).any()

  original = batch["input_ids"]
  maskable = (batch["attention_mask"] == 1) & ~np.isin(original, SPEC.special_ids)
  real = m.weights > 0
  rows = np.broadcast_to(np.arange(512)[:, None], m.positions.shape)
  # Exactly round(15%) of each row's maskable tokens, distinct, never [CLS] / [SEP] / [PAD].
  np.testing.assert_array_equal(real.sum(1), np.maximum(1, np.round(0.15 * maskable.sum(1))))
  assert maskable[rows[real], m.positions[real]].all()
  assert all(len(set(p[w])) == w.sum() for p, w in zip(m.positions, real))
  np.testing.assert_array_equal(m.labels[real], original[rows[real], m.positions[real]])
  touched = np.zeros_like(maskable)
  touched[rows[real], m.positions[real]] = True
  np.testing.assert_array_equal(m.input_ids[~touched], original[~touched])

  # 80 / 10 / 10 within 4.5 binomial standard deviations (a false alarm about 1 in 10^5).
  new = m.input_ids[rows[real], m.positions[real]]
  n = real.sum()
  kinds = {"mask": (new == SPEC.mask_id).mean(), "kept": (new == m.labels[real]).mean()}
  kinds["random"] = 1 - kinds["mask"] - kinds["kept"]
  for kind, p in (("mask", 0.8), ("random", 0.1), ("kept", 0.1 + 0.1 / SPEC.vocab_size)):
    assert abs(kinds[kind] - p) < 4.5 * math.sqrt(p * (1 - p) / n), (kind, kinds[kind], n)
  # Every maskable token of a row is drawn alike (with probability k / n): per position,
  # the draws stay within binomial bounds of that expectation.
  share = real.sum(1) / maskable.sum(1)
  drawn, expected = touched.sum(0)[1:30], (share[:, None] * maskable).sum(0)[1:30]
  assert np.all(np.abs(drawn - expected) < 4.5 * np.sqrt(expected * 0.85)), (drawn, expected)


def _gelu(x):
  return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def _layer_norm(x, scale, bias, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * scale + bias


def test_loss_matches_numpy():
  params = mlm.init_params(TINY, seed=0)
  params["head"] = _randomized(params["head"])
  batch = jax.tree.map(jnp.asarray, packed_batch())
  rng = jax.random.key(5)
  total, terms = jax.jit(lambda p, b: mlm.mlm_loss(p, None, b, rng, config=TINY, spec=SPEC))(params, batch)

  masked = jax.device_get(mlm.mask_tokens(jax.random.split(rng)[0], batch["input_ids"],
                                          batch["attention_mask"], SPEC))
  hidden = np.asarray(model_lib.apply(TINY, params["encoder"], masked.input_ids, batch["attention_mask"],
                                      batch["token_type_ids"]).last_hidden_state, np.float64)
  head = jax.tree.map(lambda x: np.asarray(x, np.float64), params["head"].to_pure_dict())
  emb = np.asarray(params["encoder"]["embeddings"]["word_embeddings"]["embedding"][...], np.float64)
  h = _gelu(hidden @ head["transform"]["kernel"] + head["transform"]["bias"])
  h = _layer_norm(h, head["layer_norm"]["scale"], head["layer_norm"]["bias"], TINY.layer_norm_eps)
  scores = h @ emb.T + head["bias"]
  log_probs = scores - scores.max(-1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
  nll = [-log_probs[b, t, masked.labels[b, j]] for b in range(4) for j, t in enumerate(masked.positions[b])
         if masked.weights[b, j]]
  np.testing.assert_allclose(float(total), np.mean(nll), rtol=1e-5)
  assert float(terms["tokens"]) == len(nll)


def test_head_logits_match_transformers(tmp_path, teacher_dir):
  params = mlm.init_params(TINY, seed=0)
  params["head"] = _randomized(params["head"])
  config, lm_params, head = mlm.exports(TINY, params)["hf-mlm"]
  out = convert.save_hf(tmp_path / "hf-mlm", config, lm_params, teacher_dir, head=head)
  torch_model, info = transformers.BertForMaskedLM.from_pretrained(out, output_loading_info=True)
  assert not any(info.values()), info  # no missing, unexpected or mismatched weights
  batch = packed_batch()
  with torch.no_grad():
    expected = torch_model.eval()(**{k: torch.from_numpy(v).long() for k, v in batch.items()}).logits
  got = mlm.logits(TINY, params, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
  np.testing.assert_allclose(np.asarray(got), expected.numpy(), rtol=0, atol=1e-5)


def _fixed_positions_loss(params, teacher_params, batch, rng, *, config):
  """The MLM cross-entropy at the positions `batch["weights"]` marks: no random draw, so
  a micro-batch sees the same predictions as the whole batch."""
  hidden = model_lib.apply(config, params["encoder"], batch["input_ids"], batch["attention_mask"],
                           batch["token_type_ids"]).last_hidden_state
  log_probs = jax.nn.log_softmax(mlm.head_logits(config, params, hidden))
  nll = -jnp.take_along_axis(log_probs, batch["input_ids"][..., None], axis=-1)[..., 0]
  tokens = jnp.sum(batch["weights"])
  total = jnp.sum(nll * batch["weights"]) / tokens
  return total, {"total": total, "tokens": tokens}


def test_micro_batches_weight_by_the_loss_tokens(teacher):
  """With terms["tokens"], 4 micro-batches give the 16-row batch's exact loss and update,
  although the rows predict very different numbers of tokens (a mean of micro-batch means,
  or weighting by attention_mask, would not)."""
  cfg = DistillConfig(objective="mlm", student_layers=1, student_hidden=32, student_heads=2,
                      student_dropout=0.0, max_seq_len=40, global_batch_size=16, max_steps=100)
  setup = step_lib.make_setup(cfg, teacher[0])
  mesh = sharding.make_mesh()
  batch = packed_batch(batch=16)
  weights = np.zeros(batch["input_ids"].shape, np.float32)
  weights[::4, 1:30] = 1.0   # micro-batch 0 (rows 0, 4, ...) predicts 29 tokens a row
  weights[1::4, 1:3] = 1.0   # the others 2 or 1
  weights[2::4, 1:2] = weights[3::4, 2:4] = 1.0
  batch = sharding.global_batch(batch | {"weights": weights}, mesh)
  loss_fn = functools.partial(_fixed_positions_loss, config=setup.student)
  objective = step_lib.Objective(mlm.init_params, loss_fn, has_teacher=False)
  results = []
  for micro in (1, 4):
    optimizer = optimizer_lib.for_distillation(cfg)
    state = jax.device_put(step_lib.init_state(cfg, setup, optimizer, objective), sharding.replicated(mesh))
    step = step_lib.make_train_step(setup, optimizer, mesh, micro, loss_fn)
    for _ in range(2):
      state, metrics = step(state, {}, batch)
    results.append((state.params, metrics))
  assert_same_training(*results)


def test_tiny_mlm_run_lowers_the_loss_and_exports(tmp_path, teacher_dir):
  cfg = DistillConfig(objective="mlm", student_layers=1, student_hidden=64, student_heads=2,
                      student_dropout=0.0, max_seq_len=32, global_batch_size=16, max_steps=60,
                      warmup_steps=5, learning_rate=2e-3, log_every=5, checkpoint_every=30)
  summary = distill.run(cfg, tmp_path)
  assert summary["last_loss"] < summary["first_loss"] - 1.0, summary
  encoder, info = transformers.BertModel.from_pretrained(summary["hf"], output_loading_info=True)
  assert not any(info.values()), info
  torch_mlm = transformers.BertForMaskedLM.from_pretrained(summary["hf_mlm"])
  assert torch_mlm.config.num_hidden_layers == encoder.config.num_hidden_layers == 1
  # The run's checkpoints read as the encoder (convert --from-checkpoint, finetune --model).
  _, params, _, step = checkpoint.restore_params(tmp_path)
  assert step == 60
  got = convert.params_to_hf(checkpoint.read_model_config(checkpoint.resolve(tmp_path)),
                             checkpoint.to_host(params))
  for name, value in got.items():
    np.testing.assert_array_equal(value, encoder.state_dict()[name].numpy(), err_msg=name)
