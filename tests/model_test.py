"""The Flax encoder against PyTorch `transformers` (float32, CPU, eager attention)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from minilm_jax import model as model_lib

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
    probs = model_lib.attention_probs(out.internals[i].logits, batch["attention_mask"])
    np.testing.assert_allclose(real(probs, batch), real(torch_outputs.attentions[i], batch),
                               rtol=0, atol=1e-5, err_msg=f"layer {i}")


def test_truncated_teacher_matches_pytorch_hidden_state(teacher, batch, torch_outputs):
  config, params = teacher
  out = run(config, params, batch, num_layers=4)
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
  probs = model_lib.attention_probs(got.logits, batch["attention_mask"])
  np.testing.assert_allclose(probs, ref, rtol=0, atol=1e-6)


def test_fused_and_explicit_attention_agree(teacher, batch):
  config, params = teacher
  fused = run(config, params, batch).last_hidden_state
  explicit = run(config, params, batch, capture=tuple(range(config.num_layers)), return_logits=True)
  np.testing.assert_allclose(fused, explicit.last_hidden_state, rtol=0, atol=1e-5)


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


def _attention_reference(q, k, v, mask):
  """numpy float64: softmax over unpadded keys of q k^T / sqrt(H), times v; [B, T, N, H]."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  logits = np.where(mask[:, None, None, :] > 0, logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return np.einsum("bnts,bsnh->btnh", p / p.sum(-1, keepdims=True), v)


def _random_attention_inputs(dtype, b=3, t=40, n=4, h=32):
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=(b, t, n, h)).astype(np.float32) for _ in range(3))
  lengths = np.array([t, 17, 1])  # right padding, as every tokenizer and packer here writes it
  mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
  cast = lambda x: jnp.asarray(x, dtype)
  return (cast(q), cast(k), cast(v)), mask


def test_fused_attention_matches_numpy_float32():
  """The path every uncaptured float32 layer takes (XLA's attention), to 1e-5; full float32
  matmuls, since a GPU's default for float32 is TF32 (10 mantissa bits)."""
  (q, k, v), mask = _random_attention_inputs(jnp.float32)
  assert model_lib.attention_implementation(jnp.float32, 32) == "xla"
  with jax.default_matmul_precision("float32"):
    got = np.asarray(model_lib.fused_attention(q, k, v, jnp.asarray(mask)))
  np.testing.assert_allclose(got, _attention_reference(q, k, v, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs a GPU")
def test_fused_attention_cudnn_matches_numpy_bfloat16():
  """On a GPU, bf16 heads go to cuDNN with the padding as key lengths; bf16 rounding
  (8 mantissa bits on q, k, v and the output) bounds the difference: 2e-2 relative."""
  (q, k, v), mask = _random_attention_inputs(jnp.bfloat16)
  assert model_lib.attention_implementation(jnp.bfloat16, 32) == "cudnn"
  got = np.asarray(jax.jit(model_lib.fused_attention)(q, k, v, jnp.asarray(mask)), np.float64)
  want = _attention_reference(q, k, v, mask)
  assert np.linalg.norm(got - want) / np.linalg.norm(want) < 2e-2


def test_embedding_gradients_accumulate_in_float32():
  """bf16 compute still looks embeddings up in float32, so their gradients are float32
  scatter-adds: a bf16 one rounds the sum over repeated ids ([PAD], token type 0) to 8 bits
  and serialised on those ids on an H200 (286 ms of a 315 ms step)."""
  config = model_lib.ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4,
                                 intermediate_size=64, max_position_embeddings=16, dtype="bfloat16")
  params = model_lib.init_params(config)
  ids = jnp.zeros((2, 8), jnp.int32)
  loss = lambda p: model_lib.apply(config, p, ids).last_hidden_state.astype(jnp.float32).sum()
  hlo = jax.jit(jax.grad(loss)).lower(params).as_text(dialect="hlo")
  scatters = [line for line in hlo.splitlines() if " scatter(" in line]
  assert len(scatters) == 3 and all(line.split("=")[1].strip().startswith("f32[") for line in scatters), scatters
