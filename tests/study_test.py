"""experiments/study/: every budget is a valid run, the plan orders and skips work, and the
table merges per-seed runs (a real end-to-end try is `--budget tiny`, minutes)."""

import json

import jax
import numpy as np
import pytest

from experiments.study import report as study_report, study
from minilm_jax import convert, step as step_lib


@pytest.mark.parametrize("name", sorted(study.BUDGETS))
def test_budgets_make_valid_runs_with_equal_tokens(name, teacher, tmp_path):
  budget = study.BUDGETS[name]
  paths = study.Paths.make(tmp_path, tmp_path / "record", None)
  configs = [study.distill_config(budget, paths, m) for m in study.METHODS]
  for cfg in configs:
    step_lib.make_setup(cfg, teacher[0])
    assert (cfg.max_steps, cfg.global_batch_size, cfg.max_seq_len, cfg.seed) == (
        budget.steps, budget.batch, budget.seq_len, 0)  # same batches, same tokens
  steps = study.curve_steps(budget)
  assert len(steps) == budget.curve_points >= 2 and steps[-1] == budget.steps
  assert all(s % configs[0].checkpoint_every == 0 for s in steps[:-1])  # each one is saved
  assert configs[0].keep_checkpoints > budget.curve_points
  assert set(budget.tasks) == set(study.TASKS)


def test_plan_puts_the_headline_first_and_skips_finished_runs(tmp_path):
  budget = study.BUDGETS["cpu"]
  paths = study.Paths.make(tmp_path, tmp_path / "record", None)
  names = [name for name, _, _ in study.plan(budget, paths, {"distill", "finetune"})]
  assert names[0] == "pretrain minilm-v1"
  assert names.index("finetune random-L3 sst2 seed 0") < names.index("pretrain minilm-v2")
  assert len(names) == len(set(names))
  assert names.index("finetune minilm-v1@step333 cola seed 0") < names.index("finetune teacher-L6 sst2 seed 0")
  assert "finetune minilm-v1@step333 rte seed 0" not in names  # the cpu curve: sst2 and cola only
  gpu = [name for name, _, _ in study.plan(study.BUDGETS["gpu"], paths, {"distill", "finetune"})]
  assert gpu.index("finetune mlm squad2 seed 0") < gpu.index("finetune minilm-v1 sst2 seed 1")
  (tmp_path / "pretrain" / "minilm-v1" / "hf").mkdir(parents=True)
  (tmp_path / "pretrain" / "minilm-v1" / "hf" / "config.json").write_text("{}")
  done = {name for name, is_done, _ in study.plan(budget, paths, {"distill", "finetune"}) if is_done()}
  assert done == {"pretrain minilm-v1"}


def _write_runs(root, label, seed, scores):
  """Fine-tuning summaries as `finetune.run_seeds` writes them, one per task."""
  for task, score in zip(study_report.TASK_ORDER, scores):
    path = root / label / task / f"seed-{seed}" / "summary.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({
        "task": task, "metric": "accuracy", "model": "m", "layers": 3, "hidden": 384,
        "params": 1e7, "seeds": [seed], "scores": [score], "wall_time_s": [60.0],
        "data": {"max_seq_len": 64, "train_examples": 100, "eval_examples": 50},
        "config": {"epochs": 2, "batch_size": 32, "learning_rate": 1e-4}}))


def test_table_merges_seeds_and_averages_four_tasks(tmp_path):
  for seed, scores in ((0, (0.8, 0.6, 0.2, 0.5)), (1, (0.9, 0.5, 0.3, 0.6))):
    _write_runs(tmp_path, "minilm-v1", seed, scores)
  rows = study_report._rows(tmp_path)
  sst2 = next(r for r in rows if r["task"] == "sst2")
  assert sst2["seeds"] == [0, 1] and sst2["mean"] == pytest.approx(85.0)
  assert sst2["std"] == pytest.approx(np.std([80, 90], ddof=1))
  text = study_report.table(rows, ["minilm-v1", "random-L3"], {"minilm-v1": {"steps": 0}}, 1000)
  assert "| minilm-v1 | — | 85.0 ± 7.1 (2) |" in text
  assert f"| {np.mean([85, 55, 25, 55]):.1f} |" in text   # the four tasks' average
  assert "| random-L3 | none (baseline) | — |" in text


