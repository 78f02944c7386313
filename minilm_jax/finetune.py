"""Fine-tuning a (distilled) encoder on a GLUE task or SQuAD 2.0, as the MiniLM papers do.

Heads match Hugging Face's so a fine-tuned model exports to a directory that
`BertForSequenceClassification` / `BertForQuestionAnswering` load as is:
  * classification / regression: pooled [CLS] (BERT's tanh pooler) -> dropout -> dense
    to `num_labels` (1 for STS-B, trained with mean squared error);
  * extractive QA: last hidden states -> dense(2) = start and end logits, the loss being
    the mean of the start and end cross-entropies ([CLS] = no answer).

Training is AdamW (weight decay 0.01, not on biases / LayerNorm), global-norm clipping
1.0, linear warmup over the first 10% of steps then linear decay to 0, one jitted
data-parallel step over a `('data',)` mesh. Each epoch ends with a dev evaluation with
the official metrics; the best epoch's parameters are kept (on the host) and exported.

SQuAD 2.0 has only its dev file here, so `task="squad2"` fine-tunes on the first
`squad_train_articles` dev articles and scores the rest (`squad.dev_split`): a dev-split
number, not the papers' dev F1.
"""

import dataclasses
import json
import logging
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from minilm_jax import checkpoint, convert, sharding, train
from minilm_jax import model as model_lib
from minilm_jax.eval import glue, metrics, squad

SQUAD = "squad2"
QA_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "start_positions", "end_positions")
GLUE_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "labels")


@dataclasses.dataclass
class FinetuneConfig:
  """One fine-tuning run; defaults are the usual BERT-small GLUE recipe."""
  model: str = "all-MiniLM-L6-v2"   # HF dir, packaged name, or minilm_jax checkpoint/distill workdir
  task: str = "rte"                 # a GLUE task of glue.TASKS, or "squad2"
  data: str = ""                    # glue_data folder, or the SQuAD dev-v2.0.json path
  max_seq_len: int = 0              # 0 = 128 for GLUE, 384 for SQuAD
  doc_stride: int = 128             # SQuAD window overlap in tokens
  squad_train_articles: int = 25    # SQuAD dev-split: first N of the 35 dev articles train
  batch_size: int = 32              # global examples per step (a multiple of the devices)
  eval_batch_size: int = 128        # examples per eval forward (padded, one compile)
  epochs: int = 3
  learning_rate: float = 2e-5       # peak after warmup
  warmup_ratio: float = 0.1         # fraction of all steps spent warming up
  weight_decay: float = 0.01
  clip_grad_norm: float = 1.0       # 0 = off
  dropout: float = 0.1              # encoder hidden/attention dropout and head dropout
  compute_dtype: str = "float32"    # "bfloat16" for speed on GPU; parameters stay float32
  seed: int = 0                     # head init, dropout and data order
  max_train_examples: int = 0       # 0 = all; smaller for smoke runs
  max_eval_examples: int = 0        # 0 = all (GLUE examples / SQuAD questions)


class SequenceClassifier(nnx.Module):
  """BertForSequenceClassification: pooler output -> dropout -> dense(num_labels)."""

  def __init__(self, config: model_lib.ModelConfig, num_labels: int, *, rngs: nnx.Rngs):
    self.dropout_rate = config.hidden_dropout
    self.encoder = model_lib.Encoder(config.replace(use_pooler=True), rngs=rngs)
    self.classifier = nnx.Linear(config.hidden_size, num_labels,
                                 kernel_init=nnx.initializers.normal(0.02), rngs=rngs)

  def __call__(self, input_ids, attention_mask, token_type_ids, *, dropout_rng=None):
    rngs = (None, None) if dropout_rng is None else jax.random.split(dropout_rng)
    pooled = self.encoder(input_ids, attention_mask, token_type_ids,
                          dropout_rng=rngs[0]).pooled_output
    return self.classifier(_dropout(pooled, self.dropout_rate, rngs[1])).astype(jnp.float32)


class QuestionAnswerer(nnx.Module):
  """BertForQuestionAnswering: last hidden states -> dense(2) -> (start, end) logits."""

  def __init__(self, config: model_lib.ModelConfig, *, rngs: nnx.Rngs):
    self.encoder = model_lib.Encoder(config.replace(use_pooler=False), rngs=rngs)
    self.qa_outputs = nnx.Linear(config.hidden_size, 2,
                                 kernel_init=nnx.initializers.normal(0.02), rngs=rngs)

  def __call__(self, input_ids, attention_mask, token_type_ids, *, dropout_rng=None):
    hidden = self.encoder(input_ids, attention_mask, token_type_ids,
                          dropout_rng=dropout_rng).last_hidden_state
    logits = self.qa_outputs(hidden).astype(jnp.float32)
    return logits[..., 0], logits[..., 1]


