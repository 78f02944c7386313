"""SQuAD 2.0: reader, by-article dev split, sliding-window features, n-best decoding, and
`task_data`, what `tasks.load` reads for SQuAD; the official metrics (a port of
evaluate-v2.0.py) are `metrics.squad_metrics`.

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
`dev_split`: the first N dev articles train, the rest are scored. Such scores are a
dev-split measurement, not comparable with the papers' dev-set numbers.
"""

import collections
import dataclasses
import json
import logging
import pathlib

import numpy as np
import tokenizers

from minilm_jax import tokenization
from minilm_jax.finetune import glue, metrics

MAX_MISPLACED = 0.05  # the largest share of answers not at their answer_start a file may hold


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
  if not dataset["data"]:
    raise ValueError(f"{path} holds no articles (its 'data' list is empty): pass the official "
                     "SQuAD 2.0 JSON (dev-v2.0.json) or a file of the same layout")
  return dataset["data"]


def _misplaced(context: str, text: str, start) -> str | None:
  """Why an answer is not the text at its `answer_start` in `context`; None if it is."""
  if isinstance(start, bool) or not isinstance(start, int):
    return f"answer_start {start!r} is not an integer"
  if not 0 <= start <= len(context) - len(text):
    return f"{text!r} at {start} lies outside the {len(context)}-character context"
  if context[start:start + len(text)] != text:
    return f"{text!r} is not at {start} ({context[start:start + len(text)]!r} is)"
  return None


def misplaced_answers(articles: list[dict], path: str | pathlib.Path) -> set[str]:
  """The ids of questions with an answer outside its context or not at its `answer_start`,
  counted and named in the log; more than `MAX_MISPLACED` of the answers refuse the file.

  Training on them would teach wrong spans (a start past the context trains "no answer");
  scoring uses only the answers' texts, so they stay in the scored articles.
  """
  found, total = [], 0
  try:
    for article in articles:
      for paragraph in article["paragraphs"]:
        for qa in paragraph["qas"]:
          qid, _, answers = qa["id"], qa["question"], qa["answers"]  # as the examples read them
          for answer in answers:
            total += 1
            if why := _misplaced(paragraph["context"], answer["text"], answer["answer_start"]):
              found.append((qid, why))
  except (KeyError, TypeError) as e:
    raise ValueError(f"{path} is not in the SQuAD 2.0 layout ({type(e).__name__}: {e}): each "
                     "article holds paragraphs of a context and qas (id, question, answers of "
                     "text and answer_start)") from e
  if not found:
    return set()
  examples = "; ".join(f"{qid}: {why}" for qid, why in found[:3])
  if len(found) > MAX_MISPLACED * total:
    raise ValueError(f"{path}: {len(found)} of {total} answers are not at their answer_start "
                     f"(more than {MAX_MISPLACED:.0%}; e.g. {examples}): the file's offsets are "
                     "damaged; pass the official file or fix its answer_start values")
  ids = {qid for qid, _ in found}
  logging.warning("%s: %d of %d answers are not at their answer_start (e.g. %s); their %d "
                  "questions are left out of training", path, len(found), total, examples, len(ids))
  return ids


def examples_from_articles(articles: list[dict]) -> list[SquadExample]:
  """Flattens articles -> paragraphs -> questions into examples, in file order."""
  return [SquadExample(qa["id"], qa["question"], p["context"],
                       tuple((a["text"], a["answer_start"]) for a in qa["answers"]))
          for article in articles for p in article["paragraphs"] for qa in p["qas"]]


def dev_split(articles: list[dict], num_train_articles: int) -> tuple[list[dict], list[dict]]:
  """Deterministic by-article split: (first `num_train_articles`, the remaining articles).

  Splitting by article keeps every passage on one side, so no scored context was seen
  in fine-tuning. The dev file has 35 articles.
  """
  if len(articles) < 2:
    raise ValueError(f"the SQuAD file holds {len(articles)} article(s): the dev split needs at "
                     "least 2, one to train on and one to score")
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


def answer_metrics(articles: list[dict], result: QAPredictions) -> dict[str, float]:
  """exact/f1 (HasAns/NoAns) of the thresholded predictions, and best_exact/best_f1 with
  their thresholds swept over the null-score differences of the best non-null spans."""
  out = metrics.squad_metrics(articles, result.predictions)
  best = metrics.squad_metrics(articles, result.best_non_null, result.na_probs)
  out.update({k: best[k] for k in ("best_exact", "best_exact_thresh", "best_f1",
                                   "best_f1_thresh")})
  return out


def task_data(path: str | pathlib.Path, tokenizer: tokenizers.Tokenizer, max_len: int,
              doc_stride: int, squad_train_articles: int, *, max_train_examples: int = 0,
              max_eval_examples: int = 0, with_train: bool = True):
  """(train features, dev features, dev metrics, stats) of the by-article dev split, for
  `tasks.load`.

  The train side is empty unless `with_train`; `max_*_examples` keep the first N questions
  (0 = all), and the scored articles keep only the kept questions. The dev metrics map
  (start, end) logits to `answer_metrics`, with `score` the F1 as a fraction.
  """
  articles = load_squad(path)
  misplaced = misplaced_answers(articles, path)
  train_articles, eval_articles = dev_split(articles, squad_train_articles)
  train_ex = (examples_from_articles(train_articles)[:max_train_examples or None] if with_train
              else [])
  kept_train = [e for e in train_ex if e.qid not in misplaced]
  eval_ex = examples_from_articles(eval_articles)[:max_eval_examples or None]
  kept = {e.qid for e in eval_ex}
  eval_articles = [{**a, "paragraphs": [{**p, "qas": [q for q in p["qas"] if q["id"] in kept]}
                                        for p in a["paragraphs"]]} for a in eval_articles]
  train_f = make_features(kept_train, tokenizer, max_len, doc_stride) if kept_train else {}
  eval_f = make_features(eval_ex, tokenizer, max_len, doc_stride)
  stats = {"max_seq_len": max_len, "train_examples": len(kept_train),
           "train_skipped_misplaced": len(train_ex) - len(kept_train),
           "eval_examples": len(eval_ex),
           "train_features": len(train_f.get("input_ids", ())),
           "eval_features": len(eval_f["input_ids"]),
           "split": f"SQuAD 2.0 dev by article: {squad_train_articles} train / "
                    f"{len(eval_articles)} eval articles"}

  def dev_metrics(logits):
    out = answer_metrics(eval_articles, postprocess(eval_ex, eval_f, *logits))
    return out | {"score": out["f1"] / 100}

  return train_f, eval_f, dev_metrics, stats
