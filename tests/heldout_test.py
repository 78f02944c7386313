"""Held-out evaluation: whole documents never trained on, their loss without dropout, the records."""

import collections
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from minilm_jax import data, distill, heldout, losses, sharding, teachers, tokenization, workdir
from minilm_jax import model as model_lib
from minilm_jax import step as step_lib
from minilm_jax.config import DistillConfig, check_config
from minilm_jax.metric_writer import read_metrics
from tiny import comparable, params_of, smoke_config, tiny_cfg

TEACHER = teachers.resolve_model_dir("all-MiniLM-L6-v2")


@pytest.fixture(scope="module")
def demo():
  return data.pretraining_examples("demo", tokenization.for_pretraining(TEACHER), max_seq_len=32)[0]


def rows_of(batch) -> collections.Counter:
  return collections.Counter(row.tobytes() for row in batch["input_ids"])


def test_heldout_documents_are_whole_fixed_by_the_seed_and_never_in_a_training_batch(demo):
  train, held = data.hold_out(demo, 4, seed=0)
  chosen = set(np.unique(held.documents))
  assert len(chosen) == 4 and chosen.isdisjoint(train.documents)
  # Whole documents: every example of a chosen document is held out, every other one trained on.
  assert len(train) == len(demo) - len(held) == np.isin(demo.documents, list(chosen), invert=True).sum()
  assert np.array_equal(held.documents, np.sort(held.documents))  # corpus order
  assert set(np.unique(data.hold_out(demo, 4, seed=0)[1].documents)) == chosen
  assert set(np.unique(data.hold_out(demo, 4, seed=1)[1].documents)) != chosen
  unchanged, none = data.hold_out(demo, 0, seed=0)
  assert unchanged is demo and none is None
  # An epoch as one batch: exactly the training examples. (Not "no held-out text": two demo
  # documents share paragraphs, so some held-out rows also are training rows.)
  epoch = next(data.batch_iterator(train, global_batch_size=len(train), seed=0, num_epochs=1,
                                   process_index=0, process_count=1))
  assert rows_of(epoch) == rows_of(train.gather(np.arange(len(train))))
  assert rows_of(epoch) + rows_of(held.gather(np.arange(len(held)))) == rows_of(
      demo.gather(np.arange(len(demo))))
  with pytest.raises(ValueError, match="heldout_documents=79 leaves no document to train on: the corpus "
                                       "has 79 documents with text; hold out fewer"):
    data.hold_out(demo, 79, seed=0)


def test_each_process_takes_its_block_of_every_heldout_batch(demo):
  held = data.hold_out(demo, 2, seed=0)[1]
  assert len(held) == 14  # two global batches of 8, the last with 2 padding rows
  whole = heldout.batches(held, 8, 0, 1)
  assert len(whole) == 2 and all(v.shape == (8, 32) for b in whole for v in b.values())
  np.testing.assert_array_equal(whole[1]["attention_mask"][6:], 0)
  np.testing.assert_array_equal(whole[1]["input_ids"][6:], held.special.pad)
  everything = {k: np.concatenate([b[k] for b in whole])[:14] for k in whole[0]}
  for k, v in held.gather(np.arange(14)).items():
    np.testing.assert_array_equal(everything[k], v)
  for count in (2, 4):
    blocks = [heldout.batches(held, 8, p, count) for p in range(count)]
    for i, batch in enumerate(whole):
      for k in batch:
        np.testing.assert_array_equal(np.concatenate([b[i][k] for b in blocks]), batch[k])


@pytest.mark.parametrize("changes, message", [
    ({"eval_every": 10}, r"eval_every=10 needs a held-out set: set --config.heldout_documents=N"),
    ({"eval_every": 10, "heldout_documents": 2, "objective": "mlm"}, "eval_every=10 with objective='mlm'.*use eval_every=0"),
    ({"heldout_documents": -1}, "heldout_documents=-1 must be an integer >= 0"),
    ({"eval_every": True}, "eval_every=True must be an integer >= 0"),
])
def test_bad_heldout_settings_are_refused(changes, message):
  with pytest.raises(ValueError, match=message):
    check_config(DistillConfig(**changes))
  check_config(DistillConfig(heldout_documents=2))  # a held-out set without evaluation is fine


