"""`finetune` / `evaluate` / `data` refuse what they cannot run with before any work or write:
config values, a workdir holding results (without --overwrite) or overlapping the model, an
unfinished distill run as --model, misplaced SQuAD answers, bad flags and commands."""

import dataclasses
import json
import logging
import shutil

import pytest

from minilm_jax import checkpoint, cli
from minilm_jax import model as model_lib
from minilm_jax.config import DistillConfig
from minilm_jax.finetune import FinetuneConfig, checks, source, squad
from tiny import TINY_BERT, write_rte


def exit_of(argv) -> str:
  with pytest.raises(SystemExit) as e:
    cli.main(argv)
  assert e.value.code not in (0, None)
  return str(e.value.code)


@pytest.mark.parametrize("change, field", [
    (dict(dropout=1.5), "dropout"), (dict(learning_rate=-0.001), "learning_rate"),
    (dict(warmup_ratio=2.0), "warmup_ratio"), (dict(epochs=0), "epochs"),
    (dict(batch_size=0), "batch_size"), (dict(eval_batch_size=-4), "eval_batch_size"),
    (dict(learning_rate=float("inf")), "learning_rate"), (dict(clip_grad_norm=float("nan")),
                                                          "clip_grad_norm"),
    (dict(weight_decay=float("-inf")), "weight_decay"), (dict(seed=-1), "seed"),
    (dict(compute_dtype="float61"), "compute_dtype"), (dict(max_seq_len=-1), "max_seq_len"),
    (dict(task="squad2", max_seq_len=64, doc_stride=64), "doc_stride"),
    (dict(max_train_examples=8, batch_size=32), "max_train_examples"),
    (dict(task="glue/sst3"), "sst3"),
])
def test_config_values_are_refused_naming_the_field(change, field):
  with pytest.raises(ValueError, match=field):
    checks.check_config(dataclasses.replace(FinetuneConfig(), **change))


def test_every_float_field_is_range_checked():
  floats = {f.name for f in dataclasses.fields(FinetuneConfig) if f.type is float}
  assert floats == set(checks._RANGES)
  checks.check_config(FinetuneConfig())  # the defaults pass


def _finetune(model, workdir, *extra, data=None):
  """The finetune command line of a tiny RTE run (its data: `data`, else a path not there)."""
  data = data or workdir.parent / "glue"
  return ["finetune", "--task", "rte", "--model", str(model), "--workdir", str(workdir),
          "--data", str(data), "--config.max_seq_len=24", "--config.batch_size=8",
          "--config.eval_batch_size=8", "--config.epochs=1", *extra]


def test_bad_config_is_refused_before_anything_is_written(tiny_dir, tmp_path):
  message = exit_of(_finetune(tiny_dir, tmp_path / "w", "--config.epochs=0"))
  assert "epochs=0 must be an integer >= 1" in message
  assert "dropout=1.5 must be in [0, 1)" in exit_of(
      _finetune(tiny_dir, tmp_path / "w", "--config.dropout=1.5"))
  assert "must be distinct" in exit_of(_finetune(tiny_dir, tmp_path / "w", "--seeds",
                                                 "0,0"))
  assert not (tmp_path / "w").exists()
  assert "RTE/train.tsv not found" in exit_of(_finetune(tiny_dir, tmp_path / "w"))  # no data
  assert list(tmp_path.iterdir()) == []  # neither the workdir nor its temporary sibling


def _old_results(workdir):
  """A finetune workdir as an earlier run left it."""
  (workdir / "seed-0" / "best").mkdir(parents=True)
  (workdir / "seed-0" / "best" / "config.json").write_text("{}")
  (workdir / "seed-0" / "metrics.jsonl").write_text('{"epoch": 1}\n')
  (workdir / "summary.json").write_text('{"old": true}\n')
  return {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}


def test_results_are_never_replaced_without_overwrite_nor_by_an_overlap(tiny_dir, tmp_path):
  workdir = tmp_path / "ft"
  before = _old_results(workdir)
  assert "already holds fine-tuning results" in exit_of(_finetune(tiny_dir, workdir))
  message = exit_of(_finetune(workdir / "seed-0" / "best", workdir, "--overwrite"))
  assert "contains the input" in message
  assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == before
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "notes.txt").write_text("mine")
  assert "not a finetune workdir" in exit_of(_finetune(tiny_dir, tmp_path / "other",
                                                       "--overwrite"))
  (tmp_path / "file").write_text("x")
  assert "is a file: pass a directory" in exit_of(_finetune(tiny_dir, tmp_path / "file"))


def _distill_run(run, step, max_steps, teacher_dir):
  """A distill workdir whose latest checkpoint is `step` of `max_steps` (a tiny student)."""
  checkpoint.save_model(run / "checkpoints", TINY_BERT, model_lib.init_params(TINY_BERT, seed=5),
                        teacher_dir)
  (run / "checkpoints" / "0").rename(run / "checkpoints" / str(step))
  config = dataclasses.asdict(DistillConfig(max_steps=max_steps))
  (run / "config.json").write_text(json.dumps(config))
  return run


