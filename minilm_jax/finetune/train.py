"""The fine-tuning loop: a task model trained on a task's train set, scored every epoch.

Padding costs nothing it need not: each batch is cut to its longest row, rounded up
to a multiple of `length_bucket` tokens (a handful of compiled shapes; exact, since
padded positions are masked), and `group_by_length` builds batches from rows of
similar length, as Hugging Face's `group_by_length` does (SST-2 rows average 13
tokens: about 4x fewer tokens than padding to 64).

Training is AdamW (weight decay 0.01, not on biases / LayerNorm), global-norm clipping
1.0, linear warmup over the first 10% of steps then linear decay to 0, one jitted
data-parallel step over a `('data',)` mesh. Each epoch ends with `score.score_dev` (the
official metrics on the dev set); the best epoch's parameters are kept (on the host)
and exported as a Hugging Face directory.
"""

import dataclasses
import json
import logging
import pathlib
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from flax import nnx

from minilm_jax import atomic, checkpoint, model_card, optimizer as optimizer_lib, sharding, student_init
from minilm_jax import tokenization
from minilm_jax import workdir as workdir_lib
from minilm_jax import model as model_lib
from minilm_jax.finetune import checks, glue, heads, score, source, tasks
from minilm_jax.metric_writer import MetricWriter

QA_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "start_positions", "end_positions")
GLUE_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "labels")


@dataclasses.dataclass
class FinetuneConfig:
  """One fine-tuning run; defaults are the usual BERT-small GLUE recipe."""
  model: str = "all-MiniLM-L6-v2"   # HF dir, packaged name, or minilm_jax checkpoint/distill workdir
  task: str = "rte"                 # a GLUE task of glue.TASKS, or "squad2"
  data: str = ""                    # glue_data folder, or the SQuAD dev-v2.0.json path
  max_seq_len: int = 0              # 0 = 128 for GLUE, 384 for SQuAD
  doc_stride: int = tasks.DOC_STRIDE  # SQuAD window overlap in tokens
  squad_train_articles: int = tasks.SQUAD_TRAIN_ARTICLES  # SQuAD: first N of 35 dev articles train
  batch_size: int = 32              # global examples per step (a multiple of the devices)
  eval_batch_size: int = 128        # examples per eval forward (the last batch padded)
  length_bucket: int = score.LENGTH_BUCKET  # batch width: longest row rounded up to this; 0 = off
  group_by_length: bool = False     # batch rows of similar length together (less padding)
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
  num_layers: int = 0               # 0 = all; N keeps the model's bottom N layers
  random_init: bool = False         # fresh weights of the model's shape (no pre-training)


def _baseline_encoder(cfg: FinetuneConfig, config: model_lib.ModelConfig, pure: dict):
  """The bottom `cfg.num_layers` layers, and/or fresh weights of that shape (`random_init`)."""
  if cfg.num_layers:
    pure = student_init.bottom_layers(pure, cfg.num_layers)
    config = config.replace(num_layers=cfg.num_layers)
  if cfg.random_init:
    pure = model_lib.init_params(config, seed=cfg.seed).to_pure_dict()
  return config, pure


def build_model(cfg: FinetuneConfig, num_labels: int | None):
  """The task model with pre-trained encoder weights and a fresh head; (module, tokenizer dir)."""
  config, pure, tokenizer_dir = heads.load_encoder(cfg.model, use_pooler=num_labels is not None)
  config, pure = _baseline_encoder(cfg, config, pure)
  config = config.replace(hidden_dropout=cfg.dropout, attention_dropout=cfg.dropout,
                          dtype=cfg.compute_dtype)
  return heads.task_model(config, pure, num_labels, cfg.seed), tokenizer_dir


def make_optimizer(cfg: FinetuneConfig, total_steps: int) -> optax.GradientTransformation:
  """`optimizer.adamw` warming up over the first `warmup_ratio` of `total_steps`."""
  schedule = optimizer_lib.warmup_linear_decay(cfg.learning_rate, int(round(cfg.warmup_ratio * total_steps)),
                                           total_steps)
  return optimizer_lib.adamw(schedule, weight_decay=cfg.weight_decay, clip_grad_norm=cfg.clip_grad_norm)


