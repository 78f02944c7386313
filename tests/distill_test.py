"""The `distill` job end to end: export, exact resume after SIGTERM, bad checkpoints."""

import io
import json
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import tqdm
import transformers

from minilm_jax import checkpoint, cli, data, distill, distill_loop, model as model_lib, preemption, tokenization
from minilm_jax.metric_writer import read_metrics
from tiny import comparable, params_of, smoke_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO = ROOT / "experiments" / "configs" / "demo.py"


def distill_cli(workdir, *overrides, wait=True):
  cmd = [sys.executable, "-m", "minilm_jax", "distill", f"--config={DEMO}:smoke", f"--workdir={workdir}",
         *overrides]
  if not wait:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_smoke_run_exports_a_student_pytorch_loads(tmp_path):
  summary = distill.run(smoke_config(), tmp_path)
  assert summary["steps"] == 4 and np.isfinite(summary["last_loss"])
  records = read_metrics(tmp_path)
  assert [r["step"] for r in records] == [2, 4]
  assert {"loss/total", "loss/attention_transfer", "loss/value_relation", "learning_rate", "grad_norm",
          "tokens_per_sec", "examples_per_sec"} <= set(records[0])
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  config, params, _, step = checkpoint.restore_params(tmp_path)
  assert step == 4 and config.num_layers == 1
  pt, info = transformers.AutoModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
  tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
  batch = tok(["attention relations transfer", "to a small student"], padding=True, return_tensors="np")
  with torch.no_grad():
    ref = pt.eval()(**{k: torch.tensor(v) for k, v in batch.items()}).last_hidden_state.numpy()
  mine = model_lib.apply(config, params, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
  real = batch["attention_mask"].astype(bool)
  np.testing.assert_allclose(np.asarray(mine.last_hidden_state)[real], ref[real], rtol=0, atol=1e-5)


@pytest.mark.parametrize("prng, eval_every", [("rbg", 0), ("auto", 5)])  # auto: threefry, held-out eval on
def test_resume_after_sigterm_is_exact(tmp_path, prng, eval_every):
  steps = ["--config.max_steps=12", "--config.checkpoint_every=3", "--config.log_every=1",
           f"--config.dropout_prng={prng}", f"--config.eval_every={eval_every}",
           f"--config.heldout_documents={2 if eval_every else 0}"]
  straight = distill_cli(tmp_path / "straight", *steps)
  assert straight.returncode == 0, straight.stderr[-2000:]

  interrupted = tmp_path / "interrupted"
  proc = distill_cli(interrupted, *steps, wait=False)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    metrics = interrupted / "metrics.jsonl"
    if metrics.is_file() and len(metrics.read_text().splitlines()) >= 4:
      proc.send_signal(signal.SIGTERM)
      break
    time.sleep(0.05)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == preemption.PREEMPTED_EXIT_CODE != 0, err[-2000:]  # not read as finished
  stopped_at, _ = params_of(interrupted)
  assert 4 <= stopped_at < 12, "SIGTERM should stop the run part-way, with a checkpoint"
  assert not (interrupted / "hf").exists()  # exported only when the run completes

  resumed = distill_cli(interrupted, *steps)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  (s1, p1), (s2, p2) = params_of(tmp_path / "straight"), params_of(interrupted)
  assert s1 == s2 == 12
  for a, b in zip(p1, p2):
    np.testing.assert_array_equal(a, b)  # bit-identical on CPU
  assert comparable(read_metrics(interrupted)) == comparable(read_metrics(tmp_path / "straight"))
  evaluated = [r["step"] for r in read_metrics(interrupted) if "eval/total" in r]
  assert evaluated == ([5, 10, 12] if eval_every else [])


def test_resume_refuses_a_changed_run_and_corrupt_checkpoints(tmp_path):
  distill.run(smoke_config(), tmp_path)
  before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
  with pytest.raises(ValueError, match="another configuration \\(student_layers: 1 -> 2\\).*new --workdir"):
    distill.run(smoke_config(student_layers=2), tmp_path)
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before  # nothing lost
  for f in (tmp_path / "checkpoints" / "4" / "opt_state").rglob("*"):
    if f.is_file() and f.stat().st_size > 200:
      f.write_bytes(b"\0" * 8)
  with pytest.raises(ValueError, match="checkpoints/4 could not be restored.*--resume-from-step 2"):
    distill.run(smoke_config(max_steps=6), tmp_path)
  assert (tmp_path / "checkpoints" / "2").is_dir()  # the earlier checkpoint is intact


def test_cli_reports_bad_input_clearly(tmp_path):
  result = distill_cli(tmp_path / "bad", "--config.student_heads=8")
  assert result.returncode != 0
  assert "teacher has 12 heads and the student 8" in result.stderr
  assert not (tmp_path / "bad").exists()
  result = distill_cli(tmp_path / "bad", "--config.global_batch_size=7", "--config.grad_accum_steps=2")
  assert "global_batch_size 7 is not divisible" in result.stderr


def test_text_corpus_options_reach_the_pipeline(tmp_path):
  books = tmp_path / "books"
  books.mkdir()
  for name in ("a", "b"):
    (books / f"{name}.txt").write_text(f"Book {name} opens here.\n\nIts second paragraph.\n\nA third one.\n")
  cfg = smoke_config(corpus=str(books), doc_per_file=True, two_segments=True, max_steps=2,
                     export_hf=False)
  summary = distill.run(cfg, tmp_path / "run")
  assert summary["corpus"]["documents"] == 2 and summary["steps"] == 2
  assert json.loads((tmp_path / "run" / "config.json").read_text())["doc_per_file"] is True


def test_cli_main_applies_config_overrides_in_process(tmp_path):
  """`cli.main` called from Python reads `--config.*` from its argv, not from sys.argv."""
  cli.main(["distill", f"--config={DEMO}:smoke", f"--workdir={tmp_path}", "--config.max_steps=2",
            "--config.log_every=1", "--config.export_hf=False"])
  assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["max_steps"] == 2 and saved["export_hf"] is False


def test_tokens_per_sec_counts_real_tokens(tmp_path):
  """tokens_per_sec / examples_per_sec is the mean count of real (unpadded) tokens per
  example of the steps a record covers, replayed from the same pipeline: short one-line
  documents leave most of each 32-token example as padding."""
  corpus = tmp_path / "lines.txt"
  corpus.write_text("".join(f"Sentence number {i} is short{'.' * (i % 7)}\n" for i in range(64)))
  cfg = smoke_config(corpus=str(corpus), doc_per_line=True, export_hf=False)
  distill.run(cfg, tmp_path / "run")
  tokenizer = tokenization.for_pretraining(distill.resolve_model_dir(cfg.teacher))
  examples, _ = data.pretraining_examples(str(corpus), tokenizer, max_seq_len=cfg.max_seq_len, doc_per_line=True)
  iterator = data.batch_iterator(examples, global_batch_size=cfg.global_batch_size, seed=cfg.seed)
  real = [int(next(iterator)["attention_mask"].sum()) for _ in range(cfg.max_steps)]
  records = read_metrics(tmp_path / "run")
  assert [r["step"] for r in records] == [2, 4]
  for r, steps in zip(records, (real[:2], real[2:])):
    per_example = sum(steps) / (len(steps) * cfg.global_batch_size)
    assert per_example < 0.8 * cfg.max_seq_len
    assert r["tokens_per_sec"] / r["examples_per_sec"] == pytest.approx(per_example, rel=1e-9)


class _Loss:
  def __init__(self):
    self.ready = False

  def is_ready(self):
    return self.ready


def test_progress_counts_finished_steps():
  bar = tqdm.tqdm(total=10, initial=2, file=io.StringIO())
  progress = distill_loop._Progress(bar)
  losses = [_Loss() for _ in range(4)]
  for step, loss in zip(range(3, 7), losses):
    progress.dispatched(step, loss)
  assert bar.n == 2  # four steps dispatched, none finished
  losses[0].ready = losses[1].ready = losses[3].ready = True
  progress.dispatched(7, _Loss())
  assert bar.n == 4  # steps 3 and 4 are done; 6 is ready but 5, before it, not yet
  progress.finished(6)  # e.g. step 6's metrics were read
  assert bar.n == 6 and [s for s, _ in progress.inflight] == [7]


def test_a_run_resolves_its_teacher_name_once(tmp_path, monkeypatch):
  """The teacher's name becomes a directory where the run starts; every room below it
  (the teacher's weights, the data and tokenizer, the checkpoint's files, the export)
  gets that path and never looks the name up again."""
  from minilm_jax import convert, teachers
  calls, resolve = [], teachers.resolve_model_dir

  def counting(name_or_path):
    calls.append(name_or_path)
    return resolve(name_or_path)

  for module in (teachers, distill, convert):
    monkeypatch.setattr(module, "resolve_model_dir", counting)
  cfg = smoke_config(max_steps=2)
  distill.run(cfg, tmp_path)
  assert [c for c in calls if str(c) == cfg.teacher] == [cfg.teacher]
  assert len(calls) <= 2, calls  # the run's door, and convert.load_hf's (given the path)
