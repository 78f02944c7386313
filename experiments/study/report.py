"""The study's table and plots, from its runs' files only (`study.py` calls `write`).

Writes `experiments/results/study-<budget>.md` (models x tasks, means over seeds, the
average of the four dev scores, pre-training tokens and times), `study-<budget>-runs.md`
(every fine-tuning run, through `experiments/scripts/report.py`), and three plots:
pre-training loss curves, dev score against pre-training tokens, and teacher vs student
attention on one sentence.
"""

import json
import pathlib
import platform

import numpy as np

from experiments.scripts import report as finetune_report

TASK_ORDER = ("sst2", "rte", "cola", "squad2")
STUDENTS = ("minilm-v1", "minilm-v2")  # the distilled students, as `study.METHODS` names them
# The teacher's layers 2, 4, 6 as they are, and that student distilled (MiniLMv2), `study.LAYER_INIT`.
LAYER_INIT_ARMS = ("teacher-layers-246", "minilm-v2-layers246")


def student_shaped(layers: int) -> list[str]:
  """The labels of the models of the students' shape, in the table's order: the two
  baselines without pre-training, MLM from scratch, the students."""
  return [f"truncated-L{layers}", f"random-L{layers}", "mlm", *STUDENTS]
SENTENCE = "it 's a charming and often affecting journey ."  # SST-2 dev, first row


def _rows(root: pathlib.Path) -> list[dict]:
  """finetune_report.collect's rows with the seeds of one (label, task) merged into one row."""
  merged = {}
  for r in finetune_report.collect(root) if root.is_dir() else []:
    key = (r["label"], r["task"])
    if key in merged:
      m = merged[key]
      m["seeds"] += r["seeds"]
      m["scores"] += r["scores"]
      m["wall"] += [r["wall_time_s"]]
    else:
      merged[key] = r | {"wall": [r["wall_time_s"]]}
  for r in merged.values():
    r["mean"] = float(np.mean(r["scores"]))
    r["std"] = float(np.std(r["scores"], ddof=1)) if len(r["scores"]) > 1 else None
    r["wall_time_s"] = float(np.mean(r["wall"]))
  return list(merged.values())


def _pretrain_records(paths, method: str) -> list[dict]:
  """A pre-training's metrics: the run folder's while it has them (a run in progress), else the
  record's (a finished run)."""
  name = pathlib.PurePath("pretrain", method, "metrics.jsonl")
  path = next((p for p in (paths.out / name, paths.record / name) if p.is_file()), None)
  return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path else []


def pretrain_summary(budget, paths, method: str) -> dict:
  """Steps done, tokens, median tokens/s and step time (compilation excluded) of a run."""
  records = _pretrain_records(paths, method)
  if not records:
    return {"steps": 0}
  steps = [r["step"] for r in records]
  gaps = np.diff([0] + steps)
  tok_s = np.array([r["tokens_per_sec"] for r in records])
  seconds = float(np.sum(gaps * budget.batch * budget.seq_len / tok_s))
  evals = [r["eval/total"] for r in records if "eval/total" in r]  # the held-out loss, if evaluated
  return {"steps": steps[-1], "tokens": steps[-1] * budget.batch * budget.seq_len,
          "tokens_per_sec": float(np.median(tok_s)), "minutes": seconds / 60,
          "first_loss": records[0]["loss/total"], "last_loss": records[-1]["loss/total"],
          **({"first_eval": evals[0], "last_eval": evals[-1]} if evals else {})}


def _cell(rows, label, task):
  r = next((r for r in rows if r["label"] == label and r["task"] == task), None)
  if r is None:
    return "—", None
  std = f" ± {r['std']:.1f}" if r["std"] is not None else ""
  return f"{r['mean']:.1f}{std} ({len(r['scores'])})", r["mean"]


def average(rows: list[dict], label: str) -> float | None:
  """The average over the four tasks of a model's per-task means (over seeds); None until
  every task has a run."""
  means = [_cell(rows, label, t)[1] for t in TASK_ORDER]
  return float(np.mean(means)) if all(m is not None for m in means) else None


def table(rows: list[dict], labels: list[str], pre: dict, steps: int) -> str:
  lines = ["| model | pre-training tokens | SST-2 acc | RTE acc | CoLA mcc | SQuAD 2.0 split F1 | average |",
           "|---|---|---|---|---|---|---|"]
  for label in labels:
    cells = [_cell(rows, label, t)[0] for t in TASK_ORDER]
    avg = average(rows, label)
    avg = f"{avg:.1f}" if avg is not None else "—"
    info = pre.get(label)
    tokens = f"{info['tokens'] / 1e6:.2f} M" if info and info.get("steps") else (
        "—" if label in pre else "teacher" if label == "teacher-L6" else "none (baseline)")
    if info and 0 < info.get("steps", 0) < steps:
      tokens += f" (running, step {info['steps']} of {steps})"
    lines.append(f"| {label} | {tokens} | " + " | ".join(cells) + f" | {avg} |")
  return "\n".join(lines)


