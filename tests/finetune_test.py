"""Task heads vs transformers' BertFor* after export, and tiny end-to-end runs."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx

from minilm_jax import checkpoint, sharding
from minilm_jax.finetune import heads, score, train
from minilm_jax import model as model_lib
from tiny import TINY_BERT, ragged_features, write_rte


def _inputs(seed=0, batch=3, length=16):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1000, 2000, (batch, length)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 10:] = 0
  types = np.zeros_like(ids)
  types[:, 8:] = 1
  return ids, mask, types


def _randomize_head(module, name):
  head = getattr(module, name)
  rng = np.random.default_rng(1)
  head.kernel.value = rng.normal(0, 0.5, head.kernel.value.shape).astype(np.float32)
  head.bias.value = rng.normal(0, 0.5, head.bias.value.shape).astype(np.float32)


@pytest.mark.parametrize("num_labels,regression", [(3, False), (1, True)])
def test_classifier_export_matches_transformers(tiny_dir, tmp_path, num_labels, regression):
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  module, tokenizer_dir = train.build_model(train.FinetuneConfig(model=str(tiny_dir)),
                                               num_labels)
  _randomize_head(module, "classifier")
  labels = None if regression else ("a", "b", "c")
  out = heads.export_hf(tmp_path / "cls", module, tokenizer_dir, labels=labels,
                           regression=regression)
  hf, info = transformers.BertForSequenceClassification.from_pretrained(
      out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  assert hf.config.num_labels == num_labels
  assert hf.config.problem_type == ("regression" if regression else "single_label_classification")
  ids, mask, types = _inputs()
  with torch.no_grad():
    expected = hf.eval()(input_ids=torch.tensor(ids, dtype=torch.long),
                         attention_mask=torch.tensor(mask, dtype=torch.long),
                         token_type_ids=torch.tensor(types, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(np.asarray(module(ids, mask, types)), expected, atol=1e-5, rtol=1e-5)


def test_qa_export_matches_transformers(tiny_dir, tmp_path):
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  module, tokenizer_dir = train.build_model(train.FinetuneConfig(model=str(tiny_dir)), None)
  assert module.encoder.pooler is None
  _randomize_head(module, "qa_outputs")
  out = heads.export_hf(tmp_path / "qa", module, tokenizer_dir)
  hf, info = transformers.BertForQuestionAnswering.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  ids, mask, types = _inputs()
  with torch.no_grad():
    expected = hf.eval()(input_ids=torch.tensor(ids, dtype=torch.long),
                         attention_mask=torch.tensor(mask, dtype=torch.long),
                         token_type_ids=torch.tensor(types, dtype=torch.long))
  start, end = module(ids, mask, types)
  np.testing.assert_allclose(np.asarray(start), expected.start_logits.numpy(), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(end), expected.end_logits.numpy(), atol=1e-5, rtol=1e-5)


def test_encoder_weights_come_from_hf_dir_or_checkpoint(tiny_dir, tmp_path, teacher_dir):
  params = model_lib.init_params(TINY_BERT, seed=3)
  ckpt = checkpoint.save_model(tmp_path / "ckpt", TINY_BERT, params, teacher_dir)
  for source in (tiny_dir, ckpt):
    module, _ = train.build_model(train.FinetuneConfig(model=str(source)), 2)
    got = nnx.state(module.encoder, nnx.Param).to_pure_dict()
    jax.tree.map(np.testing.assert_array_equal, got, params.to_pure_dict())


def test_tiny_glue_run_keeps_best_epoch_and_exports(tiny_dir, tmp_path):
  transformers = pytest.importorskip("transformers")
  write_rte(tmp_path / "glue", "train", 32, 0)
  write_rte(tmp_path / "glue", "dev", 12, 1)
  cfg = train.FinetuneConfig(model=str(tiny_dir), task="rte", data=str(tmp_path / "glue"),
                                max_seq_len=24, batch_size=8, eval_batch_size=8, epochs=3,
                                learning_rate=1e-3)
  summary = train.run(cfg, tmp_path / "run")
  scores = [r["score"] for r in summary["history"]]
  assert len(scores) == 3 and summary["best_score"] == max(scores)
  assert summary["best_epoch"] == scores.index(max(scores)) + 1
  assert all(np.isfinite(r["train_loss"]) for r in summary["history"])
  lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
  hf = transformers.BertForSequenceClassification.from_pretrained(summary["hf"])
  assert hf.config.id2label == {0: "entailment", 1: "not_entailment"}


def test_tiny_squad_run(tiny_dir, tmp_path):
  context = "The game was played on February 7, 2016, at Levi's Stadium in Santa Clara."
  def article(title):
    return {"title": title, "paragraphs": [{"context": context, "qas": [
        {"id": f"{title}-1", "question": "Where was it played?",
         "answers": [{"text": "Levi's Stadium", "answer_start": context.index("Levi's")}]},
        {"id": f"{title}-2", "question": "Who sang?", "answers": []}]}]}
  path = tmp_path / "squad.json"
  path.write_text(json.dumps({"version": "v2.0", "data": [article(f"a{i}") for i in range(5)]}))
  cfg = train.FinetuneConfig(model=str(tiny_dir), task="squad2", data=str(path),
                                squad_train_articles=4, max_seq_len=48, doc_stride=8,
                                batch_size=4, eval_batch_size=4, epochs=1, learning_rate=1e-3)
  summary = train.run(cfg)
  record = summary["history"][0]
  assert record["total"] == 2 and 0 <= record["f1"] <= 100
  assert record["score"] == record["f1"] / 100 and "best_f1" in record


def test_truncated_and_random_baselines(tiny_dir):
  pretrained = model_lib.init_params(TINY_BERT, seed=3).to_pure_dict()
  cfg = train.FinetuneConfig(model=str(tiny_dir), num_layers=1)
  module, _ = train.build_model(cfg, 2)
  got = nnx.state(module.encoder, nnx.Param).to_pure_dict()
  assert module.encoder.config.num_layers == 1 and list(got["layers"]) == [0]
  jax.tree.map(np.testing.assert_array_equal, got["layers"][0], pretrained["layers"][0])
  jax.tree.map(np.testing.assert_array_equal, got["embeddings"], pretrained["embeddings"])
  module, _ = train.build_model(dataclasses.replace(cfg, random_init=True), 2)
  fresh = nnx.state(module.encoder, nnx.Param).to_pure_dict()
  assert module.encoder.config.num_layers == 1
  assert not np.allclose(fresh["embeddings"]["word_embeddings"]["embedding"],
                         pretrained["embeddings"]["word_embeddings"]["embedding"])
  with pytest.raises(ValueError, match="num_layers=5 is outside 1..2"):
    train.build_model(dataclasses.replace(cfg, num_layers=5), 2)


def test_trimming_padding_changes_no_number(tiny_dir):
  """Cutting a batch to its longest row (rounded up) gives the same logits, loss and update."""
  cfg = train.FinetuneConfig(model=str(tiny_dir), dropout=0.0)
  module, _ = train.build_model(cfg, 2)
  graphdef, params = nnx.split(module, nnx.Param)
  mesh = sharding.make_mesh()
  optimizer = train.make_optimizer(cfg, total_steps=10)
  train_step, predict = train.make_steps(graphdef, optimizer, mesh, regression=False)
  features = ragged_features()
  full = score.predict_all(predict, params, features, 8, mesh)
  trimmed = score.predict_all(predict, params, features, 8, mesh, length_bucket=16)
  np.testing.assert_allclose(trimmed, full, rtol=0, atol=1e-5)  # float32, rows back in order

  rows = np.arange(8)
  width = score.trimmed_width(features["attention_mask"][rows], 16)
  assert width == -(-features["attention_mask"][rows].sum(1).max() // 16) * 16 < 64
  results = []
  for w in (64, width):
    batch = {k: v[rows][:, :w] if v.ndim == 2 else v[rows] for k, v in features.items()}
    p, o = jax.tree.map(np.array, params), optimizer.init(params)
    results.append(train_step(p, o, batch, jax.random.key(0), np.int32(3)))
  (p64, _, loss64), (pw, _, lossw) = results
  np.testing.assert_allclose(lossw, loss64, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), pw, p64)


def test_epoch_batches_group_by_length():
  lengths = np.random.default_rng(0).integers(3, 64, 1000)
  rng = lambda: np.random.default_rng(7)
  plain = train.epoch_batches(lengths, 32, rng())
  grouped = train.epoch_batches(lengths, 32, rng(), group_by_length=True, group_batches=10)
  again = train.epoch_batches(lengths, 32, rng(), group_by_length=True, group_batches=10)
  assert all(len(b) == 32 for b in plain + grouped) and len(plain) == len(grouped) == 31
  np.testing.assert_array_equal(np.concatenate(plain), rng().permutation(1000)[:992])
  for batches in (plain, grouped):  # each row at most once; only the ragged tail is left out
    assert len(np.unique(np.concatenate(batches))) == 992
  np.testing.assert_array_equal(np.concatenate(grouped), np.concatenate(again))  # seeded
  widest = lambda batches: np.mean([lengths[b].max() for b in batches])
  spread = lambda batches: np.mean([np.ptp(lengths[b]) for b in batches])
  assert widest(grouped) < 0.75 * widest(plain) and spread(grouped) < 0.2 * spread(plain)
