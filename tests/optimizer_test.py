"""The learning-rate schedule and which parameters weight decay touches."""

import numpy as np

from minilm_jax import model as model_lib, optimizer as optimizer_lib


def test_schedule_warms_up_then_decays():
  schedule = optimizer_lib.warmup_linear_decay(1e-3, 10, 110)
  np.testing.assert_allclose([schedule(0), schedule(5), schedule(10), schedule(60), schedule(110)],
                             [0, 5e-4, 1e-3, 5e-4, 0], atol=1e-9)


def test_decay_mask_spares_biases_and_layer_norm():
  params = model_lib.init_params(model_lib.ModelConfig(num_layers=1, hidden_size=32, num_heads=4,
                                                       intermediate_size=64, vocab_size=64))
  mask = optimizer_lib.decay_mask(params)
  assert mask["layers"][0]["query"]["kernel"].get_value() is True
  assert mask["embeddings"]["word_embeddings"]["embedding"].get_value() is True
  assert mask["layers"][0]["query"]["bias"].get_value() is False
  assert mask["layers"][0]["output_norm"]["scale"].get_value() is False
