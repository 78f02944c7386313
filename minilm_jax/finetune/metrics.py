"""The official GLUE and SQuAD 2.0 metrics, written out in numpy and Python.

GLUE scores tasks with accuracy, binary F1 (MRPC, QQP; class 1 is positive), the Matthews
correlation coefficient (CoLA) and Pearson / Spearman correlation (STS-B). These are the
textbook formulas that scikit-learn and scipy implement (tests compare them at 1e-12); they
live here so that scoring needs neither library and so that degenerate inputs (a model
that predicts one class, a constant regressor) give 0 instead of NaN and a warning.

`task_metrics` returns every metric a task reports plus `score`, the single number of the
MiniLM papers' tables: accuracy for MNLI-m, QNLI, QQP, RTE, SST-2 and MRPC, MCC for CoLA,
and for STS-B the mean of Pearson and Spearman as the GLUE leaderboard averages them.

`squad_metrics` is SQuAD 2.0's official evaluate-v2.0.py (exact match and token F1 over
normalised answers, HasAns / NoAns splits, the best no-answer threshold), ported line
for line with its function names, so the numbers are the script's.
"""

import collections
import re
import string

import numpy as np


def _as_1d(name: str, x) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim != 1:
    raise ValueError(f"{name} must be 1-D (one value per example), got shape {x.shape}")
  return x


def _check_pair(predictions, labels) -> tuple[np.ndarray, np.ndarray]:
  p, y = _as_1d("predictions", predictions), _as_1d("labels", labels)
  if p.shape != y.shape:
    raise ValueError(f"predictions {p.shape} and labels {y.shape} must have one entry per "
                     "example each")
  if p.size == 0:
    raise ValueError("metrics of an empty dev set are undefined: pass at least one example")
  return p, y


def accuracy(predictions, labels) -> float:
  """Fraction of examples whose predicted class equals the label."""
  p, y = _check_pair(predictions, labels)
  return float(np.mean(p == y))


def binary_f1(predictions, labels) -> float:
  """F1 of the positive class 1: 2TP / (2TP + FP + FN); 0 when there is no positive at all.

  This is `sklearn.metrics.f1_score(labels, predictions)` with its default zero_division
  (0 when neither labels nor predictions contain a positive).
  """
  p, y = _check_pair(predictions, labels)
  p, y = p == 1, y == 1
  tp = np.sum(p & y)
  fp_fn = np.sum(p != y)
  denominator = 2 * tp + fp_fn
  return float(2 * tp / denominator) if denominator else 0.0


def matthews_corrcoef(predictions, labels) -> float:
  """Matthews correlation from the confusion matrix C (multi-class form, Gorodkin 2004).

  MCC = (c·s − Σ_k p_k t_k) / sqrt((s² − Σ p_k²)(s² − Σ t_k²)) with c the correct count,
  s the total, t_k / p_k the true / predicted counts of class k; for two classes it is
  (TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)). A zero denominator (one
  constant side) gives 0, as scikit-learn does, so a model that always predicts one
  class scores 0 on CoLA.
  """
  p, y = _check_pair(predictions, labels)
  classes, codes = np.unique(np.concatenate([y, p]), return_inverse=True)
  y_codes, p_codes = codes[: y.size], codes[y.size:]
  t_k = np.bincount(y_codes, minlength=classes.size).astype(np.float64)
  p_k = np.bincount(p_codes, minlength=classes.size).astype(np.float64)
  c, s = float(np.sum(y_codes == p_codes)), float(y.size)
  cov_ytyp = c * s - p_k @ t_k
  cov_ypyp = s * s - p_k @ p_k
  cov_ytyt = s * s - t_k @ t_k
  if cov_ypyp * cov_ytyt == 0:
    return 0.0
  return float(cov_ytyp / np.sqrt(cov_ytyt * cov_ypyp))