def reference_loss(setup, params, teacher_params, batch):
  """MiniLM's v1 terms over `batch` as one batch, student in eval mode, with the loss module's
  [B, R, T, S] reference (`relation_loss`), not the step's blockwise loss."""
  args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
  (t_layer,), (s_layer,) = setup.teacher_layers, setup.student_layers
  t = model_lib.apply(setup.teacher, teacher_params, *args, capture=(t_layer,)).internals[t_layer]
  s = model_lib.apply(setup.student, params, *args, capture=(s_layer,)).internals[s_layer]
  mask, r = batch["attention_mask"], setup.relation_heads
  terms = {"attention_transfer": losses.relation_loss(t.query, t.key, s.query, s.key, mask, r),
           "value_relation": losses.relation_loss(t.value, t.value, s.value, s.value, mask, r)}
  return {k: float(v) for k, v in terms.items()} | {"total": float(sum(terms.values()))}


def test_evaluation_equals_the_loss_over_all_heldout_examples_without_dropout(demo, teacher):
  """A fixed student, dropout 0.1 in its config: the evaluation over 2 batches (the last
  padded) equals the loss of all 14 examples at once with dropout off."""
  teacher_config, teacher_params = teacher
  cfg = tiny_cfg(student_dropout=0.1, student_attention_dropout=0.1)
  setup = step_lib.make_setup(cfg, teacher_config)
  params = model_lib.init_params(setup.student, seed=5)
  tp = step_lib.truncate_teacher(setup, teacher_params)
  held = data.hold_out(demo, 2, seed=0)[1]
  mesh = sharding.make_mesh()
  evaluation = heldout.Evaluation(step_lib.distillation(setup).loss, mesh, held, batch_size=8,
                                  eval_every=3, max_steps=10)
  assert [s for s in range(1, 11) if evaluation.due(s)] == [3, 6, 9, 10]
  assert evaluation(4, params, tp) == {}
  got = evaluation(9, params, tp)
  assert got["eval_seconds"] > 0
  want = reference_loss(setup, params, tp, held.gather(np.arange(len(held))))
  for term, value in want.items():
    assert float(got[f"eval/{term}"]) == pytest.approx(value, rel=1e-6, abs=1e-7), term
  assert evaluation.last == {"step": 9} | {k: float(got[f"eval/{k}"]) for k in want}
  # With dropout the loss of the same examples differs: the evaluation really runs without it.
  batch = held.gather(np.arange(len(held)))
  dropped, _ = step_lib.distill_loss(params, tp, batch, jax.random.key(0), setup)
  assert abs(float(dropped) - want["total"]) > 1e-3


def tensorboard_tags(run: pathlib.Path) -> set[str]:
  """Scalar tags of a run's TensorBoard files (TFRecords: length, its CRC, an Event, its CRC)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  tags = set()
  for path in (run / "tensorboard").glob("events.out.tfevents.*"):
    raw, i = path.read_bytes(), 0
    while i < len(raw):
      n = int.from_bytes(raw[i:i + 8], "little")
      tags |= {v.tag for v in event_pb2.Event.FromString(raw[i + 12:i + 12 + n]).summary.value}
      i += n + 16
  return tags


def test_a_run_logs_eval_terms_and_evaluating_changes_no_training(tmp_path, monkeypatch):
  trained_on = []
  batch_iterator = data.batch_iterator
  monkeypatch.setattr(data, "batch_iterator", lambda examples, **kw: trained_on.append(examples) or
                      batch_iterator(examples, **kw))
  cfg = smoke_config(heldout_documents=2, eval_every=3, max_steps=4, export_hf=False)
  summary = distill.run(cfg, tmp_path / "eval")
  records = json.loads((tmp_path / "eval" / "corpus.json").read_text())["heldout"]
  assert records["examples"] == 14 and len(records["documents"]) == 2
  assert set(records["documents"]).isdisjoint(trained_on[0].documents)
  metrics = read_metrics(tmp_path / "eval")
  assert [r["step"] for r in metrics] == [2, 3, 4]  # log_every 2; the evaluation at 3 is written too
  evals = [{k.removeprefix("eval/"): v for k, v in r.items() if k.startswith("eval/")} for r in metrics]
  terms = ["attention_transfer", "total", "value_relation"]
  assert [sorted(e) for e in evals] == [[], terms, terms] and metrics[1]["eval_seconds"] > 0
  assert all(r["tokens_per_sec"] > 0 for r in metrics)  # evaluations are not training time
  assert summary["last_eval"] == {"step": 4} | evals[2]
  assert {"eval/total", "eval/attention_transfer", "loss/total"} <= tensorboard_tags(tmp_path / "eval")

  plain_cfg = smoke_config(heldout_documents=2, max_steps=4, export_hf=False)
  plain = distill.run(plain_cfg, tmp_path / "plain")
  assert "last_eval" not in plain
  without_eval = [{k: v for k, v in r.items() if not k.startswith("eval")} for r in metrics]
  logged = [r for r in without_eval if r["step"] != 3]  # step 3 was written for its evaluation
  assert comparable(read_metrics(tmp_path / "plain")) == comparable(logged)
  for a, b in zip(params_of(tmp_path / "eval")[1], params_of(tmp_path / "plain")[1]):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match=r"another configuration \(heldout_documents: 2 -> 3\)"):
    distill.run(smoke_config(heldout_documents=3, max_steps=4), tmp_path / "plain")


def test_resume_refuses_another_heldout_set(demo, tmp_path):
  cfg = smoke_config()
  before = workdir.corpus_record(cfg, demo)  # a run without a held-out set
  after = workdir.corpus_record(cfg, demo, data.hold_out(demo, 2, seed=0)[1])
  assert after["sha256"] == before["sha256"] and "heldout" not in before
  workdir.write(tmp_path, cfg, before)
  workdir.check_corpus(tmp_path, before)
  with pytest.raises(ValueError, match=r"held-out set differs .*\(none -> documents \[50, 66\]\).*--workdir"):
    workdir.check_corpus(tmp_path, after)


FOUR_DEVICES = r"""
import json, sys
import jax, numpy as np
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/.."]
from tiny import tiny_cfg
from minilm_jax import convert, data, heldout, model as model_lib, sharding, step as step_lib, teachers, tokenization
teacher = teachers.resolve_model_dir("all-MiniLM-L6-v2")
config, params = convert.load_hf(teacher)
setup = step_lib.make_setup(tiny_cfg(), config)
student, tp = model_lib.init_params(setup.student, seed=5), step_lib.truncate_teacher(setup, params)
held = data.hold_out(data.pretraining_examples("demo", tokenization.for_pretraining(teacher), max_seq_len=32)[0],
                     2, seed=0)[1]
