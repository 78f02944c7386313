"""The MiniLM / MiniLMv2 losses against a plain numpy reference written here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minilm_jax import losses
from tiny import internals, mask_of

LENGTHS = [7, 4, 1]  # one full row, one padded, one with a single real token
V1, V2 = losses.TERMS["v1"], losses.TERMS["v2"]  # the papers' terms
PAIRS = {"attention_transfer": ("query", "key"), "value_relation": ("value", "value"),
         "qq_relation": ("query", "query"), "kk_relation": ("key", "key"), "vv_relation": ("value", "value")}


def numpy_relation_loss(ta, tb, sa, sb, mask, heads):
  """Loops over examples, heads and real queries; float64; softmax over real keys only."""
  def rel(a, b, n):
    d = a.shape[-1] // heads
    x = a[:n].reshape(n, heads, d)
    y = b[:n].reshape(n, heads, d)
    logits = np.einsum("thd,shd->hts", x, y) / np.sqrt(d)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)
  total, count = 0.0, 0
  for i in range(ta.shape[0]):
    n = int(mask[i].sum())
    if n == 0:
      continue
    pt, ps = rel(ta[i], tb[i], n), rel(sa[i], sb[i], n)
    total += np.sum(pt * (np.log(pt) - np.log(ps)))
    count += n * heads
  return total / max(count, 1)


@pytest.mark.parametrize("teacher_width,student_width,heads", [(48, 48, 4), (96, 32, 4), (64, 48, 16)])
def test_relation_loss_matches_numpy(teacher_width, student_width, heads):
  rng = np.random.default_rng(teacher_width + student_width)
  t, s, mask = internals(rng, teacher_width), internals(rng, student_width), mask_of(LENGTHS)
  got = losses.relation_loss(t.query, t.key, s.query, s.key, mask, heads)
  want = numpy_relation_loss(*(np.float64(x) for x in (t.query, t.key, s.query, s.key)), mask, heads)
  assert want > 0.05
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_v1_and_v2_are_sums_of_relations():
  rng = np.random.default_rng(0)
  t, s, mask = internals(rng, 48), internals(rng, 24), mask_of(LENGTHS)
  ref = lambda a, b, c, d, h: numpy_relation_loss(*(np.float64(x) for x in (a, b, c, d)), mask, h)
  s1 = internals(rng, 48)
  v1 = losses.minilm_loss(t, s1, mask, 12, V1)
  want = ref(t.query, t.key, s1.query, s1.key, 12) + ref(t.value, t.value, s1.value, s1.value, 12)
  np.testing.assert_allclose(v1["total"], want, rtol=1e-6)
  v2 = losses.minilm_loss(t, s, mask, 6, V2)
  want = sum(ref(getattr(t, n), getattr(t, n), getattr(s, n), getattr(s, n), 6) for n in ("query", "key", "value"))
  np.testing.assert_allclose(v2["total"], want, rtol=1e-6)
  np.testing.assert_allclose(v2["kk_relation"], ref(t.key, t.key, s.key, s.key, 6), rtol=1e-6)


def test_v1_terms_match_numpy():
  rng = np.random.default_rng(1)
  t, s, mask = internals(rng, 48), internals(rng, 36), mask_of(LENGTHS)
  got = losses.minilm_loss(t, s, mask, 12, V1)
  f = lambda x: np.float64(x)
  np.testing.assert_allclose(got["attention_transfer"],
                             numpy_relation_loss(f(t.query), f(t.key), f(s.query), f(s.key), mask, 12), rtol=1e-6)
  np.testing.assert_allclose(got["value_relation"],
                             numpy_relation_loss(f(t.value), f(t.value), f(s.value), f(s.value), mask, 12), rtol=1e-6)


def test_zero_when_student_equals_teacher_and_padding_is_ignored():
  rng = np.random.default_rng(2)
  t, mask = internals(rng, 48), mask_of(LENGTHS)
  np.testing.assert_allclose(losses.minilm_loss(t, t, mask, 8, V2)["total"], 0.0, atol=1e-7)
  # Changing anything at padded positions changes nothing.
  s = internals(rng, 48)
  garbage = jax.tree.map(lambda x: np.where(mask[..., None] == 1, x, 1e3 * rng.normal(size=x.shape)), s)
  np.testing.assert_allclose(losses.minilm_loss(t, s, mask, 12, V1)["total"],
                             losses.minilm_loss(t, garbage, mask, 12, V1)["total"], rtol=1e-6)


def test_gradients_finite_with_fully_padded_row_and_bfloat16():
  rng = np.random.default_rng(3)
  t, s, mask = internals(rng, 48), internals(rng, 24), mask_of([7, 0, 3])
  s16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), s)
  loss, grads = jax.value_and_grad(lambda s: losses.minilm_loss(t, s, mask, 6, V2)["total"])(s16)
  assert np.isfinite(float(loss)) and loss.dtype == jnp.float32
  assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in jax.tree.leaves(grads))
  assert all(np.abs(np.asarray(g, np.float32)).max() > 0 for g in jax.tree.leaves(grads))
  # float32 reference within bfloat16 rounding of the inputs.
  ref = numpy_relation_loss(*(np.float64(np.asarray(x, np.float32)) for x in
                              (t.query, t.query, s16.query, s16.query)), mask, 6)
  np.testing.assert_allclose(losses.relation_loss(t.query, t.query, s16.query, s16.query, mask, 6), ref, rtol=1e-5)
  no_tokens = mask_of([0, 0, 0])
  assert float(losses.minilm_loss(t, internals(rng, 48), no_tokens, 12, V1)["total"]) == 0.0


def test_relation_heads_must_divide_widths():
  rng = np.random.default_rng(4)
  t, s = internals(rng, 48), internals(rng, 40)
  with pytest.raises(ValueError, match="16 relation heads do not divide the hidden size 40"):
    losses.minilm_loss(t, s, mask_of(LENGTHS), 16, V2)


@pytest.mark.parametrize("version,heads", [("v1", 12), ("v2", 6)])
def test_each_term_list_is_the_numpy_sum_of_its_terms(version, heads):
  rng = np.random.default_rng(5)
  t, s, mask = internals(rng, 48), internals(rng, 48 if version == "v1" else 24), mask_of([7, 4, 1])
  names = losses.TERMS[version]
  for chosen in [names[:1], names[1:], names[-1:], names]:
    got = losses.minilm_loss(t, s, mask, heads, chosen)
    assert set(got) == set(chosen) | {"total"}  # only the chosen terms are computed and reported
    want = {n: numpy_relation_loss(*(np.float64(getattr(x, f)) for x in (t, s) for f in PAIRS[n]),
                                   mask, heads) for n in chosen}
    for n in chosen:
      np.testing.assert_allclose(got[n], want[n], rtol=1e-6, err_msg=n)
    np.testing.assert_allclose(got["total"], sum(want.values()), rtol=1e-6)