TARGET_OVER_RANDOM = 5.0  # the target: students >= 5 points above random init on the average


def targets(rows: list[dict], layers: int) -> str:
  """The issue's targets, computed from the table: each student's average minus random
  init's (target >= +5) and minus the MLM baseline's (target > 0), with the truncated
  teacher beside them; then the spread of the L`layers` models on each task, which shows
  the tasks whose read-out cannot separate them (every model at the same floor)."""
  random, truncated = f"random-L{layers}", f"truncated-L{layers}"
  lines = [f"| student | minus {random} (target >= +{TARGET_OVER_RANDOM:.0f}) | minus mlm (target > 0) "
           f"| minus {truncated} |", "|---|---|---|---|"]
  for student in STUDENTS:
    mine = average(rows, student)
    cells = []
    for other, passes in ((random, lambda d: d >= TARGET_OVER_RANDOM), ("mlm", lambda d: d > 0),
                          (truncated, None)):
      theirs = average(rows, other)
      if mine is None or theirs is None:
        cells.append("—")
        continue
      d = mine - theirs
      cells.append(f"{d:+.1f}" + ("" if passes is None else " met" if passes(d) else " **not met**"))
    lines.append(f"| {student} | " + " | ".join(cells) + " |")
  spread = []
  for t in TASK_ORDER:
    means = [m for m in (_cell(rows, label, t)[1] for label in student_shaped(layers)) if m is not None]
    if means:
      spread.append(f"{t} {max(means) - min(means):.1f} ({min(means):.1f} to {max(means):.1f})")
  if spread:
    lines += ["", f"Spread of the L{layers} models' dev scores per task (max - min, points): "
              + "; ".join(spread) + "."]
  return "\n".join(lines)


def layer_init_targets(rows: list[dict], layers: int, seeds: tuple[int, ...]) -> str:
  """The issue's target for the layer-initialised student: its four-task average above the
  same layers not distilled and above the truncated teacher, by more than the seeds' spread
  (the sum of the two models' standard deviations over seeds of the four-task average)."""
  untrained, distilled = LAYER_INIT_ARMS
  per_seed = lambda label: [a for a in (_average(rows, label, seed) for seed in seeds) if a is not None]
  std = lambda xs: float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0
  mine = per_seed(distilled)
  lines = [f"| {distilled} minus | difference of the averages | seeds' spread | target (difference > spread) |",
           "|---|---|---|---|"]
  for other in (untrained, f"truncated-L{layers}"):
    theirs = per_seed(other)
    if len(mine) < len(seeds) or len(theirs) < len(seeds):
      lines.append(f"| {other} | — | — | — |")
      continue
    d, spread = float(np.mean(mine) - np.mean(theirs)), std(mine) + std(theirs)
    lines.append(f"| {other} | {d:+.1f} | {spread:.1f} | {'met' if d > spread else '**not met**'} |")
  return "\n".join(lines)


