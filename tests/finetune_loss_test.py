"""Fine-tuning losses do not depend on how far a batch is padded (trimming is exact)."""

import jax.numpy as jnp
import numpy as np

from minilm_jax.finetune import score, train
from tiny import ragged_features


def _losses_at_widths(module, batch, widths):
  out = []
  for w in widths:
    cut = {k: jnp.asarray(v[:, :w] if v.ndim == 2 else v) for k, v in batch.items()}
    out.append(float(train.task_loss(module, cut, None, regression=False)))
  return out


def test_qa_loss_ignores_padded_positions(tiny_dir):
  """The start/end cross-entropy is over real tokens: padding a batch to 64 or cutting it
  to its longest row (48) gives the same loss (it did not while padded positions took
  part in the softmax)."""
  module, _ = train.build_model(train.FinetuneConfig(model=str(tiny_dir), dropout=0.0), None)
  features = ragged_features(n=8)
  rng = np.random.default_rng(1)
  lengths = features["attention_mask"].sum(1)
  batch = {k: features[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
  batch["start_positions"] = (rng.integers(0, 1000, 8) % lengths).astype(np.int32)
  batch["end_positions"] = np.minimum(batch["start_positions"] + 2, lengths - 1).astype(np.int32)
  batch["start_positions"][0] = batch["end_positions"][0] = 0  # an unanswerable one: [CLS]
  width = score.trimmed_width(features["attention_mask"], 16)
  assert width < 64
  full, trimmed = _losses_at_widths(module, batch, (64, width))
  np.testing.assert_allclose(trimmed, full, rtol=1e-6)

  # The reference: the mean cross-entropy over each row's real positions only, in numpy.
  start, end = (np.asarray(x, np.float64) for x in module(batch["input_ids"], batch["attention_mask"],
                                                          batch["token_type_ids"]))
  def ce(logits, labels):
    return np.mean([np.log(np.exp(row[:n]).sum()) - row[y] for row, n, y in zip(logits, lengths, labels)])
  expected = (ce(start, batch["start_positions"]) + ce(end, batch["end_positions"])) / 2
  np.testing.assert_allclose(full, expected, rtol=1e-5)


def test_classification_loss_is_exact_under_trimming(tiny_dir):
  module, _ = train.build_model(train.FinetuneConfig(model=str(tiny_dir), dropout=0.0), 2)
  batch = ragged_features(n=8)
  width = score.trimmed_width(batch["attention_mask"], 16)
  full, trimmed = _losses_at_widths(module, batch, (64, width))
  np.testing.assert_allclose(trimmed, full, rtol=1e-6)