def pearson(predictions, labels) -> float:
  """Pearson correlation Σ(x−x̄)(y−ȳ) / (‖x−x̄‖‖y−ȳ‖); 0 if either side is constant."""
  x, y = _check_pair(predictions, labels)
  x = x.astype(np.float64) - np.mean(x, dtype=np.float64)
  y = y.astype(np.float64) - np.mean(y, dtype=np.float64)
  # Normalise first, as scipy does, so the products cannot overflow or underflow.
  x_norm, y_norm = np.linalg.norm(x), np.linalg.norm(y)
  if x_norm == 0 or y_norm == 0:
    return 0.0
  r = float(np.dot(x / x_norm, y / y_norm))
  return max(-1.0, min(1.0, r))


def rankdata(x) -> np.ndarray:
  """1-based ranks with ties given their average rank (scipy.stats.rankdata 'average')."""
  x = _as_1d("x", x)
  order = np.argsort(x, kind="stable")
  sorted_x = x[order]
  starts_group = np.r_[True, sorted_x[1:] != sorted_x[:-1]]
  group = np.cumsum(starts_group) - 1
  starts = np.flatnonzero(starts_group)
  counts = np.diff(np.r_[starts, x.size])
  average = starts + (counts + 1) / 2.0  # mean of the 1-based ranks start+1 .. start+count
  ranks = np.empty(x.size, dtype=np.float64)
  ranks[order] = average[group]
  return ranks


def spearman(predictions, labels) -> float:
  """Spearman rank correlation: Pearson correlation of the average ranks."""
  x, y = _check_pair(predictions, labels)
  return pearson(rankdata(x), rankdata(y))


def task_metrics(metric: str, predictions, labels) -> dict[str, float]:
  """All metrics of one GLUE metric family, plus `score`, the number the papers report.

  Args:
    metric: "accuracy", "accuracy_f1" (MRPC, QQP), "matthews" (CoLA) or
      "pearson_spearman" (STS-B).
    predictions: predicted class ids, or real-valued scores for STS-B.
    labels: gold class ids or scores, same length.
  """
  if metric == "accuracy":
    acc = accuracy(predictions, labels)
    return {"accuracy": acc, "score": acc}
  if metric == "accuracy_f1":
    acc, f1 = accuracy(predictions, labels), binary_f1(predictions, labels)
    return {"accuracy": acc, "f1": f1, "accuracy_f1_mean": (acc + f1) / 2, "score": acc}
  if metric == "matthews":
    mcc = matthews_corrcoef(predictions, labels)
    return {"matthews_corrcoef": mcc, "accuracy": accuracy(predictions, labels), "score": mcc}
  if metric == "pearson_spearman":
    r, rho = pearson(predictions, labels), spearman(predictions, labels)
    return {"pearson": r, "spearman": rho, "score": (r + rho) / 2}
  raise ValueError(f"unknown metric {metric!r}: use one of accuracy, accuracy_f1, matthews, "
                   "pearson_spearman")


# ---- SQuAD 2.0: the official evaluate-v2.0.py, same logic, same numbers. ----

_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
  """Lower text and remove punctuation, articles and extra whitespace."""
  s = s.lower()
  s = "".join(ch for ch in s if ch not in _PUNCTUATION)
  s = re.sub(re.compile(r"\b(a|an|the)\b", re.UNICODE), " ", s)
  return " ".join(s.split())


def get_tokens(s: str) -> list[str]:
  return normalize_answer(s).split() if s else []


def compute_exact(a_gold: str, a_pred: str) -> int:
  return int(normalize_answer(a_gold) == normalize_answer(a_pred))


def compute_f1(a_gold: str, a_pred: str) -> float:
  gold_toks, pred_toks = get_tokens(a_gold), get_tokens(a_pred)
  if not gold_toks or not pred_toks:  # a no-answer side: 1 if both are no-answer, else 0
    return float(gold_toks == pred_toks)
  num_same = sum((collections.Counter(gold_toks) & collections.Counter(pred_toks)).values())
  if num_same == 0:
    return 0.0
  precision, recall = num_same / len(pred_toks), num_same / len(gold_toks)
  return 2 * precision * recall / (precision + recall)


def _qas(articles):
  return [qa for article in articles for p in article["paragraphs"] for qa in p["qas"]]