def task_loss(module, batch, dropout_rng, regression: bool):
  """Cross-entropy (classes), squared error (STS-B) or mean start/end cross-entropy (QA)."""
  args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
  ce = optax.softmax_cross_entropy_with_integer_labels
  if isinstance(module, heads.QuestionAnswerer):
    # Padded positions are no candidate answer: left in, they would add to the softmax
    # denominator, and the loss would change with the batch's padded width.
    real = batch["attention_mask"].astype(bool)
    start, end = (jnp.where(real, x, -1e9) for x in module(*args, dropout_rng=dropout_rng))
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

  rep, rows = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  return (jax.jit(train_step, in_shardings=(rep, rep, rows, rep, rep),
                  out_shardings=(rep, rep, rep), donate_argnums=(0, 1)),
          score.make_predict(graphdef, mesh))


def epoch_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator,
                  group_by_length: bool = False, group_batches: int = 50) -> list[np.ndarray]:
  """The rows of each full batch of one epoch, in a random order (a ragged tail is dropped).

  `group_by_length`: shuffle, sort each chunk of `group_batches` batches by length, cut it
  into batches and shuffle the batches, so that a batch holds rows of similar length
  while the epoch stays a random permutation.
  """
  order = rng.permutation(len(lengths))
  if group_by_length:
    chunk = batch_size * group_batches
    order = np.concatenate([c[np.argsort(-lengths[c], kind="stable")]
                            for c in np.split(order, range(chunk, len(order), chunk))])
  batches = [order[b:b + batch_size] for b in range(0, len(order) - batch_size + 1, batch_size)]
  if group_by_length:
    batches = [batches[i] for i in rng.permutation(len(batches))]
  return batches


def _batches(features, keys, batches, length_bucket: int, mesh):
  """The batches' rows of `features`, cut to their `trimmed_width`, placed on the mesh."""
  for rows in batches:
    width = score.trimmed_width(features["attention_mask"][rows], length_bucket)
    yield jax.device_put({k: features[k][rows][:, :width] if features[k].ndim == 2
                          else features[k][rows] for k in keys}, sharding.batch_sharded(mesh))


def _train_epoch(train_step, params, opt_state, key, batches, first_step: int, bar):
  """Steps through `batches`; returns (params, opt_state, mean training loss)."""
  losses = []
  for i, batch in enumerate(batches):
    step = jnp.asarray(first_step + i, jnp.int32)
    params, opt_state, loss = train_step(params, opt_state, batch, key, step)
    losses.append(loss)
    bar.update(len(batch["input_ids"]))
    if i and i % 20 == 0:  # the previous step's loss is ready by now: no pipeline stall
      bar.set_postfix(loss=f"{float(losses[-2]):.4f}")
  return params, opt_state, float(np.mean(jax.device_get(losses)))


