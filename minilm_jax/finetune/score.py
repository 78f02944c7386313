"""Scoring a model on a task's dev set: during fine-tuning, and a saved model for `evaluate`.

    python -m minilm_jax evaluate --model runs/ft/sst2/seed-0 --task glue/sst2

`score_dev` runs a model over the featurised dev set and applies the task's official
metrics (`tasks.TaskData.metrics`); `train.run` calls it after every epoch. `score_model`
does the same for a saved model: the Hugging Face `*ForSequenceClassification` /
`*ForQuestionAnswering` directory that `train.run` exports (or one that transformers
wrote), loaded into the same JAX modules that fine-tuning trains, so its score comes from
the same featurisation and metrics as the run's per-epoch one. The `RUN_FILE` a run
writes beside its export supplies the settings that must match the run for the scores to
agree (task, max_seq_len, SQuAD split).
"""

import json
import pathlib
from typing import Callable

import jax
import numpy as np
from flax import nnx

from minilm_jax import checkpoint, convert, hf_names, sharding, tokenization
from minilm_jax import model as model_lib
from minilm_jax.finetune import glue, heads, source, tasks

RUN_FILE = "finetune.json"  # written next to an exported model: task, lengths, dev score
LENGTH_BUCKET = 16          # a batch's width: its longest row rounded up to a multiple of this


def make_predict(graphdef, mesh) -> Callable:
  """Jitted `predict(params, batch) -> logits` (a (start, end) pair for QA), rows sharded."""

  def predict(params, batch):
    return nnx.merge(graphdef, params)(batch["input_ids"], batch["attention_mask"],
                                       batch["token_type_ids"])

  return jax.jit(predict, in_shardings=(sharding.replicated(mesh), sharding.batch_sharded(mesh)),
                 out_shardings=sharding.batch_sharded(mesh))