def _dropout(x, rate: float, rng):
  if rng is None or rate == 0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def load_encoder(model: str, use_pooler: bool) -> tuple[model_lib.ModelConfig, Any, pathlib.Path]:
  """(config, float32 encoder parameters, tokenizer directory) of a HF dir or checkpoint.

  A checkpoint without a pooler gets a freshly initialised one when a classifier needs
  it (as `from_pretrained` does); a QA model drops the pooler.
  """
  path = pathlib.Path(model).expanduser()
  if path.is_dir() and ((path / checkpoint.MODEL_FILE).is_file()
                        or (path / "checkpoints" / checkpoint.MODEL_FILE).is_file()):
    config, params, tokenizer_dir, _ = checkpoint.restore_params(path)
    pure = checkpoint.to_host(params).to_pure_dict()
  else:
    config, _ = convert.read_hf_config(model)
    tensors, source = convert.read_hf_tensors(model)
    tokenizer_dir = convert.check_tokenizer(config, model).parent
    has_pooler = any(k.endswith("pooler.dense.weight") for k in tensors)
    pure = convert.hf_to_params(config.replace(use_pooler=has_pooler), tensors,
                                source).to_pure_dict()
  config = config.replace(use_pooler=use_pooler)
  if use_pooler and "pooler" not in pure:
    logging.warning("%s has no pooler: initialising one (train it on the task)", model)
    pure["pooler"] = model_lib.init_params(config).to_pure_dict()["pooler"]
  if not use_pooler:
    pure.pop("pooler", None)
  return config, pure, pathlib.Path(tokenizer_dir)


def build_model(cfg: FinetuneConfig, num_labels: int | None):
  """The task model with pre-trained encoder weights and a fresh head; (module, tokenizer dir)."""
  config, pure, tokenizer_dir = load_encoder(cfg.model, use_pooler=num_labels is not None)
  config = config.replace(hidden_dropout=cfg.dropout, attention_dropout=cfg.dropout,
                          dtype=cfg.compute_dtype)
  rngs = nnx.Rngs(cfg.seed)
  module = (QuestionAnswerer(config, rngs=rngs) if num_labels is None
            else SequenceClassifier(config, num_labels, rngs=rngs))
  encoder_state = nnx.state(module.encoder, nnx.Param)
  nnx.replace_by_pure_dict(encoder_state, jax.tree.map(jnp.asarray, pure))
  nnx.update(module.encoder, encoder_state)
  return module, tokenizer_dir


def warmup_linear_decay(peak: float, total_steps: int, warmup_ratio: float) -> optax.Schedule:
  """0 -> peak over the first `warmup_ratio` of the steps, then linearly down to 0."""
  warmup = int(round(warmup_ratio * total_steps))
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, max(warmup, 1)),
       optax.linear_schedule(peak, 0.0, max(total_steps - warmup, 1))], [warmup])


def make_optimizer(cfg: FinetuneConfig, total_steps: int) -> optax.GradientTransformation:
  adamw = optax.adamw(warmup_linear_decay(cfg.learning_rate, total_steps, cfg.warmup_ratio),
                      b1=0.9, b2=0.999, eps=1e-6, weight_decay=cfg.weight_decay,
                      mask=train.decay_mask)
  return optax.chain(optax.clip_by_global_norm(cfg.clip_grad_norm), adamw) \
      if cfg.clip_grad_norm else adamw


def task_loss(module, batch, dropout_rng, regression: bool):
  """Cross-entropy (classes), squared error (STS-B) or mean start/end cross-entropy (QA)."""
  args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
  ce = optax.softmax_cross_entropy_with_integer_labels
  if isinstance(module, QuestionAnswerer):
    start, end = module(*args, dropout_rng=dropout_rng)
    return (ce(start, batch["start_positions"]).mean() + ce(end, batch["end_positions"]).mean()) / 2
  logits = module(*args, dropout_rng=dropout_rng)
  if regression:
    return jnp.mean((logits[:, 0] - batch["labels"]) ** 2)
  return ce(logits, batch["labels"]).mean()


