"""SQuAD 2.0: official metric on hand-scored cases, features vs transformers, offsets
round trip on the real dev file, n-best decoding and a perfect-prediction run."""

import json

import numpy as np
import pytest

from minilm_jax import tokenization
from minilm_jax.finetune import metrics, squad


CONTEXT = ("Super Bowl 50 was an American football game. The American Football Conference "
           "champion Denver Broncos defeated the National Football Conference champion "
           "Carolina Panthers 24 to 10 to earn their third Super Bowl title. The game was "
           "played on February 7, 2016, at Levi's Stadium in Santa Clara, California.")


def _qa(qid, question, *answers):
  return {"id": qid, "question": question,
          "answers": [{"text": a, "answer_start": CONTEXT.index(a)} for a in answers]}


ARTICLES = [{"title": "Super_Bowl_50", "paragraphs": [{"context": CONTEXT, "qas": [
    _qa("q1", "Who won Super Bowl 50?", "Denver Broncos", "Broncos"),
    _qa("q2", "Who lost?", "Carolina Panthers"),
    _qa("q3", "Who sang the anthem?"),
    _qa("q4", "Where was Super Bowl 49 played?"),
    _qa("q5", "When was the game played?", "February 7, 2016"),
    _qa("q6", "In which state is Levi's Stadium?", "California"),
]}]}]
HAND = ARTICLES[0]["paragraphs"][0]["qas"][:4]
HAND_ARTICLES = [{"title": "t", "paragraphs": [{"context": CONTEXT, "qas": HAND}]}]
HAND_PREDS = {"q1": "the Broncos", "q2": "Panthers", "q3": "", "q4": "Santa Clara"}


@pytest.fixture(scope="module")
def tokenizer(teacher_dir):
  return tokenization.load(teacher_dir)


def test_official_answer_normalisation_exact_and_f1():
  assert metrics.normalize_answer("The  Cat, sat!") == "cat sat"
  assert metrics.normalize_answer("an apple a day") == "apple day"
  assert metrics.compute_exact("Denver Broncos", "the denver broncos.") == 1
  assert metrics.compute_f1("the cat sat", "cat sat on mat") == pytest.approx(2 / 3)
  assert metrics.compute_f1("", "") == 1.0 and metrics.compute_f1("", "x") == 0.0
  assert metrics.compute_f1("x", "") == 0.0 and metrics.compute_f1("a b", "c") == 0.0


def test_official_evaluation_on_hand_scored_cases():
  # q1 exact (best of two golds), q2 F1 2/3, q3 no-answer right, q4 no-answer wrong.
  out = metrics.squad_metrics(HAND_ARTICLES, HAND_PREDS)
  assert out["exact"] == pytest.approx(50.0) and out["f1"] == pytest.approx(100 * (8 / 3) / 4)
  assert out["HasAns_exact"] == pytest.approx(50.0)
  assert out["HasAns_f1"] == pytest.approx(100 * (5 / 3) / 2)
  assert out["NoAns_exact"] == out["NoAns_f1"] == pytest.approx(50.0)
  assert out["total"] == 4 and out["HasAns_total"] == 2 and "best_f1" not in out


def test_no_answer_threshold_and_best_threshold_search():
  na_probs = {"q1": -3.0, "q2": 0.5, "q3": 2.0, "q4": 1.0}
  out = metrics.squad_metrics(HAND_ARTICLES, HAND_PREDS, na_probs)  # thresh 1.0: only q3 (> 1) null
  assert out["exact"] == pytest.approx(50.0) and out["f1"] == pytest.approx(100 * (8 / 3) / 4)
  # Sweep, in na_prob order q1, q2, q4, q3 from "answer nothing" (2 of 4 right):
  # exact 3, 3, 2, 2 -> 75 at -3; F1 3, 3 2/3, 2 2/3, 2 2/3 -> 91.67 at 0.5.
  assert out["best_exact"] == pytest.approx(75.0) and out["best_exact_thresh"] == -3.0
  assert out["best_f1"] == pytest.approx(100 * (11 / 3) / 4) and out["best_f1_thresh"] == 0.5
  zero = metrics.squad_metrics(HAND_ARTICLES, HAND_PREDS, na_probs, na_prob_thresh=0.0)
  assert zero["exact"] == pytest.approx(75.0) and zero["f1"] == pytest.approx(75.0)