def test_an_unfinished_distill_run_is_named_and_refused(tmp_path, teacher_dir, caplog):
  run = _distill_run(tmp_path / "run", 7, 300, teacher_dir)
  with pytest.raises(ValueError, match="stopped at step 7 of 300.*--allow-unfinished"):
    source.model_source(str(run))
  with caplog.at_level(logging.INFO):
    _, info = source.model_source(str(run), allow_unfinished=True)
  assert info["step"] == 7 and info["max_steps"] == 300 and "UNFINISHED" in caplog.text
  assert "stopped at step 7 of 300" in exit_of(_finetune(run, tmp_path / "ft"))
  assert not (tmp_path / "ft").exists()
  done = _distill_run(tmp_path / "done", 300, 300, teacher_dir)
  with caplog.at_level(logging.INFO):
    assert source.model_source(str(done))[1]["step"] == 300
  assert f"distill run {done}, step 300 of 300 (finished)" in caplog.text
  for model in (run, done / "checkpoints"):
    message = exit_of(["evaluate", "--model", str(model), "--task", "rte"])
    assert "distilled encoder without a task head: fine-tune it first" in message


def test_a_teacher_assistant_run_stands_for_its_student_stage(tmp_path, teacher_dir):
  (tmp_path / "ta" / "assistant").mkdir(parents=True)
  with pytest.raises(ValueError, match="has not started its student stage"):
    source.model_source(str(tmp_path / "ta"))
  student = _distill_run(tmp_path / "ta" / "student", 40, 40, teacher_dir)
  model, info = source.model_source(str(tmp_path / "ta"))
  assert model == str(student) and info["run"] == str(student) and info["step"] == 40


def test_overwrite_replaces_results_once_the_new_run_finished(tmp_path, teacher_dir, caplog):
  write_rte(tmp_path / "glue", "train", 20, 0)
  write_rte(tmp_path / "glue", "dev", 8, 1)
  run = _distill_run(tmp_path / "run", 7, 300, teacher_dir)
  workdir = tmp_path / "ft"
  _old_results(workdir)
  shutil.copytree(workdir / "seed-0", workdir / "seed-5")
  with caplog.at_level(logging.INFO):
    cli.main(_finetune(run, workdir, "--overwrite", "--allow-unfinished", data=tmp_path / "glue"))
  assert "the UNFINISHED distill run" in caplog.text
  assert "each epoch leaves out 4 of 20 training rows" in caplog.text
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["model_source"] | {"model": None} == {
      "model": None, "run": str(run), "step": 7, "max_steps": 300, "teacher": "all-MiniLM-L6-v2"}
  assert sorted(p.name for p in workdir.iterdir()) == ["seed-0", "summary.json"]
  assert summary["runs"][0]["hf"] == str(workdir / "seed-0" / "best")
  assert (workdir / "seed-0" / "best" / "model.safetensors").is_file()
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def _articles(n, context="The game was played at Levi's Stadium in Santa Clara."):
  start = context.index("Levi's")
  return [{"title": f"a{i}", "paragraphs": [{"context": context, "qas": [
      {"id": f"a{i}-{j}", "question": "Where?", "answers": [{"text": "Levi's Stadium",
                                                               "answer_start": start}]}
      for j in range(10)]}]} for i in range(n)]


def test_misplaced_squad_answers_are_counted_skipped_and_named(tmp_path, teacher_dir, caplog):
  from minilm_jax import tokenization
  tokenizer = tokenization.load(teacher_dir)
  articles = _articles(4)  # 40 answers
  articles[0]["paragraphs"][0]["qas"][0]["answers"][0]["answer_start"] = 500  # past the context
  articles[0]["paragraphs"][0]["qas"][1]["answers"][0]["answer_start"] = 1    # not at its offset
  path = tmp_path / "squad.json"
  path.write_text(json.dumps({"version": "v2.0", "data": articles}))
  with caplog.at_level(logging.WARNING):
    train, _, _, stats = squad.task_data(path, tokenizer, 48, 8, 2)
  assert "2 of 40 answers are not at their answer_start" in caplog.text
  assert "a0-0" in caplog.text and "outside the 53-character context" in caplog.text
  assert stats["train_examples"] == 18 and stats["train_skipped_misplaced"] == 2
  assert len(train["input_ids"]) == 18
  for qa in articles[1]["paragraphs"][0]["qas"][:3]:  # 5 of 40: above 5%
    qa["answers"][0]["answer_start"] = 2
  path.write_text(json.dumps({"version": "v2.0", "data": articles}))
  with pytest.raises(ValueError, match=r"squad.json: 5 of 40 answers .*more than 5%"):
    squad.task_data(path, tokenizer, 48, 8, 2)
  path.write_text(json.dumps({"version": "v2.0", "data": []}))
  with pytest.raises(ValueError, match="holds no articles"):
    squad.load_squad(path)
  del articles[2]["paragraphs"][0]["qas"][4]["answers"][0]["text"]
  with pytest.raises(ValueError, match=r"squad.json is not in the SQuAD 2.0 layout \(KeyError: 'text'"):
    squad.misplaced_answers(articles, path)
  with pytest.raises(ValueError, match="holds 1 article.*needs at least 2"):
    squad.dev_split(_articles(1), 1)


def test_flag_ranges_and_unknown_commands(capsys):
  assert "flag --show=-3" in exit_of(["data", "--corpus", "demo", "--show", "-3"])
  assert "flag --batch-size=0" in exit_of(["evaluate", "--model", "m", "--batch-size", "0"])
  with pytest.raises(SystemExit) as e:
    cli.main(["distil", "--workdir", "w"])
  err = capsys.readouterr().err
  assert e.value.code == 2 and "unknown command 'distil': did you mean distill?" in err
  assert "finetune" in err
