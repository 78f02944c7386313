"""SQuAD 2.0: reader, by-article dev split, sliding-window features, n-best decoding and
the official evaluation (a port of evaluate-v2.0.py).

Features follow Hugging Face `run_qa.py`: the question (leading spaces stripped, cut to
`max_query_len` tokens as BERT does) comes first, the context is cut into windows of
`max_len` tokens that overlap by `doc_stride` tokens (the fast tokenizer's `stride`), and
every context token keeps its character offsets into the original context so predicted
spans are cut from the context text itself, not detokenised. A window whose gold answer
is absent or not wholly inside it is labelled with the [CLS] index 0, SQuAD 2.0's "no
answer" position.

Decoding follows BERT's `run_squad.py`: per window, the `n_best` highest start and end
logits are paired (end >= start, at most `max_answer_len` tokens, context tokens only);
candidates from every window of a question compete by start + end logit, the null score
is the smallest [CLS] start + end over the windows, and the answer is "" when
null − best > `null_threshold`. That difference is the `na_prob` that the official
script's `find_best_thresh` sweeps to report best_exact / best_f1.

Only the SQuAD 2.0 dev file is available here (no train-v2.0.json), so fine-tuning uses
`dev_split`: the first N dev articles train, the rest evaluate. Such scores are a
dev-split measurement, not comparable with the papers' dev-set numbers.
"""

import collections
import dataclasses
import json
import pathlib
import re
import string

import numpy as np
import tokenizers

from minilm_jax import tokenization
from minilm_jax.eval import glue


@dataclasses.dataclass(frozen=True)
class SquadExample:
  """One question with its context; `answers` is () for an unanswerable question."""
  qid: str
  question: str
  context: str
  answers: tuple[tuple[str, int], ...]  # (text, character start in context) per gold answer


def load_squad(path: str | pathlib.Path) -> list[dict]:
  """The articles (`data` list) of an official SQuAD JSON file such as dev-v2.0.json."""
  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: pass the official SQuAD 2.0 JSON "
                            "(dev-v2.0.json from rajpurkar.github.io/SQuAD-explorer)")
  with path.open(encoding="utf-8") as f:
    dataset = json.load(f)
  if not isinstance(dataset, dict) or not isinstance(dataset.get("data"), list):
    raise ValueError(f"{path} is not a SQuAD file: expected {{'version': ..., 'data': "
                     "[articles]}} as in the official dev-v2.0.json")
  return dataset["data"]


def examples_from_articles(articles: list[dict]) -> list[SquadExample]:
  """Flattens articles -> paragraphs -> questions into examples, in file order."""
  return [SquadExample(qa["id"], qa["question"], p["context"],
                       tuple((a["text"], a["answer_start"]) for a in qa["answers"]))
          for article in articles for p in article["paragraphs"] for qa in p["qas"]]


def dev_split(articles: list[dict], num_train_articles: int) -> tuple[list[dict], list[dict]]:
  """Deterministic by-article split: (first `num_train_articles`, the remaining articles).

  Splitting by article keeps every passage on one side, so no evaluated context was seen
  in fine-tuning. The dev file has 35 articles.
  """
  if not 0 < num_train_articles < len(articles):
    raise ValueError(f"num_train_articles={num_train_articles} must leave both sides "
                     f"non-empty: pick 1..{len(articles) - 1} of the {len(articles)} articles")
  return articles[:num_train_articles], articles[num_train_articles:]


def _cut_questions(tokenizer: tokenizers.Tokenizer, questions: list[str],
                   max_query_len: int) -> tuple[list[str], int]:
  """Questions with leading spaces removed and cut after `max_query_len` tokens, and the
  largest resulting question length in tokens."""
  plain = tokenization.plain(tokenizer)
  questions = [q.lstrip() for q in questions]
  encodings = plain.encode_batch(questions, add_special_tokens=False)
  cut = [q if len(e.offsets) <= max_query_len else q[: e.offsets[max_query_len - 1][1]]
         for q, e in zip(questions, encodings)]
  return cut, min(max_query_len, max(len(e.offsets) for e in encodings))


def _answer_span(offsets: np.ndarray, answer: tuple[str, int] | None) -> tuple[int, int]:
  """Gold (start, end) token indices in one window, or (0, 0) ([CLS]) if not inside it."""
  if answer is None:
    return 0, 0
  start_char = answer[1]
  end_char = start_char + len(answer[0])
  in_context = offsets[:, 0] >= 0
  context_idx = np.flatnonzero(in_context)
  if offsets[context_idx[0], 0] > start_char or offsets[context_idx[-1], 1] < end_char:
    return 0, 0
  start = np.flatnonzero(in_context & (offsets[:, 0] <= start_char))[-1]
  end = np.flatnonzero(in_context & (offsets[:, 1] >= end_char))[0]
  return int(start), int(end)


