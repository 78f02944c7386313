"""RoBERTa / XLM-R task heads: exported as *ForSequenceClassification / *ForQuestionAnswering,
loaded by transformers with no missing weights, logits equal to PyTorch's."""

import pathlib

import numpy as np
import pytest
import torch
import transformers

from minilm_jax import tokenization
from minilm_jax.finetune import heads, score, train
from roberta_family import INLINE, build_teacher
from tiny import write_rte

FAMILIES = {"xlm-roberta": "XLMRoberta", "roberta": "Roberta"}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_dir(request, tmp_path_factory):
  return request.param, build_teacher(request.param, tmp_path_factory.mktemp(request.param), INLINE * 3)


def _inputs(batch=3, length=16, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, 60, (batch, length)).astype(np.int32)
  ids[:, 0] = 0  # <s>
  mask = np.ones_like(ids)
  mask[1, 10:] = 0
  ids[mask == 0] = 1  # <pad>: RoBERTa's positions skip it
  return ids, mask, np.zeros_like(ids)


def _randomize(layer, seed):
  rng = np.random.default_rng(seed)
  layer.kernel.value = rng.normal(0, 0.5, layer.kernel.value.shape).astype(np.float32)
  layer.bias.value = rng.normal(0, 0.5, layer.bias.value.shape).astype(np.float32)


def _torch(hf, ids, mask):
  with torch.no_grad():
    return hf.eval()(input_ids=torch.tensor(ids, dtype=torch.long),
                     attention_mask=torch.tensor(mask, dtype=torch.long))


def test_classifier_export_matches_transformers(family_dir, tmp_path):
  family, model_dir = family_dir
  module, tokenizer_dir = train.build_model(train.FinetuneConfig(model=str(model_dir)), 3)
  assert module.encoder.pooler is None  # RoBERTa's head reads <s>, not a pooler
  _randomize(module.classifier_dense, 1)
  _randomize(module.classifier, 2)
  out = heads.export_hf(tmp_path / "cls", module, tokenizer_dir, labels=("a", "b", "c"))
  hf, info = transformers.AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
  assert type(hf).__name__ == f"{FAMILIES[family]}ForSequenceClassification"
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
  assert hf.config.id2label == {0: "a", 1: "b", 2: "c"}
  ids, mask, types = _inputs()
  expected = _torch(hf, ids, mask).logits.numpy()
  assert np.abs(expected).max() > 0.1
  np.testing.assert_allclose(np.asarray(module(ids, mask, types)), expected, atol=1e-5, rtol=1e-5)


def test_qa_export_matches_transformers(family_dir, tmp_path):
  family, model_dir = family_dir
  module, tokenizer_dir = train.build_model(train.FinetuneConfig(model=str(model_dir)), None)
  _randomize(module.qa_outputs, 3)
  out = heads.export_hf(tmp_path / "qa", module, tokenizer_dir)
  hf, info = transformers.AutoModelForQuestionAnswering.from_pretrained(out, output_loading_info=True)
  assert type(hf).__name__ == f"{FAMILIES[family]}ForQuestionAnswering"
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
  ids, mask, types = _inputs(seed=1)
  expected = _torch(hf, ids, mask)
  start, end = module(ids, mask, types)
  np.testing.assert_allclose(np.asarray(start), expected.start_logits.numpy(), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(end), expected.end_logits.numpy(), atol=1e-5, rtol=1e-5)


def test_finetune_run_on_an_xlmr_student_exports_what_it_trained(tmp_path):
  """`finetune` end to end on a tiny XLM-R: the exported best epoch predicts as the run did."""
  from minilm_jax.finetune import glue
  model_dir = build_teacher("xlm-roberta", tmp_path / "xlmr", INLINE * 3)
  write_rte(tmp_path / "glue", "train", 16, 0)
  write_rte(tmp_path / "glue", "dev", 8, 1)
  cfg = train.FinetuneConfig(model=str(model_dir), task="rte", data=str(tmp_path / "glue"),
                                max_seq_len=24, batch_size=8, eval_batch_size=8, epochs=1,
                                learning_rate=1e-3)
  summary = train.run(cfg, tmp_path / "run")
  assert np.isfinite(summary["history"][0]["train_loss"])
  hf = transformers.AutoModelForSequenceClassification.from_pretrained(summary["hf"])
  assert type(hf).__name__ == "XLMRobertaForSequenceClassification"
  tok = tokenization.load(summary["hf"])
  dev = glue.encode_examples(glue.load_glue("rte", tmp_path / "glue", "dev"), tok, "rte", 24)
  assert dev["input_ids"][0, 0] == 0 and (dev["token_type_ids"] == 0).all()  # <s> ..., one segment type
  mine = summary["module"](dev["input_ids"], dev["attention_mask"], dev["token_type_ids"])
  np.testing.assert_allclose(np.asarray(mine), _torch(hf, dev["input_ids"], dev["attention_mask"]).logits.numpy(),
                             atol=1e-5, rtol=1e-5)
  # `evaluate` reads the export back into the module that trained it.
  loaded, _ = score.load_task_model(pathlib.Path(summary["hf"]), "rte")
  np.testing.assert_array_equal(np.asarray(loaded(dev["input_ids"], dev["attention_mask"],
                                                  dev["token_type_ids"])), np.asarray(mine))