def make_steps(graphdef, optimizer, mesh, regression: bool) -> tuple[Callable, Callable]:
  """Jitted `train(params, opt_state, batch, key, step) -> (params, opt_state, loss)` and
  `predict(params, batch) -> logits` (a (start, end) pair for QA)."""

  def train_step(params, opt_state, batch, key, step):
    loss_of = lambda p: task_loss(nnx.merge(graphdef, p), batch,
                                  jax.random.fold_in(key, step), regression)
    loss, grads = jax.value_and_grad(loss_of)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  def predict(params, batch):
    return nnx.merge(graphdef, params)(batch["input_ids"], batch["attention_mask"],
                                       batch["token_type_ids"])

  rep, rows = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  return (jax.jit(train_step, in_shardings=(rep, rep, rows, rep, rep),
                  out_shardings=(rep, rep, rep), donate_argnums=(0, 1)),
          jax.jit(predict, in_shardings=(rep, rows), out_shardings=rows))


def predict_all(predict, params, features: dict[str, np.ndarray], batch_size: int, mesh):
  """Runs `predict` over every row in fixed-size batches (the last one padded)."""
  keys = ("input_ids", "attention_mask", "token_type_ids")
  n = len(features["input_ids"])
  outputs = []
  for begin in range(0, n, batch_size):
    batch = {k: features[k][begin:begin + batch_size] for k in keys}
    real = len(batch["input_ids"])
    batch = {k: np.pad(v, [(0, batch_size - real), (0, 0)]) for k, v in batch.items()}
    out = jax.device_get(predict(params, jax.device_put(batch, sharding.batch_sharded(mesh))))
    outputs.append(jax.tree.map(lambda x: np.asarray(x[:real]), out))
  return jax.tree.map(lambda *xs: np.concatenate(xs), *outputs)


@dataclasses.dataclass
class TaskData:
  """Featurised train / eval sets and how to score eval predictions."""
  train: dict[str, np.ndarray]
  eval: dict[str, np.ndarray]
  evaluate: Callable[[Any], dict[str, float]]  # predict_all output -> metrics with "score"
  num_labels: int | None                      # None = extractive QA
  regression: bool = False
  labels: tuple[str, ...] | None = None


def _limit(items, n):
  return items[:n] if n else items


def glue_data(cfg: FinetuneConfig, tokenizer) -> TaskData:
  task = glue.get_task(cfg.task)
  max_len = cfg.max_seq_len or 128
  train_ex = _limit(glue.load_glue(task, cfg.data, "train"), cfg.max_train_examples)
  eval_ex = _limit(glue.load_glue(task, cfg.data, "dev"), cfg.max_eval_examples)
  train_f = glue.encode_examples(train_ex, tokenizer, task, max_len)
  eval_f = glue.encode_examples(eval_ex, tokenizer, task, max_len)

  def evaluate(logits):
    predictions = logits[:, 0] if task.is_regression else np.argmax(logits, axis=-1)
    return metrics.task_metrics(task.metric, predictions, eval_f["labels"])

  return TaskData(train_f, eval_f, evaluate, task.num_labels, task.is_regression, task.labels)


def squad_data(cfg: FinetuneConfig, tokenizer) -> TaskData:
  train_articles, eval_articles = squad.dev_split(squad.load_squad(cfg.data),
                                                  cfg.squad_train_articles)
  train_ex = _limit(squad.examples_from_articles(train_articles), cfg.max_train_examples)
  eval_ex = _limit(squad.examples_from_articles(eval_articles), cfg.max_eval_examples)
  kept = {e.qid for e in eval_ex}
  eval_articles = [{**a, "paragraphs": [{**p, "qas": [q for q in p["qas"] if q["id"] in kept]}
                                        for p in a["paragraphs"]]} for a in eval_articles]
  max_len = cfg.max_seq_len or 384
  train_f = squad.make_features(train_ex, tokenizer, max_len, cfg.doc_stride)
  eval_f = squad.make_features(eval_ex, tokenizer, max_len, cfg.doc_stride)

  def evaluate(logits):
    out = squad.score(eval_articles, squad.postprocess(eval_ex, eval_f, *logits))
    return out | {"score": out["f1"] / 100}

  return TaskData(train_f, eval_f, evaluate, None)