def make_features(examples: list[SquadExample], tokenizer: tokenizers.Tokenizer,
                  max_len: int = 384, doc_stride: int = 128,
                  max_query_len: int = 64) -> dict[str, np.ndarray]:
  """Sliding-window extractive-QA features; several windows (rows) per long context.

  Returns int32 arrays: input_ids / attention_mask / token_type_ids [F, max_len];
  start_positions / end_positions [F] (first gold answer; 0 = [CLS] = no answer in this
  window); example_index [F] (row of `examples`); offsets [F, max_len, 2], the character
  span of each context token in its context and (-1, -1) for question, special and
  padding tokens.
  """
  if not examples:
    raise ValueError("no SQuAD examples to featurise")
  questions, longest = _cut_questions(tokenizer, [e.question for e in examples], max_query_len)
  if doc_stride >= max_len - longest - 3:  # [CLS] question [SEP] context [SEP]
    raise ValueError(f"doc_stride={doc_stride} overlaps whole windows: max_len={max_len} "
                     f"leaves {max_len - longest - 3} context tokens beside a {longest}-token "
                     "question; lower doc_stride or max_query_len, or raise max_len")
  tok = glue.fixed_length_tokenizer(tokenizer, max_len, strategy="only_second",
                                    stride=doc_stride)
  encodings = tok.encode_batch(list(zip(questions, [e.context for e in examples])))
  columns = collections.defaultdict(list)
  for index, (example, encoding) in enumerate(zip(examples, encodings)):
    answer = example.answers[0] if example.answers else None
    for window in [encoding, *encoding.overflowing]:
      is_context = np.array([s == 1 for s in window.sequence_ids])
      offsets = np.where(is_context[:, None], np.asarray(window.offsets, np.int32), -1)
      start, end = _answer_span(offsets, answer)
      columns["input_ids"].append(window.ids)
      columns["attention_mask"].append(window.attention_mask)
      columns["token_type_ids"].append(window.type_ids)
      columns["offsets"].append(offsets)
      columns["start_positions"].append(start)
      columns["end_positions"].append(end)
      columns["example_index"].append(index)
  return {k: np.asarray(v, np.int32) for k, v in columns.items()}


@dataclasses.dataclass
class QAPredictions:
  """Decoded answers per question id.

  predictions: the answer after the null threshold ("" = no answer); submit these.
  best_non_null: the best span ignoring the null option (what thresholds sweep over).
  na_probs: null score − best span score (+inf if no valid span); higher = no answer.
  nbest: up to n_best (text, start+end logit) candidates, best first.
  """
  predictions: dict[str, str]
  best_non_null: dict[str, str]
  na_probs: dict[str, float]
  nbest: dict[str, list[tuple[str, float]]]


def _window_candidates(start_logits, end_logits, offsets, n_best, max_answer_len):
  """(score, start_char, end_char) of valid top-n_best start x end pairs in one window."""
  starts = np.argsort(-start_logits, kind="stable")[:n_best]
  ends = np.argsort(-end_logits, kind="stable")[:n_best]
  s, e = np.meshgrid(starts, ends, indexing="ij")
  valid = ((offsets[s, 0] >= 0) & (offsets[e, 0] >= 0) & (e >= s)
           & (e - s + 1 <= max_answer_len))
  s, e = s[valid], e[valid]
  scores = start_logits[s] + end_logits[e]
  return [(float(sc), int(offsets[i, 0]), int(offsets[j, 1])) for sc, i, j in zip(scores, s, e)]


def postprocess(examples: list[SquadExample], features: dict[str, np.ndarray],
                start_logits: np.ndarray, end_logits: np.ndarray, n_best: int = 20,
                max_answer_len: int = 30, null_threshold: float = 0.0) -> QAPredictions:
  """Turns per-window start/end logits [F, max_len] into one answer per question."""
  start_logits = np.asarray(start_logits, np.float64)
  end_logits = np.asarray(end_logits, np.float64)
  if start_logits.shape != features["input_ids"].shape or end_logits.shape != start_logits.shape:
    raise ValueError(f"logits {start_logits.shape}/{end_logits.shape} must match the features "
                     f"{features['input_ids'].shape} ([windows, max_len])")
  windows = collections.defaultdict(list)
  for f, index in enumerate(features["example_index"]):
    windows[int(index)].append(f)
  out = QAPredictions({}, {}, {}, {})
  for index, example in enumerate(examples):
    if index not in windows:
      raise ValueError(f"example {example.qid} has no feature row: pass the features made "
                       "from these same examples")
    null_score, candidates = np.inf, []
    for f in windows[index]:
      null_score = min(null_score, start_logits[f, 0] + end_logits[f, 0])
      candidates += _window_candidates(start_logits[f], end_logits[f], features["offsets"][f],
                                       n_best, max_answer_len)
    candidates.sort(key=lambda c: -c[0])
    nbest = [(example.context[a:b], score) for score, a, b in candidates[:n_best]]
    text, score = nbest[0] if nbest else ("", -np.inf)
    diff = float(null_score - score)
    out.predictions[example.qid] = "" if diff > null_threshold else text
    out.best_non_null[example.qid] = text
    out.na_probs[example.qid] = diff
    out.nbest[example.qid] = nbest
  return out


# ---- Official SQuAD 2.0 evaluation (evaluate-v2.0.py), same logic, same numbers. ----

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


def evaluate(articles: list[dict], preds: dict[str, str], na_probs: dict[str, float] | None = None,
             na_prob_thresh: float = 1.0) -> dict[str, float]:
  """The official SQuAD 2.0 metrics of `preds` (question id -> answer text, "" = none).

  Returns exact, f1, total, HasAns_*/NoAns_* and, when `na_probs` is given, best_exact,
  best_exact_thresh, best_f1, best_f1_thresh, all as evaluate-v2.0.py prints them.
  """
  qid_to_has_ans = {qa["id"]: bool(qa["answers"]) for qa in _qas(articles)}
  missing = [qid for qid in qid_to_has_ans if qid not in preds]
  if missing:
    raise KeyError(f"{len(missing)} question(s) have no prediction (first: {missing[0]}): "
                   "predict every question of the evaluated articles ('' for no answer)")
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


def score(articles: list[dict], result: QAPredictions) -> dict[str, float]:
  """exact/f1 (HasAns/NoAns) of the thresholded predictions, and best_exact/best_f1 with
  their thresholds swept over the null-score differences of the best non-null spans."""
  out = evaluate(articles, result.predictions)
  best = evaluate(articles, result.best_non_null, result.na_probs)
  out.update({k: best[k] for k in ("best_exact", "best_exact_thresh", "best_f1",
                                   "best_f1_thresh")})
  return out
