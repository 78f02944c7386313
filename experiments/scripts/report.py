"""Collects fine-tuning runs into a markdown table and a score-vs-size plot.

    python -m experiments.scripts.report --runs runs/finetune

reads every `summary.json` that `python -m minilm_jax finetune` wrote under `--runs`,
laid out as `<runs>/<model label>/<task>/summary.json`, and writes
`experiments/results/finetune.md` and `experiments/results/finetune.png`. Scores are the
best dev epoch of each seed, in percent; "% of teacher" divides a row's mean by the
teacher row's mean on the same task (the MiniLM papers' headline), and is left empty
where the teacher's mean is not positive (a Matthews correlation near 0 has no ratio).
Nothing here is typed in by hand: every number comes from the runs' files.
"""

import json
import pathlib
import sys

import numpy as np
from absl import flags

from minilm_jax import cli_flags

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "results"
TASK_NAMES = {"sst2": "SST-2", "rte": "RTE", "cola": "CoLA", "squad2": "SQuAD 2.0 (dev split)",
              "mnli": "MNLI-m", "qnli": "QNLI", "qqp": "QQP", "mrpc": "MRPC", "stsb": "STS-B"}
METRIC_NAMES = {"accuracy": "acc", "accuracy_f1": "acc", "matthews_corrcoef": "mcc",
                "pearson_spearman": "pearson/spearman", "f1": "F1"}


def collect(root: pathlib.Path) -> list[dict]:
  """One row per summary.json: label, task, size, per-seed scores (percent), wall times."""
  rows = []
  for path in sorted(root.glob("**/summary.json")):
    s = json.loads(path.read_text())
    parts = path.relative_to(root).parts
    scores = [100 * x for x in s["scores"]]
    rows.append({
        "label": parts[0] if len(parts) > 1 else s["model"], "task": s["task"],
        "metric": s["metric"], "layers": s["layers"], "hidden": s["hidden"],
        "params": s["params"], "seeds": s["seeds"], "scores": scores,
        "mean": float(np.mean(scores)),
        "std": float(np.std(scores, ddof=1)) if len(scores) > 1 else None,
        "wall_time_s": float(np.mean(s["wall_time_s"])), "data": s["data"],
        "config": s["config"]})
  return rows


def add_teacher_share(rows: list[dict], teacher: str) -> list[dict]:
  """Sets each row's "pct_teacher": its mean as a percentage of the teacher's on its task."""
  reference = {r["task"]: r["mean"] for r in rows if r["label"] == teacher}
  for r in rows:
    ref = reference.get(r["task"])
    r["pct_teacher"] = 100 * r["mean"] / ref if ref and ref > 0 else None
  return rows


def ordered(rows: list[dict], teacher: str) -> list[dict]:
  """Tasks in the papers' order, the teacher first within each, then the others by label."""
  rank = {task: i for i, task in enumerate(TASK_NAMES)}
  return sorted(rows, key=lambda r: (rank.get(r["task"], len(rank)), r["task"],
                                     r["label"] != teacher, r["label"]))


def _task_note(rows: list[dict]) -> str:
  r, d, c = rows[0], rows[0]["data"], rows[0]["config"]
  cut = (f", {d['eval_truncated']} of {d['eval_examples']} dev and {d['train_truncated']} of "
         f"{d['train_examples']} train examples truncated" if "eval_truncated" in d else "")
  if "split" in d:  # SQuAD: questions become overlapping windows (features)
    cut = (f" ({d['train_features']} windows), {d['split']}, {d['eval_features']} windows "
           "scored")
  return (f"- {TASK_NAMES.get(r['task'], r['task'])}: {d['train_examples']} train examples, "
          f"{c['epochs']} epoch(s), batch {c['batch_size']}"
          f"{' grouped by length' if c.get('group_by_length') else ''}, "
          f"max_seq_len {d['max_seq_len']}{cut}; "
          f"dev: {d['eval_examples']} examples; lr "
          + ", ".join(sorted({f"{x['config']['learning_rate']:g} ({x['label']})" for x in rows})))


def markdown(rows: list[dict], title: str = "Fine-tuning results") -> str:
  """The results table, grouped by task in first-seen order, plus per-task data notes."""
  tasks = list(dict.fromkeys(r["task"] for r in rows))
  lines = [f"# {title}", "",
           "| task | model | layers x hidden | params | score per seed | % of teacher | seeds "
           "| mean ± std | wall time / seed |", "|---|---|---|---|---|---|---|---|---|"]
  for task in tasks:
    for r in (r for r in rows if r["task"] == task):
      std = f" ± {r['std']:.1f}" if r["std"] is not None else ""
      pct = f"{r['pct_teacher']:.1f}" if r["pct_teacher"] is not None else "—"
      lines.append(
          f"| {TASK_NAMES.get(task, task)} ({METRIC_NAMES.get(r['metric'], r['metric'])}) "
          f"| {r['label']} | {r['layers']} x {r['hidden']} | {r['params'] / 1e6:.1f}M "
          f"| {', '.join(f'{x:.1f}' for x in r['scores'])} | {pct} "
          f"| {','.join(map(str, r['seeds']))} | {r['mean']:.1f}{std} "
          f"| {r['wall_time_s'] / 60:.1f} min |")
  lines += ["", "Data per task (from the runs' summary.json):", ""]
  lines += [_task_note([r for r in rows if r["task"] == t]) for t in tasks]
  return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: pathlib.Path) -> None:
  """Dev score vs encoder parameters, one colour per task, one marker per model."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  labels = list(dict.fromkeys(r["label"] for r in rows))
  markers = dict(zip(labels, "o^sDvP*X"))
  for i, task in enumerate(dict.fromkeys(r["task"] for r in rows)):
    for r in (r for r in rows if r["task"] == task):
      ax.errorbar(r["params"] / 1e6, r["mean"], yerr=r["std"] or 0, color=f"C{i}",
                  marker=markers[r["label"]], capsize=3, linestyle="none")
    ax.plot([], [], color=f"C{i}", lw=6, label=TASK_NAMES.get(task, task))
  for label in labels:
    ax.plot([], [], "k" + markers[label], linestyle="none", label=label)
  ax.set_xlabel("encoder parameters (millions)")
  ax.set_ylabel("dev score (%)")
  ax.set_title("fine-tuned dev score vs model size")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="best")
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)


def main(argv=None) -> str:
  usage = "usage: python -m experiments.scripts.report --runs DIR [--name finetune] [--out DIR]"

  def define(fv):
    flags.DEFINE_string("runs", None, "folder holding <label>/<task>/summary.json", flag_values=fv)
    flags.DEFINE_string("teacher", "teacher-L6", "model label of the teacher rows", flag_values=fv)
    flags.DEFINE_string("out", str(RESULTS), "results folder", flag_values=fv)
    flags.DEFINE_string("name", "finetune", "results file stem", flag_values=fv)
    flags.DEFINE_string("note", "", "text under the table (hardware, budget)", flag_values=fv)

  args = cli_flags.parse("report", sys.argv[1:] if argv is None else argv, define, usage,
                         required=("runs",))
  rows = ordered(add_teacher_share(collect(pathlib.Path(args.runs)), args.teacher), args.teacher)
  if not rows:
    raise SystemExit(f"no summary.json under {args.runs}: run python -m minilm_jax finetune first")
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  text = markdown(rows) + (f"\n{args.note}\n" if args.note else "")
  text += f"\n![score vs parameters]({args.name}.png)\n"
  (out / f"{args.name}.md").write_text(text)
  plot(rows, out / f"{args.name}.png")
  print(text)
  return text


if __name__ == "__main__":
  main()