def run(cfg: FinetuneConfig, workdir: str | pathlib.Path | None = None) -> dict:
  """Fine-tunes `cfg.model` on `cfg.task`, scoring it on dev after every epoch.

  Returns {"best_score", "best_epoch", "history": [per-epoch metrics], "module": the task
  model holding the best epoch's parameters, "data": example counts, "model_info"}; with
  `workdir`, also writes metrics.jsonl + TensorBoard per epoch and the best model as a
  Hugging Face directory `workdir/best` (with `score.RUN_FILE` for `score.score_model`).
  """
  checks.check_config(cfg)
  cfg = dataclasses.replace(cfg, task=tasks.resolve_task(cfg.task))
  module, tokenizer_dir, data, mesh, steps_per_epoch = _prepare(cfg)
  optimizer = make_optimizer(cfg, steps_per_epoch * cfg.epochs)
  graphdef, params = nnx.split(module, nnx.Param)
  params = sharding.put_replicated(params, mesh)
  opt_state = sharding.put_replicated(optimizer.init(params), mesh)
  train_step, predict = make_steps(graphdef, optimizer, mesh, data.regression)
  keys = QA_INPUTS if cfg.task == tasks.SQUAD else GLUE_INPUTS
  key = jax.random.key(cfg.seed)
  rng = np.random.default_rng(cfg.seed)
  lengths = data.train["attention_mask"].sum(axis=1)
  info = {"layers": module.encoder.config.num_layers, "hidden": module.encoder.config.hidden_size,
          "params": heads.count_params(module)}
  writer = None
  if workdir is not None:
    writer = MetricWriter(workdir)
    writer.write_text("config", json.dumps(dataclasses.asdict(cfg), indent=2))
  logging.info("finetune %s on %s (%s): %s", cfg.model, cfg.task, info, data.stats)
  bar = tqdm.tqdm(total=steps_per_epoch * cfg.batch_size * cfg.epochs, unit="ex",
                  disable=jax.process_index() != 0, dynamic_ncols=True)
  history, best, best_params = [], None, None
  try:
    for epoch in range(1, cfg.epochs + 1):
      began = time.perf_counter()
      bar.set_description(f"epoch {epoch}")
      batches = _batches(data.train, keys, epoch_batches(lengths, cfg.batch_size, rng,
                                                         cfg.group_by_length),
                         cfg.length_bucket, mesh)
      params, opt_state, train_loss = _train_epoch(train_step, params, opt_state, key, batches,
                                                   (epoch - 1) * steps_per_epoch, bar)
      record = _scored(cfg, epoch, train_loss, steps_per_epoch * cfg.batch_size / (time.perf_counter() - began),
                       predict, params, data, mesh)
      history.append(record)
      bar.write(f"epoch {epoch}: train_loss {train_loss:.4f}, dev score {record['score']:.4f}")
      if writer is not None:
        if epoch == 1:  # a fresh run, not a resume: the old records go once a new one exists
          writer.path.unlink(missing_ok=True)
        writer.write(epoch * steps_per_epoch, record)
      if best is None or record["score"] > best["score"]:
        best, best_params = record, checkpoint.to_host(params)
  finally:
    bar.close()
    if writer is not None:
      writer.close()
  nnx.update(module, best_params)
  summary = {"best_score": best["score"], "best_epoch": best["epoch"], "history": history,
             "module": module, "data": data.stats, "model_info": info}
  if workdir is not None and jax.process_index() == 0:
    summary["hf"] = str(_export_best(cfg, pathlib.Path(workdir) / "best", module, tokenizer_dir,
                                     data, best))
  return summary


def _scored(cfg: FinetuneConfig, epoch: int, train_loss: float, examples_per_sec: float, predict,
            params, data, mesh) -> dict:
  """Epoch `epoch`'s record: its training loss (refused when not finite) and speed, then the
  dev set's scores and how long they took."""
  if not np.isfinite(train_loss):
    raise FloatingPointError(f"training loss is {train_loss} in epoch {epoch}: lower "
                             "learning_rate or keep clip_grad_norm on")
  record = {"epoch": epoch, "train_loss": train_loss, "examples_per_sec": examples_per_sec}
  began = time.perf_counter()
  record |= score.score_dev(predict, params, data, cfg.eval_batch_size, cfg.length_bucket, mesh)
  record["eval_seconds"] = time.perf_counter() - began
  return record


def _prepare(cfg: FinetuneConfig):
  """The task model, its tokenizer's directory, the task's data, the mesh and steps per epoch."""
  num_labels = None if cfg.task == tasks.SQUAD else glue.get_task(cfg.task).num_labels
  module, tokenizer_dir = build_model(cfg, num_labels)
  data = tasks.load(cfg.task, cfg.data, tokenization.load(tokenizer_dir),
                    max_seq_len=cfg.max_seq_len, doc_stride=cfg.doc_stride,
                    squad_train_articles=cfg.squad_train_articles,
                    max_train_examples=cfg.max_train_examples,
                    max_eval_examples=cfg.max_eval_examples)
  mesh = sharding.make_mesh()
  sharding.check_batch_size(cfg.batch_size, mesh)
  sharding.check_batch_size(cfg.eval_batch_size, mesh)
  n_train = len(data.train["input_ids"])
  steps_per_epoch = n_train // cfg.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"{n_train} training rows do not fill one batch of {cfg.batch_size}: "
                     "lower batch_size")
  if n_train % cfg.batch_size:
    logging.info("each epoch leaves out %d of %d training rows (the ragged last batch; other rows "
                 "each epoch)", n_train % cfg.batch_size, n_train)
  return module, tokenizer_dir, data, mesh, steps_per_epoch


