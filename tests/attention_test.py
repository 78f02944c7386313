"""Attention: `fused_attention` against numpy (XLA's; cuDNN's and its fused dropout on a GPU),
the TPU route's Pallas splash attention against XLA's, and the route's choice.

The splash kernel runs here in Pallas's interpreter (CPU); the compile test builds the real
Mosaic kernel for a TPU topology with libtpu's compiler, running nothing.
"""

import importlib.util
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from minilm_jax import attention, model as model_lib, sharding
from minilm_jax.aot import hlo as aot_hlo
from minilm_jax.sharding import DATA_AXIS


def _inputs(b=3, t=128, n=2, h=32, lengths=(128, 17, 0)):
  """float32 q, k, v [B, T, N, H] and a right-padded mask whose last row is all padding."""
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32) for _ in range(3))
  mask = jnp.asarray(np.arange(t)[None] < np.asarray(lengths)[:, None], jnp.int32)
  return (q, k, v), mask


def _xla(q, k, v, mask):
  return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :].astype(bool), implementation="xla")


def _splash(q, k, v, mask):
  return attention.splash_attention(q, k, v, mask, interpret=True)


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
  assert attention.attention_implementation(jnp.float32, 32) == "xla"
  with jax.default_matmul_precision("float32"):
    got = np.asarray(attention.fused_attention(q, k, v, jnp.asarray(mask)))
  np.testing.assert_allclose(got, _attention_reference(q, k, v, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs a GPU")
def test_fused_attention_cudnn_matches_numpy_bfloat16():
  """On a GPU, bf16 heads go to cuDNN with the padding as key lengths; bf16 rounding
  (8 mantissa bits on q, k, v and the output) bounds the difference: 2e-2 relative."""
  (q, k, v), mask = _random_attention_inputs(jnp.bfloat16)
  assert attention.attention_implementation(jnp.bfloat16, 32) == "cudnn"
  got = np.asarray(jax.jit(attention.fused_attention)(q, k, v, jnp.asarray(mask)), np.float64)
  want = _attention_reference(q, k, v, mask)
  assert np.linalg.norm(got - want) / np.linalg.norm(want) < 2e-2


def test_attention_dropout_zero_is_the_fused_path_and_dropout_is_inverted():
  """Rate 0 with a key is exactly the no-dropout path (1e-6); rate r zeroes probabilities
  whose 8 random bits of the key are >= (1 - r) 256 and scales the rest by 1 / (1 - r)."""
  (q, k, v), mask = _random_attention_inputs(jnp.float32)
  key = jax.random.key(3)
  with jax.default_matmul_precision("float32"):
    fused = np.asarray(attention.fused_attention(q, k, v, jnp.asarray(mask)))
    zero = np.asarray(attention.fused_attention(q, k, v, jnp.asarray(mask), dropout_rate=0.0, dropout_rng=key))
    dropped = np.asarray(attention.fused_attention(q, k, v, jnp.asarray(mask), dropout_rate=0.25, dropout_rng=key))
  np.testing.assert_allclose(zero, fused, rtol=0, atol=1e-6)
  b, t, n, h = q.shape
  logits = np.einsum("btnh,bsnh->bnts", np.float64(q), np.float64(k)) / np.sqrt(h)
  logits = np.where(mask[:, None, None, :] == 1, logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  keep = np.asarray(jax.random.bits(key, probs.shape, jnp.uint8)) < 192  # 0.75 * 256
  want = np.einsum("bnts,bsnh->btnh", np.where(keep, probs / 0.75, 0.0), np.float64(v))
  np.testing.assert_allclose(dropped, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN fused dropout needs a GPU")
def test_fused_attention_cudnn_dropout_bfloat16():
  """On a GPU, bf16 heads with dropout go to cuDNN with the dropout fused: with v = 1 each
  output is the sum of the kept probabilities / (1 - r), 1 on average (inverted dropout is
  unbiased) but not row by row; the backward pass compiles and is finite."""
  (q, k, _), mask = _random_attention_inputs(jnp.bfloat16)
  assert attention.attention_implementation(jnp.bfloat16, 32, True) == "cudnn"
  ones = jnp.ones_like(k)
  run = jax.jit(lambda q, k, v: attention.fused_attention(q, k, v, jnp.asarray(mask), dropout_rate=0.25,
                                                          cudnn_dropout=True))
  got = np.asarray(run(q, k, ones), np.float32)[mask.astype(bool)]
  assert abs(got.mean() - 1) < 2e-2 and got.std() > 1e-2
  grads = jax.grad(lambda q: run(q, k, ones).astype(jnp.float32).sum())(q)
  assert np.isfinite(np.asarray(grads, np.float32)).all()


@pytest.mark.parametrize("h", [32, 64])
def test_splash_equals_xla_everywhere(h):
  """Forward at every position (padded queries and the all-padding row included) and the
  gradients w.r.t. q, k, v of a weighting of every output position, to 1e-5: the
  padding semantics (queries attend the unpadded keys of their row; a row with none
  averages all its values, with no gradient to its q and k) are XLA's exactly."""
  (q, k, v), mask = _inputs(h=h)
  with jax.default_matmul_precision("float32"):
    got, want = _splash(q, k, v, mask), _xla(q, k, v, mask)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got[2], jnp.broadcast_to(v[2].mean(0), got[2].shape), rtol=0, atol=1e-5)
    w = jax.random.normal(jax.random.key(1), q.shape)
    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v, mask) * w)
    got_grads = jax.grad(loss(_splash), argnums=(0, 1, 2))(q, k, v)
    want_grads = jax.grad(loss(_xla), argnums=(0, 1, 2))(q, k, v)
  for name, g, r in zip("qkv", got_grads, want_grads):
    assert np.abs(np.asarray(r)).max() > 0.1, name  # gradients of real size, not 0 == 0
    np.testing.assert_allclose(g, r, rtol=0, atol=1e-5, err_msg=f"d{name}")
  np.testing.assert_array_equal(got_grads[0][2], 0)  # the filler row: no gradient to q or k
  np.testing.assert_array_equal(got_grads[1][2], 0)


def test_splash_under_a_data_mesh_equals_xla():
  """With a `data` mesh in context the kernel runs per device in shard_map: the same numbers."""
  (q, k, v), mask = _inputs(b=2, lengths=(128, 40))
  mesh = Mesh(np.asarray(jax.devices()[:1]), (DATA_AXIS,))
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), jax.default_matmul_precision("float32"):
    got = jax.jit(_splash)(q, k, v, mask)
  np.testing.assert_allclose(got, _xla(q, k, v, mask), rtol=0, atol=1e-5)