def export_hf(out_dir: str | pathlib.Path, module, tokenizer_dir: str | pathlib.Path, *,
              labels: tuple[str, ...] | None = None, regression: bool = False,
              overwrite: bool = False) -> pathlib.Path:
  """Writes a fine-tuned model as a Hugging Face `BertForSequenceClassification` or
  `BertForQuestionAnswering` directory (config, model.safetensors, tokenizer)."""
  config = module.encoder.config.replace(dtype="float32")
  if config.model_type != "bert":
    raise ValueError(f"export_hf writes BERT task heads; {config.model_type!r} task models "
                     "(RobertaFor*, a different classifier head) are not supported")
  pure = checkpoint.to_host(nnx.state(module, nnx.Param)).to_pure_dict()
  if isinstance(module, QuestionAnswerer):
    head, arch, extra_config = "qa_outputs", "BertForQuestionAnswering", {}
  else:
    head, arch = "classifier", "BertForSequenceClassification"
    width = module.classifier.out_features
    names = list(labels) if labels else [f"LABEL_{i}" for i in range(width)]
    extra_config = {"id2label": dict(enumerate(names)),
                    "label2id": {name: i for i, name in enumerate(names)},
                    "problem_type": "regression" if regression else "single_label_classification"}
  tensors = {f"{head}.weight": np.ascontiguousarray(np.asarray(pure[head]["kernel"]).T),
             f"{head}.bias": np.asarray(pure[head]["bias"])}
  return convert.save_hf(out_dir, config, pure["encoder"], tokenizer_dir, prefix="bert.",
                         extra_tensors=tensors,
                         extra_config={"architectures": [arch]} | extra_config,
                         overwrite=overwrite)


def run(cfg: FinetuneConfig, workdir: str | pathlib.Path | None = None) -> dict:
  """Fine-tunes `cfg.model` on `cfg.task`, evaluating after every epoch.

  Returns {"best_score", "best_epoch", "history": [per-epoch metrics], "module": the task
  model holding the best epoch's parameters}; with `workdir`, also writes metrics.jsonl
  and the best model as a Hugging Face directory `workdir/best`.
  """
  is_squad = cfg.task == SQUAD
  num_labels = None if is_squad else glue.get_task(cfg.task).num_labels
  module, tokenizer_dir = build_model(cfg, num_labels)
  tokenizer = glue.load_tokenizer(tokenizer_dir)
  data = squad_data(cfg, tokenizer) if is_squad else glue_data(cfg, tokenizer)
  mesh = sharding.make_mesh()
  sharding.check_batch_size(cfg.batch_size, mesh)
  sharding.check_batch_size(cfg.eval_batch_size, mesh)
  n_train = len(data.train["input_ids"])
  steps_per_epoch = n_train // cfg.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"{n_train} training rows do not fill one batch of {cfg.batch_size}: "
                     "lower batch_size")
  optimizer = make_optimizer(cfg, steps_per_epoch * cfg.epochs)
  graphdef, params = nnx.split(module, nnx.Param)
  params = sharding.put_replicated(params, mesh)
  opt_state = sharding.put_replicated(optimizer.init(params), mesh)
  train_step, predict = make_steps(graphdef, optimizer, mesh, data.regression)
  keys = QA_INPUTS if is_squad else GLUE_INPUTS
  key = jax.random.key(cfg.seed)
  rng = np.random.default_rng(cfg.seed)
  history, best, best_params = [], None, None
  for epoch in range(1, cfg.epochs + 1):
    order = rng.permutation(n_train)
    losses = []
    for i in range(steps_per_epoch):
      rows = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
      batch = jax.device_put({k: data.train[k][rows] for k in keys}, sharding.batch_sharded(mesh))
      step = jnp.asarray((epoch - 1) * steps_per_epoch + i, jnp.int32)
      params, opt_state, loss = train_step(params, opt_state, batch, key, step)
      losses.append(loss)
    train_loss = float(np.mean(jax.device_get(losses)))
    if not np.isfinite(train_loss):
      raise FloatingPointError(f"training loss is {train_loss} in epoch {epoch}: lower "
                               "learning_rate or keep clip_grad_norm on")
    record = {"epoch": epoch, "train_loss": train_loss} | data.evaluate(
        predict_all(predict, params, data.eval, cfg.eval_batch_size, mesh))
    history.append(record)
    logging.info("finetune %s epoch %d: %s", cfg.task, epoch, record)
    if best is None or record["score"] > best["score"]:
      best, best_params = record, checkpoint.to_host(params)
  nnx.update(module, best_params)
  summary = {"best_score": best["score"], "best_epoch": best["epoch"], "history": history,
             "module": module}
  if workdir is not None and jax.process_index() == 0:
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    summary["hf"] = str(export_hf(workdir / "best", module, tokenizer_dir, labels=data.labels,
                                  regression=data.regression, overwrite=True))
  return summary
