"""`finetune` -> `evaluate` -> export -> PyTorch through the CLI, on slices of the real GLUE files.

A tiny random BERT with the teacher's tokenizer keeps this fast; what is checked is the
plumbing: seeds and summary.json, the per-epoch metrics, that `evaluate` reproduces the
score the run recorded, that transformers loads the export with the JAX logits, and that
bad input stops with an error naming the problem.
"""

import json
import shutil

import numpy as np
import pytest
from sklearn.metrics import accuracy_score

from minilm_jax import cli, convert, tokenization
from minilm_jax.finetune import score, tasks

FLAGS = ["--config.max_seq_len=48", "--config.epochs=2", "--config.batch_size=16",
         "--config.eval_batch_size=32", "--config.learning_rate=1e-3"]


def _slice(src, dst, rows):
  dst.parent.mkdir(parents=True, exist_ok=True)
  dst.write_text("".join(src.open(encoding="utf-8").readlines()[:rows + 1]))


@pytest.fixture(scope="module")
def glue_dir(shared_data, tmp_path_factory):
  """The first 192 train and 96 dev rows of the shared SST-2 TSVs, in the GLUE layout."""
  out = tmp_path_factory.mktemp("glue")
  _slice(shared_data / "glue/SST-2/train.tsv", out / "SST-2/train.tsv", 192)
  _slice(shared_data / "glue/SST-2/dev.tsv", out / "SST-2/dev.tsv", 96)
  return out


@pytest.fixture(scope="module")
def finetuned(tiny_dir, glue_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("ft") / "sst2"
  cli.main(["finetune", "--task", "glue/sst2", "--model", str(tiny_dir), "--workdir",
            str(workdir), "--data", str(glue_dir), "--seeds", "0,1", *FLAGS])
  return workdir


def test_finetune_cli_writes_seeds_and_summary(finetuned):
  summary = json.loads((finetuned / "summary.json").read_text())
  assert summary["task"] == "sst2" and summary["seeds"] == [0, 1]
  assert summary["layers"] == 2 and summary["hidden"] == 32
  assert summary["config"]["max_seq_len"] == 48 and summary["config"]["epochs"] == 2
  assert summary["data"]["train_examples"] == 192 and summary["data"]["eval_examples"] == 96
  assert summary["mean"] == pytest.approx(np.mean(summary["scores"]))
  assert summary["std"] == pytest.approx(np.std(summary["scores"], ddof=1))
  for seed, run in zip((0, 1), summary["runs"]):
    records = [json.loads(l) for l in (finetuned / f"seed-{seed}/metrics.jsonl").open()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(r["examples_per_sec"] > 0 for r in records)
    assert run["best_score"] == max(r["score"] for r in records)
    assert (finetuned / f"seed-{seed}/best/{score.RUN_FILE}").is_file()


def test_evaluate_reproduces_score_and_pytorch_logits(finetuned, glue_dir, capsys):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  summary = json.loads((finetuned / "summary.json").read_text())
  capsys.readouterr()
  cli.main(["evaluate", "--model", str(finetuned / "seed-0"), "--data", str(glue_dir),
            "--batch-size", "32"])
  result = json.loads(capsys.readouterr().out)
  assert result["task"] == "sst2" and result["data"]["max_seq_len"] == 48
  assert result["score"] == summary["runs"][0]["best_score"]

  model_dir = finetuned / "seed-0" / "best"
  module, tokenizer_dir = score.load_task_model(model_dir, "sst2")
  dev = tasks.load("sst2", glue_dir, tokenization.load(tokenizer_dir), max_seq_len=48,
                   with_train=False).eval
  inputs = {k: dev[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
  hf = transformers.BertForSequenceClassification.from_pretrained(model_dir).eval()
  with torch.no_grad():
    expected = hf(**{k: torch.tensor(v, dtype=torch.long) for k, v in inputs.items()}).logits
  logits = np.asarray(module(*inputs.values()))
  np.testing.assert_allclose(logits, expected.numpy(), atol=1e-4, rtol=1e-4)
  # PyTorch's predictions, scored by scikit-learn, give the same dev accuracy.
  assert accuracy_score(dev["labels"], expected.numpy().argmax(-1)) == pytest.approx(
      result["score"])


def test_task_model_files_are_read_once(finetuned, monkeypatch):
  calls = []
  for name in ("read_hf_config", "read_hf_tensors"):
    real = getattr(convert, name)
    monkeypatch.setattr(convert, name, lambda d, real=real, name=name: calls.append(name) or real(d))
  score.load_task_model(finetuned / "seed-0" / "best", "sst2")
  assert sorted(calls) == ["read_hf_config", "read_hf_tensors"]


def _expect_exit(argv, match):
  with pytest.raises(SystemExit) as e:
    cli.main(argv)
  assert match in str(e.value.code), e.value.code


def test_bad_task_and_data_give_clear_errors(tiny_dir, glue_dir, tmp_path):
  base = ["finetune", "--model", str(tiny_dir), "--workdir", str(tmp_path / "run"), *FLAGS]
  _expect_exit([*base, "--task", "glue/sst3", "--data", str(glue_dir)], "unknown task 'glue/sst3'")
  bad = tmp_path / "glue"
  shutil.copytree(glue_dir, bad)
  dev = bad / "SST-2" / "dev.tsv"
  lines = dev.read_text().splitlines()
  dev.write_text("\n".join(["sentence\tgold", *lines[1:]]) + "\n")
  _expect_exit([*base, "--task", "glue/sst2", "--data", str(bad)], "missing column(s) ['label']")
  dev.write_text("\n".join([lines[0], "a fine film .\t2", *lines[1:]]) + "\n")
  _expect_exit([*base, "--task", "glue/sst2", "--data", str(bad)],
               "line 2: label '2' is not one of sst2's labels")


def test_model_without_tokenizer_is_rejected(tiny_dir, glue_dir, tmp_path):
  model = tmp_path / "no-tokenizer"
  shutil.copytree(tiny_dir, model)
  (model / "tokenizer.json").unlink()
  argv = ["finetune", "--task", "glue/sst2", "--model", str(model), "--workdir",
          str(tmp_path / "run"), "--data", str(glue_dir), *FLAGS]
  _expect_exit(argv, "tokenizer.json is missing")


def test_evaluate_rejects_mismatched_model_or_task(finetuned, tiny_dir, glue_dir):
  _expect_exit(["evaluate", "--model", str(finetuned / "seed-0"), "--task", "glue/rte",
                "--data", str(glue_dir)], "fine-tuned on another task")
  _expect_exit(["evaluate", "--model", str(tiny_dir), "--task", "glue/sst2", "--data",
                str(glue_dir)], "needs a fine-tuned BertForSequenceClassification")
  _expect_exit(["evaluate", "--model", str(finetuned), "--data", str(glue_dir)],
               "pass one run, e.g. --model")


@pytest.mark.parametrize("name,canonical", [("glue/sst2", "sst2"), ("SST-2", "sst2"),
                                            ("glue/cola", "cola"), ("squad2", "squad2"),
                                            ("squad/v2.0", "squad2")])
def test_task_names(name, canonical):
  assert tasks.resolve_task(name) == canonical
