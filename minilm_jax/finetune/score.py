"""The `evaluate` job: a saved, fine-tuned model scored on a task's dev set.

    python -m minilm_jax evaluate --model runs/ft/sst2/seed-0 --task glue/sst2

The model is the Hugging Face `BertForSequenceClassification` / `BertForQuestionAnswering`
directory that `finetune.run` exports (or one that transformers wrote): its encoder and
task head are loaded into the same JAX modules that fine-tuning trains, so the score is
computed by the same featurisation and official metrics as the run's per-epoch dev
evaluation. The `finetune.json` a run writes beside its export supplies the defaults
that must match the run for the scores to agree (task, max_seq_len, SQuAD split).
"""

import json
import pathlib

import numpy as np
from flax import nnx

from minilm_jax import convert, finetune, sharding, tokenization
from minilm_jax.eval import glue

RUN_FILE = finetune.RUN_FILE
_HEADS = {"BertForSequenceClassification": "classifier", "BertForQuestionAnswering": "qa_outputs"}


def resolve_model(model: str | pathlib.Path) -> tuple[pathlib.Path, dict]:
  """(HF directory, the run's finetune.json or {}) of an export, or of a run's seed dir."""
  path = pathlib.Path(model).expanduser()
  if (path / "best" / "config.json").is_file():
    path = path / "best"
  elif (path / "summary.json").is_file():
    seeds = sorted(p.name for p in path.glob("seed-*"))
    raise ValueError(f"{path} holds a multi-seed fine-tuning ({', '.join(seeds)}): pass one "
                     f"run, e.g. --model {path / (seeds[0] if seeds else 'seed-0')}")
  if not (path / "config.json").is_file():
    raise FileNotFoundError(f"{path / 'config.json'} is missing: pass the Hugging Face directory "
                            "a finetune run exported (DIR/seed-N/best) or its run directory")
  info = path / RUN_FILE
  return path, (json.loads(info.read_text()) if info.is_file() else {})


def _check_head(model_dir: pathlib.Path, hf: dict, task: str) -> int | None:
  """The head width the task needs, after checking the saved head is that task's."""
  arch = (hf.get("architectures") or [""])[0]
  wanted = "BertForQuestionAnswering" if task == finetune.SQUAD else "BertForSequenceClassification"
  if arch != wanted:
    raise ValueError(f"{model_dir} is a {arch or 'headless'} model, but {task} needs a fine-tuned "
                     f"{wanted}: fine-tune it first (python -m minilm_jax finetune --task ...)")
  if task == finetune.SQUAD:
    return None
  spec = glue.get_task(task)
  names = [hf.get("id2label", {}).get(str(i)) for i in range(len(hf.get("id2label", {})))]
  if spec.labels is not None and names != list(spec.labels):
    raise ValueError(f"{model_dir} predicts labels {names}, but {task} has {list(spec.labels)}: "
                     "the model was fine-tuned on another task")
  return spec.num_labels


def load_task_model(model_dir: pathlib.Path, cfg: finetune.FinetuneConfig):
  """The exported task model (encoder and head) as a JAX module; (module, tokenizer dir)."""
  _, hf = convert.read_hf_config(model_dir)
  num_labels = _check_head(model_dir, hf, cfg.task)
  module, tokenizer_dir = finetune.build_model(cfg, num_labels)
  tensors, path = convert.read_hf_tensors(model_dir)
  name = _HEADS[hf["architectures"][0]]
  missing = [t for t in (f"{name}.weight", f"{name}.bias") if t not in tensors]
  if missing:
    raise ValueError(f"{path} lacks the task head's {', '.join(missing)}: it is not a complete "
                     f"{hf['architectures'][0]}; export it again (finetune writes DIR/seed-N/best)")
  head = getattr(module, name)
  kernel, bias = tensors[f"{name}.weight"].T, tensors[f"{name}.bias"]
  if kernel.shape != head.kernel.value.shape:
    raise ValueError(f"{model_dir}: {name}.weight has shape {kernel.shape[::-1]}, expected "
                     f"{head.kernel.value.shape[::-1]} for {cfg.task}")
  head.kernel.value, head.bias.value = np.asarray(kernel, np.float32), np.asarray(bias, np.float32)
  return module, tokenizer_dir


def evaluate(model: str | pathlib.Path, task: str, data: str, *, max_seq_len: int | None = None,
             batch_size: int = 128) -> dict:
  """Dev metrics of a fine-tuned model, with `score` the number the papers report.

  Args:
    model: exported BertFor* directory (or the finetune run directory holding `best/`).
    task: "glue/sst2", "sst2", "squad2", ... .
    data: the GLUE folder, or the SQuAD dev JSON (scored on the run's held-out articles).
    max_seq_len: default the run's (from finetune.json), else 128 (GLUE) / 384 (SQuAD).
    batch_size: examples per forward pass (a multiple of the devices).
  """
  if batch_size < 1:
    raise ValueError(f"--batch-size {batch_size} must be at least 1 (default 128)")
  model_dir, run = resolve_model(model)
  task = finetune.resolve_task(task)
  cfg = finetune.FinetuneConfig(
      model=str(model_dir), task=task, data=str(data), dropout=0.0, eval_batch_size=batch_size,
      max_seq_len=max_seq_len or run.get("max_seq_len", 0),
      doc_stride=run.get("doc_stride", finetune.FinetuneConfig.doc_stride),
      squad_train_articles=run.get("squad_train_articles",
                                   finetune.FinetuneConfig.squad_train_articles))
  module, tokenizer_dir = load_task_model(model_dir, cfg)
  tokenizer = tokenization.load(tokenizer_dir)
  data_fn = finetune.squad_data if task == finetune.SQUAD else finetune.glue_data
  task_data = data_fn(cfg, tokenizer, with_train=False)
  mesh = sharding.make_mesh()
  sharding.check_batch_size(batch_size, mesh)
  graphdef, params = nnx.split(module, nnx.Param)
  predict = finetune.make_predict(graphdef, mesh)
  scores = finetune.evaluate_dev(predict, sharding.put_replicated(params, mesh), task_data, cfg, mesh)
  return {"model": str(model_dir), "task": task, **scores,
          "data": task_data.stats}
