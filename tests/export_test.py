"""Exports are what their teacher was: the sentence-transformers pipeline, and a model card."""

import json
import logging
import shutil
import sys

import huggingface_hub
import numpy as np
import pytest
import sentence_transformers

from minilm_jax import checkpoint, cli, convert, distill, model_card, sentence_transformers_files
from minilm_jax import model as model_lib
from minilm_jax.config import DistillConfig
from minilm_jax.finetune import train
from minilm_jax.metric_writer import read_metrics
from tiny import TINY_BERT, write_rte

SENTENCES = ["A man is eating food.", "The cat sat on the mat while it rained outside.", "Hi"]


def pipeline(model_dir):
  st = sentence_transformers.SentenceTransformer(str(model_dir), device="cpu")
  return st, [type(m).__name__ for m in st]


def jax_embeddings(model_dir, features):
  """Our encoder on the tokens sentence-transformers made: mean over the mask, then L2-normalised."""
  config, params = convert.load_hf(model_dir)
  ids, mask = (features[k].numpy() for k in ("input_ids", "attention_mask"))
  hidden = np.asarray(model_lib.apply(config, params, ids, mask, features["token_type_ids"].numpy())
                      .last_hidden_state, np.float64)
  mean = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  return mean / np.linalg.norm(mean, axis=1, keepdims=True)


def card(model_dir):
  """The export's README.md, read by huggingface_hub (which checks the metadata parses)."""
  return huggingface_hub.ModelCard.load(model_dir / "README.md")


@pytest.mark.parametrize("source", ["tiny", "teacher"])
def test_convert_export_is_the_teachers_sentence_transformer(teacher_dir, tmp_path, source):
  """Through an Orbax checkpoint and `convert --to-hf`, the student builds the teacher's
  pipeline (Pooling fitted to its width) and embeds as our encoder does, mean-pooled, normalised."""
  config, params = ((TINY_BERT, model_lib.init_params(TINY_BERT, seed=3)) if source == "tiny"
                    else convert.load_hf(teacher_dir))
  checkpoint.save_model(tmp_path / "ck", config, params, teacher_dir)
  cli.convert(["--from-checkpoint", str(tmp_path / "ck"), "--to-hf", str(tmp_path / "hf")])
  st, modules = pipeline(tmp_path / "hf")
  assert modules == pipeline(teacher_dir)[1] == ["Transformer", "Pooling", "Normalize"]
  assert st.max_seq_length == min(256, config.max_position_embeddings)
  got = st.encode(SENTENCES, convert_to_numpy=True)
  assert got.shape == (len(SENTENCES), config.hidden_size)
  np.testing.assert_allclose(got, jax_embeddings(tmp_path / "hf", st.tokenize(SENTENCES)),
                             rtol=0, atol=1e-5)
  if source == "teacher":
    np.testing.assert_allclose(got, pipeline(teacher_dir)[0].encode(SENTENCES), rtol=0, atol=1e-5)
  meta = card(tmp_path / "hf").data
  assert (meta.library_name, meta.pipeline_tag) == ("sentence-transformers", "sentence-similarity")
  assert "step 0" in card(tmp_path / "hf").text


def test_teacher_with_its_transformer_in_a_folder(teacher_dir, tmp_path):
  """Older sentence-transformers releases keep the Transformer in 0_Transformer/: the student's
  is its own weights, at the top of the export."""
  teacher = tmp_path / "teacher"
  shutil.copytree(teacher_dir, teacher, ignore=shutil.ignore_patterns("*.safetensors"))
  listed = json.loads((teacher / "modules.json").read_text())
  listed[0]["path"] = "0_Transformer"
  (teacher / "modules.json").write_text(json.dumps(listed))
  (teacher / "0_Transformer").mkdir()
  (teacher / "sentence_bert_config.json").rename(teacher / "0_Transformer" / "sentence_bert_config.json")
  out = convert.save_hf(tmp_path / "hf", TINY_BERT, model_lib.init_params(TINY_BERT, seed=3), teacher)
  st, modules = pipeline(out)
  assert modules == ["Transformer", "Pooling", "Normalize"] and not (out / "0_Transformer").exists()
  assert st.max_seq_length == 128 and st.encode(["Hi"]).shape == (1, TINY_BERT.hidden_size)