def test_route_follows_the_compile_target_not_the_host():
  """On this CPU host, tracing under a TPU topology's abstract mesh picks splash for
  attention without dropout and XLA with it, or for a length splash cannot tile, which
  warns once and gives XLA's numbers."""
  (q, k, v), mask = _inputs(t=40, lengths=(40, 17, 0))
  assert sharding.target_platform() == jax.default_backend()
  cpu_mesh = Mesh(np.asarray(jax.devices()[:1]), (DATA_AXIS,))
  with jax.sharding.use_abstract_mesh(cpu_mesh.abstract_mesh):
    assert sharding.target_platform() == "cpu"
  tpu = jax.sharding.AbstractMesh((4,), (DATA_AXIS,), abstract_device=jax.sharding.AbstractDevice(
      device_kind="TPU v5 lite", num_cores=1, platform="tpu"))
  with jax.sharding.use_abstract_mesh(tpu):
    assert sharding.target_platform() == "tpu"
  assert attention.attention_implementation(jnp.bfloat16, 32, False, "tpu", 512) == "splash"
  assert attention.attention_implementation(jnp.bfloat16, 32, True, "tpu", 512) == "xla"
  attention.attention_implementation.cache_clear()
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    with jax.sharding.use_abstract_mesh(tpu), jax.default_matmul_precision("float32"):
      first = attention.fused_attention(q, k, v, mask)
      again = attention.fused_attention(q, k, v, mask)
  assert [str(w.message) for w in caught] == [
      "splash attention tiles sequences by 128, not 40; using XLA's attention"]
  np.testing.assert_allclose(first, _xla(q, k, v, mask), rtol=0, atol=1e-6)
  np.testing.assert_array_equal(first, again)
  with pytest.raises(ValueError, match="multiples of 128, not 40 queries"):
    _splash(q, k, v, mask)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu's TPU compiler")
def test_encoder_compiles_to_the_mosaic_kernel_for_a_tpu():
  """A tiny bf16 encoder (head size 32), forward and backward, jitted for a v5e 2x2 under
  its mesh: the attention is the Mosaic kernel (forward and fused backward calls)."""
  from jax.experimental import topologies  # noqa: PLC0415 - only this test needs a topology
  topology = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu")
  mesh = Mesh(np.asarray(topology.devices), (DATA_AXIS,))
  config = model_lib.ModelConfig(vocab_size=64, hidden_size=64, num_layers=1, num_heads=2,
                                 intermediate_size=128, max_position_embeddings=128, dtype="bfloat16")
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P())),
                        model_lib.abstract_params(config))
  ids = jax.ShapeDtypeStruct((8, 128), jnp.int32, sharding=NamedSharding(mesh, P(DATA_AXIS)))

  def loss(params, ids):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      out = model_lib.apply(config, params, ids, (ids > 0).astype(jnp.int32))
      return jnp.sum(out.last_hidden_state.astype(jnp.float32))

  hlo = jax.jit(jax.grad(loss)).lower(params, ids).compile().as_text()
  assert hlo.count("tpu_custom_call") >= 2, "no Mosaic kernel: the attention took XLA's route"
  # q, k and v enter sequence-minor, [B, N, H, T] per device: the head's 32 lanes are not
  # padded to 128, and the forward kernel reads no heads-first [B, N, T, H] copy.
  instructions = aot_hlo.executed(hlo)
  shapes = {i.name: re.sub(r"\{[^}]*\}", "", i.shape) for i in instructions}
  forward = [i for i in instructions if i.name.startswith("splash_mha_fwd")]
  operands = {shapes[o] for i in forward for o in i.operands if shapes[o].startswith("bf16")}
  assert forward and operands == {"bf16[2,2,32,128]"}, operands
