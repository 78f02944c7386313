"""The Hugging Face name table: every parameter of every model named once, both ways exact."""

import jax
import numpy as np
import pytest
import transformers
from flax import nnx

from minilm_jax import hf_names, mlm
from minilm_jax import model as model_lib
from minilm_jax.finetune import heads

TINY = model_lib.ModelConfig(vocab_size=99, hidden_size=8, num_layers=2, num_heads=2,
                             intermediate_size=16, max_position_embeddings=20)
CASES = [(model_type, head) for model_type in ("bert", "roberta", "xlm-roberta")
         for head in (hf_names.SEQUENCE_CLASSIFICATION, hf_names.QUESTION_ANSWERING)]


def _leaves(tree) -> set[tuple]:
  return {tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)
          for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _task_params(config, head):
  module = nnx.eval_shape(lambda: heads.QuestionAnswerer(config, rngs=nnx.Rngs(0))
                          if head == hf_names.QUESTION_ANSWERING
                          else heads.SequenceClassifier(config, 3, rngs=nnx.Rngs(0)))
  return module.encoder.config, nnx.state(module, nnx.Param).to_pure_dict()


@pytest.mark.parametrize("model_type,head", CASES)
def test_task_table_names_every_parameter_once(model_type, head):
  config, params = _task_params(TINY.replace(model_type=model_type), head)
  table = hf_names.task(config, head)
  assert sorted(ours for _, ours, _ in table) == sorted(_leaves(params))
  assert len({hf for hf, _, _ in table}) == len(table)
  prefix = "bert." if model_type == "bert" else "roberta."
  assert all(hf.startswith(prefix) == (ours[0] == "encoder") for hf, ours, _ in table)


@pytest.mark.parametrize("use_pooler", [True, False])
def test_encoder_and_masked_lm_tables_name_every_parameter_once(use_pooler):
  config = TINY.replace(use_pooler=use_pooler)
  encoder = model_lib.abstract_params(config).to_pure_dict()
  assert sorted(ours for _, ours, _ in hf_names.encoder(config)) == sorted(_leaves(encoder))
  pure = {k: v.to_pure_dict() for k, v in mlm.abstract_params(config).items()}
  assert sorted(ours for _, ours, _ in hf_names.task(config, hf_names.MASKED_LM)) == sorted(_leaves(pure))


def test_to_hf_then_from_hf_is_exact():
  config, abstract = _task_params(TINY.replace(model_type="roberta"), hf_names.SEQUENCE_CLASSIFICATION)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), abstract)
  table = hf_names.task(config, hf_names.SEQUENCE_CLASSIFICATION)
  tensors = hf_names.to_hf(table, params)
  assert tensors["classifier.out_proj.weight"].shape == (3, 8)  # [out, in], as PyTorch's Linear
  back = hf_names.from_hf(table, tensors, abstract, "model.safetensors")
  jax.tree.map(np.testing.assert_array_equal, back, params)
  with pytest.raises(ValueError, match="holds 1 tensors that config.json does not imply: stray;"):
    hf_names.from_hf(table, tensors | {"stray": np.zeros(1)}, abstract, "model.safetensors")
  with pytest.raises(ValueError, match="lacks 1 tensors that config.json implies, e.g. "
                     r"\['roberta.embeddings.LayerNorm.bias'\]"):
    hf_names.from_hf(table, {k: v for k, v in tensors.items() if k != "roberta.embeddings.LayerNorm.bias"},
                     abstract, "model.safetensors")
  del tensors["classifier.dense.bias"]
  with pytest.raises(ValueError, match="lacks the task head's classifier.dense.bias: .*export the task "
                     "model again"):
    hf_names.from_hf(table, tensors, abstract, "model.safetensors")


@pytest.mark.parametrize("model_type", sorted(hf_names.ARCHITECTURES))
def test_architectures_are_transformers_classes_of_the_model_type(model_type):
  """What an export writes in config.json's `architectures`, for the encoder and each head,
  is a class transformers has, of the same model type."""
  for head in (None, hf_names.SEQUENCE_CLASSIFICATION, hf_names.QUESTION_ANSWERING, hf_names.MASKED_LM):
    cls = getattr(transformers, hf_names.architecture(model_type, head))
    assert cls.config_class.model_type == model_type, (head, cls)
