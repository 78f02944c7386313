"""The Flax encoder against PyTorch `transformers` (float32, CPU, eager attention)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from minilm_jax import attention, model as model_lib, student_init

SENTENCES = ["MiniLM distils the self-attention of the teacher's last layer.",
             "A short one.",
             "Padding must not change what real tokens see: the mask removes padded keys."]


@pytest.fixture(scope="module")
def batch(teacher_dir):
  tok = transformers.AutoTokenizer.from_pretrained(teacher_dir)
  b = tok(SENTENCES, padding=True, return_tensors="np")
  assert (b["attention_mask"] == 0).any()  # the batch really has padding
  return {k: v.astype(np.int32) for k, v in b.items()}


@pytest.fixture(scope="module")
def torch_outputs(teacher_dir, batch):
  pt = transformers.AutoModel.from_pretrained(teacher_dir, attn_implementation="eager").eval()
  with torch.no_grad():
    return pt(**{k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()},
              output_attentions=True, output_hidden_states=True)


def run(config, params, batch, **kw):
  return model_lib.apply(config, params, batch["input_ids"], batch["attention_mask"],
                         batch["token_type_ids"], **kw)


def real(x, batch):
  """Rows of real (unpadded) query positions: what a padded position computes is unused."""
  mask = batch["attention_mask"].astype(bool)
  x = np.asarray(x)
  return x[mask] if x.ndim == 3 else np.moveaxis(x, 1, 2)[mask]  # [B,T,D] or [B,N,T,S]


def test_teacher_matches_pytorch(teacher, batch, torch_outputs):
  config, params = teacher
  out = run(config, params, batch, capture=tuple(range(config.num_layers)), return_logits=True)
  np.testing.assert_allclose(real(out.last_hidden_state, batch),
                             real(torch_outputs.last_hidden_state, batch), rtol=0, atol=1e-5)
  np.testing.assert_allclose(out.pooled_output, torch_outputs.pooler_output, rtol=0, atol=1e-5)
  for i in range(config.num_layers):
    probs = attention.attention_probs(out.internals[i].logits, batch["attention_mask"])
    np.testing.assert_allclose(real(probs, batch), real(torch_outputs.attentions[i], batch),
                               rtol=0, atol=1e-5, err_msg=f"layer {i}")
    np.testing.assert_allclose(real(out.internals[i].hidden, batch),  # layer i's output
                               real(torch_outputs.hidden_states[i + 1], batch),
                               rtol=0, atol=1e-5, err_msg=f"layer {i}")


def test_truncated_teacher_matches_pytorch_hidden_state(teacher, batch, torch_outputs):
  config, params = teacher
  pure = student_init.bottom_layers(params.to_pure_dict(), 4)
  pure.pop("pooler")
  config = config.replace(num_layers=4, use_pooler=False)
  state = model_lib.abstract_params(config)
  nnx.replace_by_pure_dict(state, pure)
  out = run(config, state, batch)
  np.testing.assert_allclose(real(out.last_hidden_state, batch), real(torch_outputs.hidden_states[4], batch),
                             rtol=0, atol=1e-5)
  assert out.pooled_output is None


def test_qkv_reproduce_attention_probabilities(teacher, batch):
  config, params = teacher
  layer = config.num_layers - 1
  out = run(config, params, batch, capture=(layer,), return_logits=True)
  got = out.internals[layer]
  b, t, _ = got.query.shape
  q = np.asarray(got.query, np.float64).reshape(b, t, config.num_heads, -1)
  k = np.asarray(got.key, np.float64).reshape(b, t, config.num_heads, -1)
  logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(config.head_dim)
  logits = np.where(batch["attention_mask"][:, None, None, :] == 1, logits, -np.inf)
  ref = np.exp(logits - logits.max(-1, keepdims=True))
  ref /= ref.sum(-1, keepdims=True)
  probs = attention.attention_probs(got.logits, batch["attention_mask"])
  np.testing.assert_allclose(probs, ref, rtol=0, atol=1e-6)


def test_fused_and_explicit_attention_agree(teacher, batch):
  """The two attention routes on every layer's own q, k, v: `fused_attention`
  (`jax.nn.dot_product_attention`, what a layer runs without attention dropout) against
  `explicit_attention` (the probabilities softmax(logits) in memory, what a layer runs
  with it), dropout 0 in both so that only the route differs; and capturing every layer's
  internals leaves the output as it is."""
  config, params = teacher
  plain = run(config, params, batch).last_hidden_state
  captured = run(config, params, batch, capture=tuple(range(config.num_layers)), return_logits=True)
  np.testing.assert_allclose(plain, captured.last_hidden_state, rtol=0, atol=1e-5)
  mask = jnp.asarray(batch["attention_mask"])
  heads = lambda x: x.reshape(*x.shape[:2], config.num_heads, config.head_dim)  # [B,T,D] -> [B,T,N,H]
  for i, x in captured.internals.items():
    fused = attention.fused_attention(heads(x.query), heads(x.key), heads(x.value), mask)
    explicit = attention.explicit_attention(x.logits, heads(x.value), mask)
    assert np.abs(np.asarray(fused)).max() > 0.1, i  # values of real size, not a vacuous 0 == 0
    flat = lambda y: real(np.asarray(y).reshape(*y.shape[:2], -1), batch)
    np.testing.assert_allclose(flat(fused), flat(explicit), rtol=0, atol=1e-5, err_msg=f"layer {i}")


def test_dropout_only_in_training(teacher, batch):
  config, params = teacher
  eval_a = run(config, params, batch).last_hidden_state
  eval_b = run(config, params, batch).last_hidden_state
  train_a = run(config, params, batch, dropout_rng=jax.random.key(0)).last_hidden_state
  train_b = run(config, params, batch, dropout_rng=jax.random.key(1)).last_hidden_state
  train_a2 = run(config, params, batch, dropout_rng=jax.random.key(0)).last_hidden_state
  np.testing.assert_array_equal(eval_a, eval_b)
  np.testing.assert_array_equal(train_a, train_a2)
  assert np.abs(train_a - eval_a).max() > 1e-2
  assert np.abs(train_a - train_b).max() > 1e-2


def test_bfloat16_compute_keeps_float32_params(teacher, batch):
  config, params = teacher
  bf16 = config.replace(dtype="bfloat16")
  out = run(bf16, params, batch, capture=(5,))
  assert out.last_hidden_state.dtype == jnp.bfloat16
  assert out.internals[5].query.dtype == jnp.bfloat16
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(model_lib.init_params(bf16.replace(num_layers=1))))
  ref = run(config, params, batch).last_hidden_state
  # bfloat16 operands (8 mantissa bits: 2^-9 = 2e-3 relative per rounding) compound over
  # six layers to about 1e-2 on the real tokens; a float32 or wrong-dtype path is far off.
  got = real(np.asarray(out.last_hidden_state, np.float32), batch)
  rel = np.linalg.norm(got - real(ref, batch)) / np.linalg.norm(real(ref, batch))
  assert 1e-4 < rel < 2e-2


def test_fresh_student_init():
  config = model_lib.ModelConfig(num_layers=3, hidden_size=384, num_heads=12, intermediate_size=1536)
  params = model_lib.init_params(config, seed=0)
  kernel = np.asarray(params["layers"][0]["query"]["kernel"])
  assert kernel.shape == (384, 384)
  # TF BERT's truncated_normal(0.02): a N(0, 0.02) cut at 2 sigma, whose std is 0.02 * 0.8796.
  assert abs(kernel.std() - 0.02 * 0.8796) < 5e-4 and np.abs(kernel).max() <= 0.04
  assert np.all(np.asarray(params["layers"][0]["query"]["bias"]) == 0)
  assert np.all(np.asarray(params["layers"][0]["output_norm"]["scale"]) == 1)


def test_roberta_position_ids_skip_padding():
  config = model_lib.ModelConfig(model_type="roberta", pad_token_id=1, num_layers=1, hidden_size=32,
                                 num_heads=4, intermediate_size=64, type_vocab_size=1, vocab_size=50)
  ids = jnp.array([[0, 5, 6, 2, 1, 1]])
  emb = model_lib.Embeddings(config, rngs=__import__("flax").nnx.Rngs(0))
  np.testing.assert_array_equal(emb.position_ids(ids), [[2, 3, 4, 5, 1, 1]])
  assert config.max_seq_len == 510


def test_position_limit_of_roberta_models():
  config = model_lib.ModelConfig(model_type="xlm-roberta", max_position_embeddings=514, pad_token_id=1)
  assert config.max_seq_len == 512
  config.check_max_seq_len(512)
  with pytest.raises(ValueError, match="usable 512"):
    config.check_max_seq_len(513)


def test_bad_configs_and_inputs(teacher):
  config, params = teacher
  with pytest.raises(ValueError, match="not a multiple of num_heads"):
    model_lib.ModelConfig(hidden_size=384, num_heads=7)
  with pytest.raises(ValueError, match="unknown model_type 'gpt2'"):
    model_lib.ModelConfig(model_type="gpt2")
  ids = jnp.zeros((1, 513), jnp.int32)
  with pytest.raises(ValueError, match="exceeds the position table.*max_seq_len <= 512"):
    model_lib.apply(config, params, ids)
  with pytest.raises(ValueError, match="capture layers \\[6\\]"):
    model_lib.apply(config, params, ids[:, :8], capture=(6,))


def _scatters(hlo: str) -> list[tuple[str, list[str]]]:
  """(result type, operand types) of every scatter in compiled HLO text (operands by name)."""
  types = dict(re.findall(r"(%[\w.-]+) = (\w+)\[", hlo))
  found = []
  for result, operands in re.findall(r"= (\w+)\[[^=]*? scatter\(([^)]*)\)", hlo):
    found.append((result, [types.get(name.strip(), "?") for name in operands.split(",")]))
  return found


def test_step_keeps_one_float32_scatter_the_word_table():
  """The compiled distillation step (bf16 compute, two token types) has one scatter, the
  word table's gradient, in float32: positions are a broadcast slice and token types a
  `where`, whose gradients are reductions. A bf16 scatter rounds the sum over repeated ids
  ([PAD], token type 0) to 8 bits, and scatters serialised on such ids on an H200 (286 ms
  of a 315 ms step)."""
  from minilm_jax import optimizer as optimizer_lib, sharding
  from minilm_jax import step as step_lib
  from minilm_jax.config import DistillConfig
  teacher = model_lib.ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                                  intermediate_size=64, max_position_embeddings=16)
  cfg = DistillConfig(student_layers=1, student_hidden=32, student_heads=4, max_seq_len=8,
                      global_batch_size=4, compute_dtype="bfloat16", two_segments=True)
  setup = step_lib.make_setup(cfg, teacher)
  optimizer = optimizer_lib.for_distillation(cfg)
  state = step_lib.init_state(cfg, setup, optimizer)
  teacher_params = step_lib.truncate_teacher(setup, model_lib.init_params(teacher))
  batch = {k: jnp.zeros((4, 8), jnp.int32) for k in ("input_ids", "attention_mask", "token_type_ids")}
  step = step_lib.make_train_step(setup, optimizer, sharding.make_mesh())
  scatters = _scatters(step.lower(state, teacher_params, batch).compile().as_text())
  assert len(scatters) == 1, scatters
  result, operands = scatters[0]
  assert result == "f32" and operands[0] == operands[2] == "f32", scatters  # table, ids, rows


def test_embeddings_equal_the_lookups():
  """Slice and `where` give exactly the rows a lookup of the position / token-type ids gives."""
  config = model_lib.ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4,
                                 intermediate_size=64, max_position_embeddings=16, type_vocab_size=3)
  emb = model_lib.Embeddings(config, rngs=__import__("flax").nnx.Rngs(0))
  ids = jnp.array([[5, 6, 7, 0], [8, 9, 0, 0]])
  types = jnp.array([[0, 1, 2, 0], [2, 2, 1, 0]])
  np.testing.assert_array_equal(jnp.broadcast_to(emb.positions(ids), (2, 4, 32)),
                                emb.position_embeddings(emb.position_ids(ids)))
  np.testing.assert_array_equal(emb.token_types(types), emb.token_type_embeddings(types))


def test_attention_dropout_is_its_own_setting(teacher, batch):
  """attention_dropout=0 in training differs from eval only by the hidden dropout."""
  config, params = teacher
  no_dropout = config.replace(hidden_dropout=0.0, attention_dropout=0.0)
  eval_out = run(no_dropout, params, batch).last_hidden_state
  train_out = run(no_dropout, params, batch, dropout_rng=jax.random.key(0)).last_hidden_state
  np.testing.assert_allclose(train_out, eval_out, rtol=0, atol=1e-6)
  attention_only = run(config.replace(hidden_dropout=0.0), params, batch, dropout_rng=jax.random.key(0))
  assert np.abs(real(attention_only.last_hidden_state, batch) - real(eval_out, batch)).max() > 1e-2


def test_a_recomputed_feed_forward_gives_the_same_outputs_and_gradients(teacher, batch):
  """`remat_feed_forward` changes what the backward pass keeps, not what it computes: in
  training (dropout on) the outputs are bit-identical and the parameter gradients equal to
  float32 rounding (1e-6 of the largest), where a dropped gradient or mask would be far off."""
  config, params = teacher
  w = jax.random.normal(jax.random.key(3), (*batch["input_ids"].shape, config.hidden_size))

  def outputs_and_grads(config):
    def loss(params):
      y = run(config, params, batch, dropout_rng=jax.random.key(0)).last_hidden_state
      return jnp.sum(y * w), y
    return jax.grad(loss, has_aux=True)(params)

  kept_grads, kept = outputs_and_grads(config)
  remat_grads, remat = outputs_and_grads(config.replace(remat_feed_forward=True))
  np.testing.assert_array_equal(remat, kept)
  for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(kept_grads), jax.tree.leaves(remat_grads)):
    scale = np.abs(g).max()
    assert scale > 0 or "pooler" in str(path), path  # the pooler is not in the loss
    np.testing.assert_allclose(r, g, rtol=0, atol=1e-6 * scale, err_msg=str(path))