def test_evaluation_errors():
  with pytest.raises(KeyError, match="1 question.*q4.*'' for no answer"):
    metrics.squad_metrics(HAND_ARTICLES, {k: v for k, v in HAND_PREDS.items() if k != "q4"})


def test_reader_split_and_errors(tmp_path):
  path = tmp_path / "tiny.json"
  path.write_text(json.dumps({"version": "v2.0", "data": ARTICLES * 3}))
  articles = squad.load_squad(path)
  examples = squad.examples_from_articles(articles)
  assert len(examples) == 18 and examples[2].answers == ()
  assert examples[0].answers[0] == ("Denver Broncos", CONTEXT.index("Denver Broncos"))
  train, held_out = squad.dev_split(articles, 2)
  assert len(train) == 2 and len(held_out) == 1 and squad.dev_split(articles, 2)[0] == train
  with pytest.raises(ValueError, match="pick 1..2 of the 3 articles"):
    squad.dev_split(articles, 3)
  with pytest.raises(FileNotFoundError, match="official SQuAD 2.0 JSON"):
    squad.load_squad(tmp_path / "missing.json")
  (tmp_path / "bad.json").write_text("[1, 2]")
  with pytest.raises(ValueError, match="not a SQuAD file"):
    squad.load_squad(tmp_path / "bad.json")


def test_windows_offsets_and_positions(tokenizer):
  examples = squad.examples_from_articles(ARTICLES)
  features = squad.make_features(examples, tokenizer, max_len=32, doc_stride=8,
                                 max_query_len=12)
  assert features["input_ids"].shape[1] == 32 and features["offsets"].shape[2] == 2
  for key in ("input_ids", "start_positions", "example_index", "offsets"):
    assert features[key].dtype == np.int32
  for index, example in enumerate(examples):
    rows = np.flatnonzero(features["example_index"] == index)
    assert len(rows) > 1  # the context needs several 32-token windows
    answered = [r for r in rows if features["start_positions"][r] > 0]
    if not example.answers:
      assert not answered and (features["end_positions"][rows] == 0).all()
      continue
    assert answered, example.qid
    for r in answered:
      s, e = features["start_positions"][r], features["end_positions"][r]
      offsets = features["offsets"][r]
      assert example.context[offsets[s, 0]:offsets[e, 1]] == example.answers[0][0]
  with pytest.raises(ValueError, match="lower doc_stride"):
    squad.make_features(examples, tokenizer, max_len=32, doc_stride=30)
  # Question and special tokens carry no context offsets.
  assert (features["offsets"][:, 0] == -1).all()  # [CLS]
  assert ((features["offsets"][..., 0] >= 0) == (features["token_type_ids"] == 1)
          & (features["attention_mask"] == 1)
          & (features["input_ids"] != tokenizer.token_to_id("[SEP]"))).all()


def test_features_match_transformers_run_qa(tokenizer, teacher_dir):
  transformers = pytest.importorskip("transformers")
  reference = transformers.AutoTokenizer.from_pretrained(str(teacher_dir))
  examples = squad.examples_from_articles(ARTICLES)
  features = squad.make_features(examples, tokenizer, max_len=40, doc_stride=10)
  expected = reference([e.question for e in examples], [e.context for e in examples],
                       truncation="only_second", max_length=40, stride=10,
                       return_overflowing_tokens=True, return_offsets_mapping=True,
                       padding="max_length", return_tensors="np")
  for key in ("input_ids", "attention_mask", "token_type_ids"):
    np.testing.assert_array_equal(features[key], expected[key])
  np.testing.assert_array_equal(features["example_index"], expected["overflow_to_sample_mapping"])
  is_context = features["offsets"][..., 0] >= 0
  np.testing.assert_array_equal(features["offsets"][is_context],
                                expected["offset_mapping"][is_context])