def write(name: str, budget, paths, results: pathlib.Path, study, note: str = "") -> None:
  """`study` is the study module (its METHODS, FINETUNE and curve_steps); `note` goes
  under the table (what the files cannot tell: other load on the machine, say)."""
  results.mkdir(parents=True, exist_ok=True)
  rows = _rows(paths.record / "finetune")
  curve = _rows(paths.record / "curve")
  layers = budget.student[0]
  pre = {m: pretrain_summary(budget, paths, m) for m in study.METHODS}
  labels = (["teacher-L6"] if budget.teacher_reference else []) + student_shaped(layers) + list(LAYER_INIT_ARMS)
  lines = [f"# MiniLM study, `{name}` budget", "",
           f"Students L{layers}-H{budget.student[1]} ({budget.student[2]} heads) pre-trained for "
           f"{budget.steps} steps x {budget.batch} x {budget.seq_len} = {budget.tokens / 1e6:.2f} M token "
           "positions each (the same batches for every method), then fine-tuned. Cells: mean ± std "
           "over seeds (the seed count in brackets), best dev epoch, in percent; — = not run yet.",
           "", table(rows, labels, pre, budget.steps), "",
           "Targets (the issue's; computed from the table above, averages of the four tasks):", "",
           targets(rows, layers), "",
           f"The layer-initialised student (teacher layers {study.LAYER_INIT}, then MiniLMv2; seeds "
           f"{list(budget.layer_init_seeds)}):", "", layer_init_targets(rows, layers, budget.layer_init_seeds),
           "", "Pre-training runs:", ""]
  lines += [_pretrain_line(method, info, budget) for method, info in pre.items()]
  lines += ["", f"Hardware: {platform.machine()} CPU ({_cpus()} cores visible), float32; runs "
            "written by `python -m experiments.study.study --budget " + name + "`. Fine-tuning recipe (every "
            f"model and task): {study.FINETUNE}; per task: {budget.tasks}. SQuAD 2.0 trains on the "
            "first 25 dev articles and scores the other 10 (no train file here). Seeds: "
            f"{list(budget.seeds)} for the final models, 0 for the curve and the teacher."
            + (f" {note}" if note else ""), ""]
  for plot, caption in ((_loss_plot, "pre-training loss"), (_curve_plot, "dev score vs tokens"),
                        (_attention_plot, "attention maps")):
    path = results / f"study-{name}-{plot.__name__.strip('_').removesuffix('_plot')}.png"
    if plot(study, budget, paths, rows, curve, path):
      lines.append(f"![{caption}]({path.name})")
  if rows:
    (results / f"study-{name}-runs.md").write_text(finetune_report.markdown(
        finetune_report.ordered(finetune_report.add_teacher_share(rows, "teacher-L6"), "teacher-L6"),
        title=f"Study `{name}`: every fine-tuning run"))
    lines.append(f"\nEvery run: [study-{name}-runs.md](study-{name}-runs.md).")
  text = "\n".join(lines) + "\n"
  (results / f"study-{name}.md").write_text(text)
  print(text)


def write_layer_init(name: str, budget, paths, results: pathlib.Path, study, note: str = "") -> None:
  """`study-<budget>-layer-init.md` and its loss plot (`study.py --part layer-init`): the
  layer-initialised arms and the truncated teacher alone, their target, and the distilled
  arm's pre-training with its held-out curve."""
  results.mkdir(parents=True, exist_ok=True)
  rows = _rows(paths.record / "finetune")
  layers = budget.student[0]
  untrained, distilled = LAYER_INIT_ARMS
  pre = {distilled: pretrain_summary(budget, paths, distilled)}
  lines = [f"# MiniLM study, `{name}` budget: students from the teacher's layers {study.LAYER_INIT}", "",
           "Cells: mean ± std over seeds (the seed count in brackets), best dev epoch, in percent.", "",
           table(rows, [f"truncated-L{layers}", untrained, distilled], pre, budget.steps), "",
           layer_init_targets(rows, layers, budget.layer_init_seeds), "",
           _pretrain_line(distilled, pre[distilled], budget), "",
           f"Fine-tuning recipe: {study.FINETUNE}; per task: {budget.tasks}." + (f" {note}" if note else ""), ""]
  path = results / f"study-{name}-layer-init-loss.png"
  if _loss_plot(study, budget, paths, rows, None, path):
    lines.append(f"![pre-training loss, training and held out]({path.name})")
  text = "\n".join(lines) + "\n"
  (results / f"study-{name}-layer-init.md").write_text(text)
  print(text)


def _pretrain_line(method: str, info: dict, budget) -> str:
  if not info.get("steps"):
    return f"- {method}: not started"
  return (f"- {method}: {info['steps']} of {budget.steps} steps, loss {info['first_loss']:.3f} -> "
          f"{info['last_loss']:.3f}, median {info['tokens_per_sec']:,.0f} tokens/s, "
          f"{info['minutes']:.1f} min of steps (compilation excluded; "
          f"{info['tokens'] / info['tokens_per_sec'] / 60:.1f} min at the median rate)"
          + (f"; held-out loss {info['first_eval']:.3f} -> {info['last_eval']:.3f}" if "last_eval" in info else ""))


def _cpus() -> int:
  import os
  return len(os.sched_getaffinity(0))