def test_dense_module_of_another_width_leaves_the_files_out(teacher_dir, tmp_path, caplog):
  teacher = tmp_path / "teacher"
  teacher.mkdir()
  for name in sentence_transformers_files.TOP_FILES:
    (teacher / name).write_bytes((teacher_dir / name).read_bytes())
  (teacher / "modules.json").write_text(json.dumps(
      [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
       {"idx": 1, "name": "1", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]))
  (teacher / "2_Dense").mkdir()
  (teacher / "2_Dense" / "config.json").write_text('{"in_features": 384, "out_features": 256}')
  assert sentence_transformers_files.fitted_files(teacher, TINY_BERT) is None
  with caplog.at_level(logging.WARNING):
    sentence_transformers_files.copy(teacher, tmp_path / "out", TINY_BERT)
  assert not (tmp_path / "out").exists() and "2_Dense takes width 384" in caplog.text
  (teacher / "modules.json").write_text("[")
  with pytest.raises(ValueError, match="modules.json is not valid JSON"):
    sentence_transformers_files.modules(teacher)


@pytest.mark.parametrize("objective", ["distill", "mlm"])
def test_distill_exports_carry_pipeline_and_card(tmp_path, monkeypatch, objective):
  """The run's own export and a `convert` of an earlier step: cards naming the teacher, the
  steps and the command the run was started with."""
  run = tmp_path / "run"
  argv = ["/x/minilm_jax/__main__.py", "distill", "--config", "c.py", "--workdir", str(run)]
  monkeypatch.setattr(sys, "argv", argv)
  cfg = DistillConfig(objective=objective, version="v2", relation_heads=4, teacher_assistant="off",
                      student_layers=1, student_hidden=32, student_heads=2, max_seq_len=32,
                      global_batch_size=8, max_steps=4, warmup_steps=1, log_every=2,
                      checkpoint_every=2)
  summary = distill.run(cfg, run)
  assert pipeline(summary["hf"])[1] == ["Transformer", "Pooling", "Normalize"]
  cli.convert(["--from-checkpoint", str(run), "--step", "2", "--to-hf", str(tmp_path / "s2")])
  records = read_metrics(run)
  for out, step in ((run / "hf", 4), (tmp_path / "s2", 2)):
    got = card(out)
    assert got.data.library_name == "sentence-transformers"
    assert got.data.base_model == (None if objective == "mlm" else "sentence-transformers/all-MiniLM-L6-v2")
    assert got.data.language == "en"
    last = [r for r in records if r["step"] == step][0]
    assert f"Steps: {step} of 4" in got.text and "`all-MiniLM-L6-v2`" in got.text
    assert f"total {last['loss/total']:.4f}" in got.text and f"{step * 8 * 32:,} tokens seen" in got.text
    assert f"python -m minilm_jax distill --config c.py --workdir {run}" in got.text
    assert ("Teacher: `all-MiniLM-L6-v2` (6 layers)" in got.text) == (objective == "distill")
    assert ("Layers: teacher 6 -> student last" in got.text) == (objective == "distill")
    assert ("Relation heads: 4" in got.text) == (objective == "distill")
  with (run / "metrics.jsonl").open("a") as f:  # held-out terms, as an evaluating run logs them
    f.write(json.dumps({"step": 4, "eval/total": 1.5, "eval/vv_relation": 0.25}) + "\n")
  text = model_card.for_run(run, 4, run / "checkpoints" / "tokenizer")
  assert "Final held-out loss (step 4): total 1.5000, vv_relation 0.2500" in text
  if objective == "mlm":
    lm = card(run / "hf-mlm")
    assert (lm.data.library_name, lm.data.pipeline_tag) == ("transformers", "fill-mask")
    assert not (run / "hf-mlm" / "modules.json").exists()


def test_finetune_export_carries_card(tiny_dir, tmp_path):
  write_rte(tmp_path / "glue", "train", 16, 0)
  write_rte(tmp_path / "glue", "dev", 8, 1)
  cfg = train.FinetuneConfig(model=str(tiny_dir), task="rte", data=str(tmp_path / "glue"),
                             max_seq_len=24, batch_size=8, eval_batch_size=8, epochs=1)
  summary = train.run(cfg, tmp_path / "run" / "seed-0")
  got = card(tmp_path / "run" / "seed-0" / "best")
  assert (got.data.library_name, got.data.pipeline_tag) == ("transformers", "text-classification")
  assert got.data.datasets == ["nyu-mll/glue"] and got.data.base_model is None
  assert f"dev score {summary['best_score']:.4f}" in got.text and str(tiny_dir) in got.text
  record = read_metrics(tmp_path / "run" / "seed-0")[0]
  seconds = record["step"] * 8 / record["examples_per_sec"] + record["eval_seconds"]
  assert f"wall time {seconds:.0f} s" in got.text
  assert (f"python -m minilm_jax finetune --task rte --model {tiny_dir} --workdir {tmp_path / 'run'} "
          f"--data {tmp_path / 'glue'} --seeds 0" in got.text) and "--config.epochs=1" in got.text
  assert not (tmp_path / "run" / "seed-0" / "best" / "modules.json").exists()