out = {}
for name, devices in (("one", jax.devices()[:1]), ("four", jax.devices())):
  evaluation = heldout.Evaluation(step_lib.distillation(setup).loss, sharding.make_mesh(devices), held,
                                  batch_size=8, eval_every=1, max_steps=1)
  out[name] = {k: float(v) for k, v in evaluation(1, student, tp).items() if k.startswith("eval/")}
print(json.dumps({"devices": jax.device_count(), **out}))
"""


def test_four_devices_evaluate_as_one():
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
         "PATH": "/usr/bin:/bin"}
  result = subprocess.run([sys.executable, "-c", FOUR_DEVICES, str(pathlib.Path(__file__).parent)],
                          capture_output=True, text=True, timeout=600, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  got = json.loads(result.stdout.strip().splitlines()[-1])
  assert got["devices"] == 4 and got["one"].keys() == got["four"].keys() != set()
  for k in got["one"]:
    assert got["four"][k] == pytest.approx(got["one"][k], rel=1e-6), k


def test_plot_metrics_draws_eval_terms_beside_training_terms(tmp_path, monkeypatch):
  from experiments.scripts import plot_metrics  # pylint: disable=g-import-not-at-top
  terms = {"loss/total": 1.0, "loss/attention_transfer": 0.6, "loss/value_relation": 0.4,
           "learning_rate": 1e-4, "grad_norm": 1.0, "tokens_per_sec": 10.0}
  held = {"eval/total": 1.2, "eval/attention_transfer": 0.7, "eval/value_relation": 0.5}
  records = [{"step": s} | terms | (held if s % 20 == 0 else {}) for s in range(10, 70, 10)]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  monkeypatch.setattr(plot_metrics, "RESULTS", tmp_path / "results")
  plot_metrics.main(["--workdir", str(tmp_path), "--name", "run"])
  assert (tmp_path / "results" / "run-loss.png").is_file()
  lines = {line.get_label(): line for line in plot_metrics.plt.gcf().axes[0].get_lines()}
  assert sorted(lines) == sorted(["total", "attention_transfer", "value_relation", "total (held-out)",
                                  "attention_transfer (held-out)", "value_relation (held-out)"])
  assert list(lines["total (held-out)"].get_xdata()) == [20, 40, 60]
  assert lines["total (held-out)"].get_color() == lines["total"].get_color()
  table = (tmp_path / "results" / "run.md").read_text().splitlines()
  assert "| step | loss/attention_transfer | loss/total | loss/value_relation | eval/attention_transfer" in table[4]
  assert "| 10 | 0.6 | 1 | 0.4 |  |  |  | 0.0001 | 1 | 10 |" in table
  assert "| 20 | 0.6 | 1 | 0.4 | 0.7 | 1.2 | 0.5 | 0.0001 | 1 | 10 |" in table
