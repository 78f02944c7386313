"""GLUE metrics against scikit-learn and scipy at 1e-12, plus degenerate inputs."""

import warnings

import numpy as np
import pytest
import scipy.stats
import sklearn.metrics

from minilm_jax.finetune import metrics

TOL = 1e-12


@pytest.mark.parametrize("seed", range(5))
def test_classification_metrics_match_sklearn(seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(5, 500))
  labels = rng.integers(0, 2, n)
  # Predictions correlated with the labels, so MCC and F1 are far from 0.
  predictions = np.where(rng.random(n) < 0.7, labels, rng.integers(0, 2, n))
  assert abs(metrics.accuracy(predictions, labels)
             - sklearn.metrics.accuracy_score(labels, predictions)) < TOL
  assert abs(metrics.binary_f1(predictions, labels)
             - sklearn.metrics.f1_score(labels, predictions)) < TOL
  assert abs(metrics.matthews_corrcoef(predictions, labels)
             - sklearn.metrics.matthews_corrcoef(labels, predictions)) < TOL


@pytest.mark.parametrize("seed", range(3))
def test_multiclass_mcc_and_accuracy_match_sklearn(seed):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 3, 300)
  predictions = np.where(rng.random(300) < 0.5, labels, rng.integers(0, 3, 300))
  assert abs(metrics.matthews_corrcoef(predictions, labels)
             - sklearn.metrics.matthews_corrcoef(labels, predictions)) < TOL
  assert abs(metrics.accuracy(predictions, labels)
             - sklearn.metrics.accuracy_score(labels, predictions)) < TOL


@pytest.mark.parametrize("seed", range(5))
def test_correlations_match_scipy(seed):
  rng = np.random.default_rng(seed)
  labels = rng.uniform(0, 5, 200)
  predictions = labels + rng.normal(0, 1.5, 200)
  assert abs(metrics.pearson(predictions, labels)
             - scipy.stats.pearsonr(predictions, labels)[0]) < TOL
  assert abs(metrics.spearman(predictions, labels)
             - scipy.stats.spearmanr(predictions, labels)[0]) < TOL


def test_spearman_with_ties_matches_scipy():
  rng = np.random.default_rng(7)
  labels = rng.integers(0, 6, 300).astype(np.float64) / 5 * 5  # STS-B-like, many ties
  predictions = np.round(labels + rng.normal(0, 1, 300), 1)
  np.testing.assert_allclose(metrics.rankdata(predictions), scipy.stats.rankdata(predictions),
                             rtol=0, atol=TOL)
  assert abs(metrics.spearman(predictions, labels)
             - scipy.stats.spearmanr(predictions, labels)[0]) < TOL


def test_degenerate_inputs_give_zero_not_nan():
  labels = np.array([0, 1, 1, 0, 1])
  constant = np.ones(5, dtype=int)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no RuntimeWarning from 0/0 either
    assert metrics.matthews_corrcoef(constant, labels) == 0.0
    assert metrics.matthews_corrcoef(np.zeros(5, int), labels) == 0.0
    assert metrics.binary_f1(np.zeros(5, int), np.zeros(5, int)) == 0.0
    assert metrics.pearson(np.full(5, 2.5), labels.astype(float)) == 0.0
    assert metrics.spearman(np.full(5, 2.5), labels.astype(float)) == 0.0
  assert sklearn.metrics.matthews_corrcoef(labels, constant) == 0.0  # same convention


def test_perfect_and_inverted_predictions():
  labels = np.array([0, 1, 1, 0, 1, 0])
  assert metrics.matthews_corrcoef(labels, labels) == pytest.approx(1.0, abs=TOL)
  assert metrics.matthews_corrcoef(1 - labels, labels) == pytest.approx(-1.0, abs=TOL)
  assert metrics.binary_f1(labels, labels) == 1.0
  x = np.arange(10.0)
  assert metrics.pearson(x, 3 * x + 1) == pytest.approx(1.0, abs=TOL)
  assert metrics.spearman(x ** 3, -x) == pytest.approx(-1.0, abs=TOL)


def test_task_metrics_scores():
  labels = np.array([1, 0, 1, 1])
  predictions = np.array([1, 0, 0, 1])
  out = metrics.task_metrics("accuracy_f1", predictions, labels)
  assert out["score"] == out["accuracy"] == 0.75
  assert out["f1"] == pytest.approx(0.8)
  stsb = metrics.task_metrics("pearson_spearman", np.array([0.1, 2.0, 2.5, 4.0]),
                              np.array([0.0, 2.0, 3.0, 5.0]))
  assert stsb["score"] == pytest.approx((stsb["pearson"] + stsb["spearman"]) / 2)
  assert metrics.task_metrics("matthews", labels, labels)["score"] == pytest.approx(1.0)


def test_bad_inputs_raise_clear_errors():
  with pytest.raises(ValueError, match="one entry per example"):
    metrics.accuracy([1, 0], [1])
  with pytest.raises(ValueError, match="empty"):
    metrics.accuracy([], [])
  with pytest.raises(ValueError, match="1-D"):
    metrics.accuracy(np.zeros((2, 2)), np.zeros((2, 2)))
  with pytest.raises(ValueError, match="unknown metric 'bleu'"):
    metrics.task_metrics("bleu", [1], [1])