def test_targets_are_computed_from_the_averages(tmp_path):
  """Each student's average minus random init's (>= +5 to pass) and minus MLM's (> 0)."""
  for label, scores in (("random-L3", (0.70, 0.50, 0.00, 0.50)),   # average 42.5
                        ("truncated-L3", (0.80, 0.56, 0.10, 0.50)),  # 49.0
                        ("mlm", (0.74, 0.54, 0.00, 0.50)),          # 44.5
                        ("minilm-v1", (0.80, 0.58, 0.06, 0.50)),    # 48.5: +6.0 over random
                        ("minilm-v2", (0.72, 0.54, 0.00, 0.50))):   # 44.0: +1.5, -0.5 vs mlm
    _write_runs(tmp_path, label, 0, scores)
  text = study_report.targets(study_report._rows(tmp_path), layers=3)
  assert "| minilm-v1 | +6.0 met | +4.0 met | -0.5 |" in text
  assert "| minilm-v2 | +1.5 **not met** | -0.5 **not met** | -5.0 |" in text
  assert "squad2 0.0 (50.0 to 50.0)" in text and "sst2 10.0 (70.0 to 80.0)" in text
  _write_runs(tmp_path / "partial", "minilm-v1", 0, (0.8, 0.58, 0.06, 0.50))
  partial = study_report.targets(study_report._rows(tmp_path / "partial"), layers=3)
  assert "| minilm-v1 | — | — | — |" in partial   # nothing claimed before the baselines exist


def test_attention_maps_read_the_packaged_teacher_by_name():
  """The report's attention plot gets the study's teacher as its packaged name."""
  probs, tokens = study_report._attention(study.TEACHER, study_report.SENTENCE)
  assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]" and probs.shape == (12, len(tokens), len(tokens))
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=0, atol=1e-5)  # softmax rows


def test_layer_init_target_takes_every_seed_and_the_seeds_spread(tmp_path):
  """minilm-v2-layers246 against the undistilled layers and the truncated teacher: the
  difference of the four-task averages must exceed the sum of both seed std's."""
  for seed in range(3):
    for label, base in (("minilm-v2-layers246", 0.60), ("teacher-layers-246", 0.50), ("truncated-L3", 0.59)):
      _write_runs(tmp_path, label, seed, [base + 0.01 * (1 + (label != "truncated-L3")) * seed] * 4)
  text = study_report.layer_init_targets(study_report._rows(tmp_path), 3, (0, 1, 2))
  assert "| teacher-layers-246 | +10.0 | 4.0 | met |" in text        # means 62 vs 52, std 2 + 2
  assert "| truncated-L3 | +2.0 | 3.0 | **not met** |" in text       # 62 vs 60, std 2 + 1
  assert "| truncated-L3 | — |" in study_report.layer_init_targets(study_report._rows(tmp_path), 3, (0, 1, 2, 3))


def test_the_undistilled_layer_init_arm_is_the_teacher_cut_to_its_layers(teacher, tmp_path):
  study.export_layer_init(study.Paths.make(tmp_path, tmp_path / "record", None))
  config, params = convert.load_hf(tmp_path / "models" / study_report.LAYER_INIT_ARMS[0])
  got, want = params.to_pure_dict(), teacher[1].to_pure_dict()
  assert config.num_layers == 3 and set(got) == set(want)
  for i, layer in enumerate((1, 3, 5)):  # 1-based 2, 4, 6
    jax.tree.map(np.testing.assert_array_equal, got["layers"][i], want["layers"][layer])
  jax.tree.map(np.testing.assert_array_equal, got["embeddings"], want["embeddings"])


def test_the_layer_init_part_plans_and_reports_its_arms_alone(tmp_path):
  budget = study.BUDGETS["cpu"]
  paths = study.Paths.make(tmp_path / "runs", tmp_path / "record", None)
  names = [name for name, _, _ in study.plan(budget, paths, {"distill", "finetune"}, "layer-init")]
  # the distilled arm's every seed while its pre-trained model is in the run folder, then seed by
  # seed the two others
  assert names[0] == "pretrain minilm-v2-layers246" and names[13] == "export teacher-layers-246"
  assert {n.rsplit(" ", 3)[0] for n in names[1:13]} == {"finetune minilm-v2-layers246"}
  assert [n.rsplit(" ", 3)[0] for n in names[14:22:4]] == ["finetune teacher-layers-246", "finetune truncated-L3"]
  assert {n.rsplit(" ", 1)[1] for n in names[14:22]} == {"0"} and len(names) == 2 + 3 * 3 * 4
  for seed in range(3):
    for label, base in (("minilm-v2-layers246", 0.60), ("teacher-layers-246", 0.50), ("truncated-L3", 0.59)):
      _write_runs(paths.record / "finetune", label, seed, [base + 0.01 * seed] * 4)
  study_report.write_layer_init("cpu", budget, paths, tmp_path / "results", study)
  text = (tmp_path / "results" / "study-cpu-layer-init.md").read_text()
  assert "| teacher-layers-246 | none (baseline) | 51.0 ± 1.0 (3) |" in text
  assert "| teacher-layers-246 | +10.0 | 2.0 | met |" in text and "minilm-v2-layers246: not started" in text


