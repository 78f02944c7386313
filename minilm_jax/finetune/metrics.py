"""The official GLUE metrics, written out in numpy.

GLUE scores tasks with accuracy, binary F1 (MRPC, QQP; class 1 is positive), the Matthews
correlation coefficient (CoLA) and Pearson / Spearman correlation (STS-B). These are the
textbook formulas that scikit-learn and scipy implement (tests compare them at 1e-12); they
live here so that evaluation needs neither library and so that degenerate inputs (a model
that predicts one class, a constant regressor) give 0 instead of NaN and a warning.

`task_metrics` returns every metric a task reports plus `score`, the single number of the
MiniLM papers' tables: accuracy for MNLI-m, QNLI, QQP, RTE, SST-2 and MRPC, MCC for CoLA,
and for STS-B the mean of Pearson and Spearman as the GLUE leaderboard averages them.
"""

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
    raise ValueError("metrics of an empty evaluation set are undefined: pass at least one example")
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