def _gold_logits(features):
  """Logits that put all mass on the labelled start/end (the [CLS] for no answer)."""
  rows = np.arange(len(features["input_ids"]))
  start = np.full(features["input_ids"].shape, -10.0)
  end = np.full(features["input_ids"].shape, -10.0)
  start[rows, features["start_positions"]] = 10.0
  end[rows, features["end_positions"]] = 10.0
  return start, end


def test_perfect_predictions_score_100(tokenizer):
  examples = squad.examples_from_articles(ARTICLES)
  features = squad.make_features(examples, tokenizer, max_len=32, doc_stride=8,
                                 max_query_len=12)
  result = squad.postprocess(examples, features, *_gold_logits(features))
  assert result.predictions == {"q1": "Denver Broncos", "q2": "Carolina Panthers", "q3": "",
                                "q4": "", "q5": "February 7, 2016", "q6": "California"}
  out = squad.answer_metrics(ARTICLES, result)
  for key in ("exact", "f1", "HasAns_exact", "NoAns_f1", "best_exact", "best_f1"):
    assert out[key] == pytest.approx(100.0), key


def test_nbest_respects_span_rules_and_null_threshold(tokenizer):
  examples = squad.examples_from_articles(ARTICLES)[:1]
  features = squad.make_features(examples, tokenizer, max_len=128, doc_stride=32)
  assert len(features["input_ids"]) == 1
  offsets = features["offsets"][0]
  context_tokens = np.flatnonzero(offsets[:, 0] >= 0)
  first = context_tokens[0]
  assert context_tokens[-1] >= first + 42
  start, end = np.full((1, 128), -100.0), np.full((1, 128), -100.0)
  start[0, first + 2] = 9.0
  end[0, first] = 9.0  # best pair, but it ends before it starts
  end[0, first + 42] = 8.0  # next best: 41 tokens > max_answer_len
  end[0, first + 3] = 5.0  # best valid span: first+2 .. first+3
  result = squad.postprocess(examples, features, start, end, max_answer_len=30)
  want = CONTEXT[offsets[first + 2, 0]:offsets[first + 3, 1]]
  assert result.best_non_null["q1"] == result.predictions["q1"] == want
  assert result.nbest["q1"][0] == (want, 14.0)
  assert result.na_probs["q1"] == pytest.approx(-200.0 - 14.0)
  start[0, 0], end[0, 0] = 7.5, 7.5  # null 15 > best span 14: predict no answer
  result = squad.postprocess(examples, features, start, end)
  assert result.predictions["q1"] == "" and result.best_non_null["q1"] == want
  assert result.na_probs["q1"] == pytest.approx(1.0)
  assert squad.postprocess(examples, features, start, end,
                           null_threshold=2.0).predictions["q1"] == want


def test_real_dev_counts_and_offsets_round_trip(tokenizer, shared_data):
  dev = shared_data / "squad2" / "dev-v2.0.json"
  if not dev.is_file():
    pytest.skip(f"{dev} is not present")
  articles = squad.load_squad(dev)
  examples = squad.examples_from_articles(articles)
  assert len(articles) == 35 and len(examples) == 11873
  assert sum(not e.answers for e in examples) == 5945
  features = squad.make_features(examples, tokenizer)
  assert features["input_ids"].shape[1] == 384 and len(features["input_ids"]) > len(examples)
  recovered = {}
  for r in np.flatnonzero(features["start_positions"] > 0):
    example = examples[features["example_index"][r]]
    offsets = features["offsets"][r]
    span = example.context[offsets[features["start_positions"][r], 0]:
                           offsets[features["end_positions"][r], 1]]
    recovered.setdefault(example.qid, []).append(span == example.answers[0][0])
  answerable = [e for e in examples if e.answers]
  success = sum(all(recovered.get(e.qid, [False])) for e in answerable) / len(answerable)
  assert success > 0.99, success
  # Decoding gold logits over the real windows gives (almost) perfect official scores.
  result = squad.postprocess(examples, features, *_gold_logits(features))
  out = squad.answer_metrics(articles, result)
  assert out["NoAns_exact"] == 100.0 and out["HasAns_exact"] > 99.0