def get_raw_scores(articles, preds) -> tuple[dict[str, int], dict[str, float]]:
  """Best exact / F1 over the gold answers; an unanswerable question's only gold is ""."""
  exact_scores, f1_scores = {}, {}
  for qa in _qas(articles):
    gold = [a["text"] for a in qa["answers"] if normalize_answer(a["text"])] or [""]
    pred = preds[qa["id"]]
    exact_scores[qa["id"]] = max(compute_exact(a, pred) for a in gold)
    f1_scores[qa["id"]] = max(compute_f1(a, pred) for a in gold)
  return exact_scores, f1_scores


def apply_no_ans_threshold(scores, na_probs, qid_to_has_ans, na_prob_thresh):
  return {qid: float(not qid_to_has_ans[qid]) if na_probs[qid] > na_prob_thresh else s
          for qid, s in scores.items()}


def make_eval_dict(exact_scores, f1_scores, qid_list=None) -> dict[str, float]:
  qid_list = list(exact_scores) if not qid_list else qid_list
  total = len(qid_list)
  return {"exact": 100.0 * sum(exact_scores[k] for k in qid_list) / total,
          "f1": 100.0 * sum(f1_scores[k] for k in qid_list) / total, "total": total}


def find_best_thresh(preds, scores, na_probs, qid_to_has_ans) -> tuple[float, float]:
  """Best score (%) over no-answer thresholds, and that threshold on `na_probs`.

  Starts from answering nothing (every no-answer question right), then switches questions
  to "answered" in increasing na_prob order and keeps the best running total.
  """
  cur_score = best_score = sum(1 for k in qid_to_has_ans if not qid_to_has_ans[k])
  best_thresh = 0.0
  for qid in sorted(na_probs, key=lambda k: na_probs[k]):
    if qid not in scores:
      continue
    if qid_to_has_ans[qid]:
      diff = scores[qid]
    else:
      diff = -1 if preds[qid] else 0
    cur_score += diff
    if cur_score > best_score:
      best_score, best_thresh = cur_score, na_probs[qid]
  return 100.0 * best_score / len(scores), best_thresh


def squad_metrics(articles: list[dict], preds: dict[str, str],
                  na_probs: dict[str, float] | None = None,
                  na_prob_thresh: float = 1.0) -> dict[str, float]:
  """The official SQuAD 2.0 metrics of `preds` (question id -> answer text, "" = none).

  Returns exact, f1, total, HasAns_*/NoAns_* and, when `na_probs` is given, best_exact,
  best_exact_thresh, best_f1, best_f1_thresh, all as evaluate-v2.0.py prints them.
  """
  qid_to_has_ans = {qa["id"]: bool(qa["answers"]) for qa in _qas(articles)}
  missing = [qid for qid in qid_to_has_ans if qid not in preds]
  if missing:
    raise KeyError(f"{len(missing)} question(s) have no prediction (first: {missing[0]}): "
                   "predict every question of the scored articles ('' for no answer)")
  sweep_thresholds = na_probs is not None  # the official script: only with --na-prob-file
  if na_probs is None:
    na_probs = {k: 0.0 for k in preds}
  exact_raw, f1_raw = get_raw_scores(articles, preds)
  exact = apply_no_ans_threshold(exact_raw, na_probs, qid_to_has_ans, na_prob_thresh)
  f1 = apply_no_ans_threshold(f1_raw, na_probs, qid_to_has_ans, na_prob_thresh)
  out = make_eval_dict(exact, f1)
  for prefix, has_ans in (("HasAns", True), ("NoAns", False)):
    qids = [k for k, v in qid_to_has_ans.items() if v == has_ans]
    if qids:
      out.update({f"{prefix}_{k}": v for k, v in make_eval_dict(exact, f1, qids).items()})
  if sweep_thresholds:
    out["best_exact"], out["best_exact_thresh"] = find_best_thresh(
        preds, exact_raw, na_probs, qid_to_has_ans)
    out["best_f1"], out["best_f1_thresh"] = find_best_thresh(
        preds, f1_raw, na_probs, qid_to_has_ans)
  return out