def trimmed_width(attention_mask: np.ndarray, length_bucket: int) -> int:
  """The longest row of a batch rounded up to a multiple of `length_bucket` (0: no cut)."""
  width = attention_mask.shape[1]
  if not length_bucket:
    return width
  longest = int(attention_mask.sum(axis=1).max(initial=1))
  return min(width, -(-longest // length_bucket) * length_bucket)


def predict_all(predict, params, features: dict[str, np.ndarray], batch_size: int, mesh,
                length_bucket: int = 0):
  """Runs `predict` over every row in fixed-size batches (the last one padded).

  With `length_bucket`, rows go in order of length and each batch is cut to its
  `trimmed_width`; outputs come back in the rows' order. Only for per-example outputs
  (classification logits): QA's per-position logits need the full width.
  """
  keys = ("input_ids", "attention_mask", "token_type_ids")
  n = len(features["input_ids"])
  order = (np.argsort(features["attention_mask"].sum(axis=1), kind="stable") if length_bucket
           else np.arange(n))
  outputs = []
  for begin in range(0, n, batch_size):
    rows = order[begin:begin + batch_size]
    width = trimmed_width(features["attention_mask"][rows], length_bucket)
    batch = {k: np.pad(features[k][rows, :width], [(0, batch_size - len(rows)), (0, 0)])
             for k in keys}
    out = jax.device_get(predict(params, jax.device_put(batch, sharding.batch_sharded(mesh))))
    outputs.append(jax.tree.map(lambda x: np.asarray(x[:len(rows)]), out))
  ordered = jax.tree.map(lambda *xs: np.concatenate(xs), *outputs)
  return jax.tree.map(lambda x: x[np.argsort(order)], ordered)


def score_dev(predict, params, data: tasks.TaskData, batch_size: int, length_bucket: int,
              mesh) -> dict[str, float]:
  """The official dev metrics of `params`, with `score` the number the papers report, in
  batches of `batch_size` (length-trimmed by `length_bucket` unless QA)."""
  bucket = 0 if data.num_labels is None else length_bucket
  return data.metrics(predict_all(predict, params, data.eval, batch_size, mesh, bucket))


def resolve_model(model: str | pathlib.Path) -> tuple[pathlib.Path, dict]:
  """(HF directory, the run's RUN_FILE or {}) of an export, or of a run's seed dir."""
  path = pathlib.Path(model).expanduser()
  if (path / "best" / "config.json").is_file():
    path = path / "best"
  elif (path / "summary.json").is_file():
    seeds = sorted(p.name for p in path.glob("seed-*"))
    raise ValueError(f"{path} holds a multi-seed fine-tuning ({', '.join(seeds)}): pass one "
                     f"run, e.g. --model {path / (seeds[0] if seeds else 'seed-0')}")
  if source.distill_run(path) is not None or (path / checkpoint.MODEL_FILE).is_file():
    raise ValueError(f"{model} is a distilled encoder without a task head: fine-tune it first "
                     f"(python -m minilm_jax finetune --task glue/<task> --model {model} --workdir "
                     "DIR), then evaluate DIR/seed-N/best")
  if not (path / "config.json").is_file():
    raise FileNotFoundError(f"{path / 'config.json'} is missing: pass the Hugging Face directory "
                            "a finetune run exported (DIR/seed-N/best) or its run directory")
  info = path / RUN_FILE
  return path, (json.loads(info.read_text()) if info.is_file() else {})


def _check_head(model_dir: pathlib.Path, config: model_lib.ModelConfig, hf: dict,
                task: str) -> int | None:
  """The head width the task needs, after checking the saved head is that task's."""
  arch = (hf.get("architectures") or [""])[0]
  head = hf_names.QUESTION_ANSWERING if task == tasks.SQUAD else hf_names.SEQUENCE_CLASSIFICATION
  wanted = hf_names.architecture(config.model_type, head)
  if arch != wanted:
    raise ValueError(f"{model_dir} is a {arch or 'headless'} model, but {task} needs a fine-tuned "
                     f"{wanted}: fine-tune it first (python -m minilm_jax finetune --task ...)")
  if task == tasks.SQUAD:
    return None
  spec = glue.get_task(task)
  names = [hf.get("id2label", {}).get(str(i)) for i in range(len(hf.get("id2label", {})))]
  if (spec.labels is not None and names != list(spec.labels)) or len(names) != spec.num_labels:
    raise ValueError(f"{model_dir} predicts labels {names}, but {task} has "
                     f"{list(spec.labels or ['a score'])}: the model was fine-tuned on another task")
  return spec.num_labels


def load_task_model(model_dir: pathlib.Path, task: str):
  """The exported task model (encoder and head) as a JAX module, its files read once;
  (module, tokenizer dir)."""
  config, hf = convert.read_hf_config(model_dir)
  num_labels = _check_head(model_dir, config, hf, task)
  tensors, path = convert.read_hf_tensors(model_dir)
  tokenizer_dir = tokenization.check_fits(model_dir, config.vocab_size).parent
  config = config.replace(hidden_dropout=0.0, attention_dropout=0.0, dtype="float32")
  return heads.from_hf(config, num_labels, tensors, path), tokenizer_dir


def score_model(model: str | pathlib.Path, task: str, data: str, *, max_seq_len: int | None = None,
                batch_size: int = 128) -> dict:
  """Dev metrics of a fine-tuned model, with `score` the number the papers report.

  Args:
    model: exported BertFor* directory (or the finetune run directory holding `best/`).
    task: "glue/sst2", "sst2", "squad2", ... .
    data: the GLUE folder, or the SQuAD dev JSON (scored on the run's held-out articles).
    max_seq_len: default the run's (from RUN_FILE), else 128 (GLUE) / 384 (SQuAD).
    batch_size: examples per forward pass (a multiple of the devices).
  """
  if batch_size < 1:
    raise ValueError(f"--batch-size {batch_size} must be at least 1 (default 128)")
  model_dir, run = resolve_model(model)
  task = tasks.resolve_task(task)
  module, tokenizer_dir = load_task_model(model_dir, task)
  task_data = tasks.load(task, data, tokenization.load(tokenizer_dir),
                         max_seq_len=max_seq_len or run.get("max_seq_len", 0),
                         doc_stride=run.get("doc_stride", tasks.DOC_STRIDE),
                         squad_train_articles=run.get("squad_train_articles",
                                                      tasks.SQUAD_TRAIN_ARTICLES),
                         with_train=False)
  mesh = sharding.make_mesh()
  sharding.check_batch_size(batch_size, mesh)
  graphdef, params = nnx.split(module, nnx.Param)
  scores = score_dev(make_predict(graphdef, mesh), sharding.put_replicated(params, mesh),
                     task_data, batch_size, LENGTH_BUCKET, mesh)
  return {"model": str(model_dir), "task": task, **scores, "data": task_data.stats}