def _export_best(cfg: FinetuneConfig, out: pathlib.Path, module, tokenizer_dir, data,
                 best: dict) -> pathlib.Path:
  """The best epoch's task model as a Hugging Face directory, with `score.RUN_FILE` beside it."""
  out = heads.export_hf(out, module, tokenizer_dir, labels=data.labels, regression=data.regression,
                        card=model_card.for_finetune(cfg, out.parent, best), overwrite=True)
  (out / score.RUN_FILE).write_text(json.dumps(
      {"task": cfg.task, "max_seq_len": data.stats["max_seq_len"], "doc_stride": cfg.doc_stride,
       "squad_train_articles": cfg.squad_train_articles, "epoch": best["epoch"],
       "dev_score": best["score"]}, indent=2) + "\n")
  return out


@workdir_lib.locked
def run_seeds(cfg: FinetuneConfig, workdir: str | pathlib.Path, seeds: list[int], *,
              overwrite: bool = False, allow_unfinished: bool = False) -> dict:
  """One `run` per seed in `workdir/seed-N`, then `workdir/summary.json`.

  Everything is checked before anything is written (`checks`, `source.model_source`): a
  workdir holding results is replaced only with `overwrite`, and then only once every
  seed has finished (the runs are written into a hidden sibling that is renamed into
  place, `atomic.write_dir`); an unfinished distill run is fine-tuned only with
  `allow_unfinished`. The summary holds each seed's best dev score, best epoch and wall
  time (model loading, tokenisation, training, scoring and export), their mean and sample
  standard deviation, the model's size and source and the config: everything
  `experiments/scripts/report.py` needs.
  """
  if not seeds or len(set(seeds)) != len(seeds):
    raise ValueError(f"seeds {list(seeds)} must be distinct and at least one (each writes "
                     "seed-N/): pass e.g. --seeds 0 or --seeds 0,1,2")
  for seed in seeds:
    checks.check_config(dataclasses.replace(cfg, seed=seed))
  workdir = pathlib.Path(workdir)
  checks.check_workdir(workdir, [p for p in (cfg.model, cfg.data)
                                 if p and pathlib.Path(p).expanduser().exists()], overwrite)
  model, model_info = source.model_source(cfg.model, allow_unfinished)
  cfg = dataclasses.replace(cfg, model=model)
  summary = {}
  atomic.write_dir(workdir, lambda tmp: summary.update(
      _run_all(cfg, tmp, workdir, seeds, model_info)), overwrite=True)
  return summary


def _run_all(cfg: FinetuneConfig, tmp: pathlib.Path, workdir: pathlib.Path, seeds: list[int],
             model_info: dict) -> dict:
  """Every seed's run and the summary in `tmp`, the hidden sibling of `workdir` that
  `run_seeds` renames into place; the summary (paths as they will be in `workdir`)."""
  logging.info("writing into %s, renamed to %s once every seed is done", tmp, workdir)
  runs = []
  for seed in seeds:
    began = time.perf_counter()
    out = run(dataclasses.replace(cfg, seed=seed), tmp / f"{checks.SEED_PREFIX}{seed}")
    final = workdir / f"{checks.SEED_PREFIX}{seed}" / "best"
    runs.append({"seed": seed, "best_score": out["best_score"], "best_epoch": out["best_epoch"],
                 "wall_time_s": time.perf_counter() - began,
                 "hf": str(final) if "hf" in out else None,
                 "history": out["history"]})
  scores = [r["best_score"] for r in runs]
  task = tasks.resolve_task(cfg.task)
  summary = {"task": task, "metric": tasks.task_metric(task), "model": cfg.model,
             "model_source": model_info, **out["model_info"], "seeds": list(seeds),
             "scores": scores, "mean": float(np.mean(scores)),
             "std": float(np.std(scores, ddof=1)) if len(scores) > 1 else 0.0,
             "wall_time_s": [r["wall_time_s"] for r in runs], "data": out["data"],
             "runs": runs, "config": dataclasses.asdict(cfg)}
  atomic.write_file(tmp / checks.SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
  return summary
