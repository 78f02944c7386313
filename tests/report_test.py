"""experiments/scripts/report.py on fake summaries: the table's means, stds and teacher shares."""

import json

import numpy as np

from experiments.scripts import report


def _summary(root, label, task, scores, layers, params, metric="accuracy"):
  path = root / label / task / "summary.json"
  path.parent.mkdir(parents=True)
  path.write_text(json.dumps({
      "task": task, "metric": metric, "model": label, "layers": layers, "hidden": 384,
      "params": params, "seeds": list(range(len(scores))), "scores": scores,
      "wall_time_s": [60.0 * (i + 1) for i in range(len(scores))],
      "data": {"max_seq_len": 64, "train_examples": 100, "eval_examples": 50,
               "train_truncated": 1, "eval_truncated": 0},
      "config": {"epochs": 2, "batch_size": 32, "learning_rate": 5e-5}}))


def test_table_math_and_files(tmp_path):
  runs = tmp_path / "runs"
  _summary(runs, "teacher-L6", "sst2", [0.88, 0.92], 6, 22_700_000)
  _summary(runs, "student-L3", "sst2", [0.81], 3, 17_400_000)
  _summary(runs, "teacher-L6", "cola", [0.0], 6, 22_700_000, metric="matthews_corrcoef")
  _summary(runs, "student-L3", "cola", [0.1], 3, 17_400_000, metric="matthews_corrcoef")
  text = report.main([f"--runs={runs}", "--out", str(tmp_path / "results")])
  cells = [line.split("|") for line in text.splitlines() if " x 384 " in line]
  rows = {(r[2].strip(), r[1].split()[0]): r for r in cells}
  teacher, student = rows[("teacher-L6", "SST-2")], rows[("student-L3", "SST-2")]
  std = np.std([88.0, 92.0], ddof=1)
  assert teacher[8].strip() == f"90.0 ± {std:.1f}" and teacher[6].strip() == "100.0"
  assert teacher[5].strip() == "88.0, 92.0" and teacher[9].strip() == "1.5 min"
  assert student[6].strip() == "90.0" and student[8].strip() == "81.0"  # 81 / 90
  assert student[3].strip() == "3 x 384" and student[4].strip() == "17.4M"
  # A teacher score of 0 (CoLA's Matthews correlation) gives no ratio.
  assert rows[("student-L3", "CoLA")][6].strip() == "—"
  assert (tmp_path / "results" / "finetune.md").read_text() == text
  assert (tmp_path / "results" / "finetune.png").stat().st_size > 0