def test_a_study_goes_on_from_its_record_in_a_new_checkout(tmp_path):
  """Finished runs' results are recorded (never replaced); a new run folder skips the recorded
  fine-tuning runs, and the pre-training and export that only they read."""
  budget = study.BUDGETS["cpu"]
  paths = study.Paths.make(tmp_path / "runs", tmp_path / "record", None)
  _write_runs(paths.out / "finetune", "truncated-L3", 0, [0.5] * 4)
  for method, lines in (("minilm-v2-layers246", ["a"]), ("mlm", ["b"])):
    (paths.out / "pretrain" / method).mkdir(parents=True)
    (paths.out / "pretrain" / method / "metrics.jsonl").write_text(json.dumps({"step": 10, "m": lines}))
  (paths.out / "pretrain" / "minilm-v2-layers246" / "hf").mkdir()
  (paths.out / "pretrain" / "minilm-v2-layers246" / "hf" / "config.json").write_text("{}")  # mlm: unfinished
  (paths.record / "finetune" / "truncated-L3" / "rte" / "seed-0").mkdir(parents=True)
  (paths.record / "finetune" / "truncated-L3" / "rte" / "seed-0" / "summary.json").write_text("recorded")
  study.record(paths)
  got = {str(p.relative_to(paths.record)) for p in paths.record.rglob("*") if p.is_file()}
  assert got == {f"finetune/truncated-L3/{t}/seed-0/summary.json" for t in study.TASKS} | {
      "pretrain/minilm-v2-layers246/metrics.jsonl"}
  assert (paths.record / "finetune" / "truncated-L3" / "rte" / "seed-0" / "summary.json").read_text() == "recorded"

  fresh = study.Paths.make(tmp_path / "new-checkout", paths.record, None)
  for seed in range(3):
    _write_runs(fresh.record / "finetune", "minilm-v2-layers246", seed, [0.6] * 4)
  done = [name for name, is_done, _ in study.plan(budget, fresh, {"distill", "finetune"}, "layer-init") if is_done()]
  assert done == ["pretrain minilm-v2-layers246"] + [
      f"finetune minilm-v2-layers246 {t} seed {s}" for s in range(3) for t in study.TASKS] + [
      f"finetune truncated-L3 {t} seed 0" for t in study.TASKS]
  only = study.plan(budget, fresh, {"distill"}, "layer-init")
  assert [(name, is_done()) for name, is_done, _ in only] == [("pretrain minilm-v2-layers246", False)]


def test_the_loss_plot_has_a_masked_lm_panel_only_beside_an_mlm_run(tmp_path):
  """The layer-init part's plot is its distillation curves alone, not beside an empty MLM panel."""
  import matplotlib.image
  budget = study.BUDGETS["cpu"]
  paths = study.Paths.make(tmp_path / "runs", tmp_path / "record", None)
  records = [{"step": s, "loss/total": 1.0 / s, **({"eval/total": 0.9 / s} if s % 20 == 0 else {}),
              "tokens_per_sec": 1000.0} for s in range(10, 101, 10)]
  widths = []
  for method in ("minilm-v2-layers246", "mlm"):
    (paths.record / "pretrain" / method).mkdir(parents=True)
    (paths.record / "pretrain" / method / "metrics.jsonl").write_text("\n".join(map(json.dumps, records)))
    assert study_report._loss_plot(study, budget, paths, [], None, tmp_path / f"{method}.png")
    widths.append(matplotlib.image.imread(tmp_path / f"{method}.png").shape[1])
  assert widths[0] < 0.6 * widths[1]  # one panel, then two