def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _loss_plot(study, budget, paths, rows, curve, path) -> bool:
  runs = {m: _pretrain_records(paths, m) for m in study.METHODS}
  if not any(runs.values()):
    return False
  plt = _plt()
  panels = 2 if runs["mlm"] else 1  # the masked-LM panel only beside an MLM run (not the layer-init part's)
  fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.8), squeeze=False)
  axes = axes[0]
  tokens = lambda recs: [r["step"] * budget.batch * budget.seq_len / 1e6 for r in recs]
  for i, m in enumerate(STUDENTS + LAYER_INIT_ARMS[1:]):
    if runs[m]:
      axes[0].plot(tokens(runs[m]), [r["loss/total"] for r in runs[m]], color=f"C{i}", label=m)
      held = [r for r in runs[m] if "eval/total" in r]
      if held:
        axes[0].plot(tokens(held), [r["eval/total"] for r in held], "--", color=f"C{i}", label=f"{m}, held out")
  axes[0].set_title("distillation loss (KL, sum of terms)")
  if runs["mlm"]:
    axes[1].plot(tokens(runs["mlm"]), [r["loss/total"] for r in runs["mlm"]], color="C2", label="mlm")
    axes[1].set_title("masked LM loss (cross-entropy, nats)")
  for ax in axes:
    ax.set_xlabel("pre-training tokens (M)")
    ax.grid(alpha=0.3)
    if ax.lines:
      ax.legend()
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)
  return True


def _average(rows, label, seed=0, tasks=None):
  scores = []
  for t in tasks or TASK_ORDER:
    r = next((r for r in rows if r["label"] == label and r["task"] == t), None)
    if r is None or seed not in r["seeds"]:
      return None
    scores.append(r["scores"][r["seeds"].index(seed)])
  return float(np.mean(scores))


def _curve_plot(study, budget, paths, rows, curve, path) -> bool:
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6.5, 4))
  drawn = False
  for i, m in enumerate(study.CURVE_METHODS):
    points = [(s, _average(curve, f"{m}@step{s}", tasks=budget.curve_tasks))
              for s in study.curve_steps(budget)[:-1]]
    points.append((budget.steps, _average(rows, m, tasks=budget.curve_tasks)))
    points = [(s * budget.batch * budget.seq_len / 1e6, v) for s, v in points if v is not None]
    if points:
      ax.plot(*zip(*points), "o-", color=f"C{i}", label=m)
      drawn = True
  layers = budget.student[0]
  for label, style in ((f"random-L{layers}", ":"), (f"truncated-L{layers}", "--")):
    v = _average(rows, label, tasks=budget.curve_tasks)
    if v is not None:
      ax.axhline(v, color="gray", linestyle=style, label=label)
  if not drawn:
    plt.close(fig)
    return False
  ax.set_xlabel("pre-training tokens (M)")
  ax.set_ylabel(f"average dev score, {'/'.join(budget.curve_tasks)}, seed 0 (%)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)
  return True


def _attention(model, sentence):
  """Last-layer attention probabilities [N, T, T] of `sentence`, and its tokens; `model` is
  a packaged teacher name or an HF directory (resolved here, once)."""
  from minilm_jax import convert, tokenization
  from minilm_jax import attention, model as model_lib
  from minilm_jax.teachers import resolve_model_dir
  model_dir = resolve_model_dir(model)
  config, params = convert.load_hf(model_dir)
  tok, special = tokenization.for_pretraining(model_dir)
  ids = [special.cls] + tok.encode(sentence, add_special_tokens=False).ids + [special.sep]
  x = np.asarray([ids], np.int32)
  last = config.num_layers - 1
  out = model_lib.apply(config, params, x, np.ones_like(x), capture=(last,), return_logits=True)
  probs = attention.attention_probs(out.internals[last].logits, np.ones_like(x))
  return np.asarray(probs[0]), [tok.id_to_token(i) for i in ids]


def _attention_plot(study, budget, paths, rows, curve, path) -> bool:
  models = {"teacher (layer 6)": paths.teacher}
  for m in STUDENTS:
    if (paths.out / "pretrain" / m / "hf" / "config.json").is_file():
      models[f"{m} student (last layer)"] = paths.out / "pretrain" / m / "hf"
  if len(models) == 1:
    return False
  plt = _plt()
  heads = (0, 1, 2)
  fig, axes = plt.subplots(len(models), len(heads) + 1, figsize=(3 * (len(heads) + 1), 3 * len(models)))
  maps = {name: _attention(d, SENTENCE) for name, d in models.items()}
  vmax = max(float(p[list(heads)].max()) for p, _ in maps.values())  # one colour scale for all
  for row, (name, (probs, tokens)) in zip(axes, maps.items()):
    for ax, h in zip(row, heads + ("mean",)):
      ax.imshow(probs.mean(0) if h == "mean" else probs[h], cmap="viridis", vmin=0, vmax=vmax)
      ax.set_title(f"{name}\nhead {h}" if h != "mean" else f"{name}\nmean of heads", fontsize=7)
      ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=5)
      ax.set_yticks(range(len(tokens)), tokens, fontsize=5)
  fig.tight_layout()
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)
  return True
