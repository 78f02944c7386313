"""The `README.md` model card every export carries: Hugging Face metadata, then how it was made.

The metadata (YAML front matter, written by huggingface_hub's `ModelCardData`) names the
library that loads the model, its pipeline, the base model (a packaged teacher's Hub id) and
the language and datasets where known. The text says what a reader needs to trust or redo the
model: the teacher, the method and its loss terms, the relation heads and layers, the
student's shape and initialisation, the corpus and the tokens seen, the steps, the last
training and held-out (`eval/*`) losses, the hardware and wall time, and the command.

A distill run's card is read from its workdir: `config.json`, `corpus.json`, `metrics.jsonl`
(losses, and the tokens and seconds summed over its records) and `launch.json`, which
`workdir.record_launch` fills at each start with the command line and the devices.
"""

import dataclasses
import json
import pathlib
import shlex

import huggingface_hub

from minilm_jax import hf_names, losses, sentence_transformers_files
from minilm_jax import checkpoint as checkpoint_lib
from minilm_jax import model as model_lib
from minilm_jax import workdir as workdir_lib
from minilm_jax.metric_writer import read_metrics
from minilm_jax.teachers import resolve_model_dir

# Packaged teachers' names on the Hugging Face Hub, for `base_model`.
HUB_IDS = {"all-MiniLM-L6-v2": "sentence-transformers/all-MiniLM-L6-v2"}
METHODS = {"v1": "MiniLM (Wang et al., 2020): self-attention distribution transfer and value relation",
           "v2": "MiniLMv2 (Wang et al., 2021): multi-head self-attention relation distillation",
           "mlm": "BERT masked-language-model pre-training from scratch (no teacher: the baseline)"}


def _card(metadata: dict, title: str, sections: dict[str, list[str]]) -> str:
  """Front matter from `metadata` (None values left out), a title and bulleted sections."""
  data = huggingface_hub.ModelCardData(**{k: v for k, v in metadata.items() if v})
  body = "".join(f"\n## {name}\n\n" + "\n".join(lines) + "\n" for name, lines in sections.items())
  return str(huggingface_hub.ModelCard(f"---\n{data.to_yaml()}\n---\n\n# {title}\n{body}"))


def _pipeline(tokenizer_dir: pathlib.Path, head: str | None,
              config: model_lib.ModelConfig | None = None) -> dict:
  """library_name, pipeline_tag and tags of a task model with `head`, or of an encoder of
  `config` (a sentence-transformers one if the export gets the teacher's files)."""
  if head is not None:
    tag = {hf_names.MASKED_LM: "fill-mask", hf_names.QUESTION_ANSWERING: "question-answering"}.get(
        head, "text-classification")
    return {"library_name": "transformers", "pipeline_tag": tag, "tags": ["minilm_jax", tag]}
  if sentence_transformers_files.fitted_files(tokenizer_dir, config):
    return {"library_name": "sentence-transformers", "pipeline_tag": "sentence-similarity",
            "tags": ["minilm_jax", "sentence-transformers", "feature-extraction", "sentence-similarity"]}
  return {"library_name": "transformers", "pipeline_tag": "feature-extraction",
          "tags": ["minilm_jax", "feature-extraction"]}


def _language(model: str) -> str | list[str] | None:
  """The `language` of a model's own card, if it has one here."""
  try:
    return huggingface_hub.ModelCard.load(resolve_model_dir(model) / "README.md").data.language
  except (OSError, ValueError):
    return None


def _usage(library: str, head: str | None) -> list[str]:
  if library == "sentence-transformers":
    return ["```python", "from sentence_transformers import SentenceTransformer", "",
            'embeddings = SentenceTransformer("path/to/this/folder").encode(["A sentence."])', "```"]
  auto = f"AutoModel{head or ''}"
  return ["```python", "import transformers", "",
          f'model = transformers.{auto}.from_pretrained("path/to/this/folder")', "```"]


def _losses(records: list[dict]) -> list[str]:
  """The last record's training loss terms and the last held-out (`eval/*`) terms."""
  lines = []
  for prefix, what in (("loss/", "training loss"), ("eval/", "held-out loss")):
    last = next((r for r in reversed(records) if any(k.startswith(prefix) for k in r)), None)
    if last is not None:
      terms = ", ".join(f"{k.removeprefix(prefix)} {v:.4f}" for k, v in last.items()
                        if k.startswith(prefix))
      lines.append(f"- Final {what} (step {last['step']}): {terms}")
  return lines


def _throughput(records: list[dict], batch_size: int) -> tuple[float, float]:
  """(tokens seen, seconds) summed over the records, each covering the steps since the one before."""
  tokens, seconds, before = 0.0, 0.0, 0
  for r in records:
    if "examples_per_sec" in r:
      took = (r["step"] - before) * batch_size / r["examples_per_sec"]
      tokens, seconds = tokens + r.get("tokens_per_sec", 0.0) * took, seconds + took
      before = r["step"]
  return tokens, seconds


def _init(cfg: dict) -> str:
  """The student's initialisation: "random", or the teacher layers it started from."""
  init = cfg.get("student_init", "random")
  return f"teacher layers {', '.join(map(str, init))}" if isinstance(init, list) else str(init)


def _layers(chosen: list | None) -> str:
  return ", ".join(map(str, chosen or ()))


def _duration(seconds: float) -> str:
  return f"{seconds:.0f} s" if seconds < 3600 else f"{seconds / 3600:.2f} h"


def _method(cfg: dict, teacher_layers: int | None) -> list[str]:
  if cfg.get("objective") == "mlm":
    return [f"- Method: {METHODS['mlm']}; the teacher's tokenizer and vocabulary"]
  layer = cfg["teacher_layer"] or teacher_layers or "the last"
  lines = [f"- Method: {METHODS[cfg['version']]}",
           f"- Loss terms: {', '.join(cfg['loss_terms'] or losses.TERMS[cfg['version']])}"
           + (f"; own loss `{cfg['internals_loss']}`" if cfg.get("internals_loss") else ""),
           f"- Layers: teacher {_layers(cfg.get('loss_teacher_layers')) or layer} -> student "
           f"{_layers(cfg.get('loss_student_layers')) or 'last'}"]
  if cfg["version"] == "v2":
    lines.append(f"- Relation heads: {cfg['relation_heads']}")
  return lines


def _run_files(workdir: pathlib.Path, step: int) -> tuple[dict, dict, list, list]:
  """(config, corpus record, launches, metric records up to `step`) of a distill workdir."""
  cfg = workdir_lib.read_config(workdir)
  if cfg is None:
    raise FileNotFoundError(f"{workdir} holds no {workdir_lib.CONFIG_FILE}: not a distill run")
  corpus_path, launch_path = workdir / workdir_lib.CORPUS_FILE, workdir / workdir_lib.LAUNCH_FILE
  corpus = json.loads(corpus_path.read_text()) if corpus_path.is_file() else {}
  launches = json.loads(launch_path.read_text()) if launch_path.is_file() else []
  records = ([r for r in read_metrics(workdir, drop_torn_tail=True) if r["step"] <= step]
             if (workdir / "metrics.jsonl").is_file() else [])
  return cfg, corpus, launches, records


def _teacher_layers(teacher: str) -> int | None:
  """The teacher's depth, if its directory is here."""
  try:
    return json.loads((resolve_model_dir(teacher) / "config.json").read_text()).get(
        "num_hidden_layers")
  except (OSError, ValueError):
    return None


def for_run(workdir: str | pathlib.Path, step: int, tokenizer_dir: str | pathlib.Path,
            head: str | None = None) -> str:
  """The card of a distill run's student at `step` (a masked-LM run's LM model with `head`)."""
  workdir = pathlib.Path(workdir)
  cfg, corpus, launches, records = _run_files(workdir, step)
  student = checkpoint_lib.read_model_config(workdir / "checkpoints")
  teacher = cfg["teacher"]
  teacher_layers = _teacher_layers(teacher)
  meta = _pipeline(pathlib.Path(tokenizer_dir), head, student)
  mlm = cfg.get("objective") == "mlm"
  meta |= {"base_model": None if mlm else HUB_IDS.get(teacher), "language": _language(teacher),
           "datasets": [cfg["corpus"][5:].split(":")[0].split("/")[0]]
           if cfg["corpus"].startswith("tfds:") else None}
  meta["tags"] = [*meta["tags"], "masked-lm" if mlm else "distillation"]
  tokens, seconds = _throughput(records, cfg["global_batch_size"])
  command = next((launch["command"] for launch in launches if launch["command"]), None)
  command = command or shlex.join(["python", "-m", "minilm_jax", "distill", "--config", "CONFIG.py",
                                   "--workdir", str(workdir)])
  training = [
      f"- Tokenizer: `{teacher}`" if mlm else
      f"- Teacher: `{teacher}`" + (f" ({teacher_layers} layers)" if teacher_layers else ""),
      *_method(cfg, teacher_layers),
      f"- Student: {student.num_layers} layers, hidden {student.hidden_size}, {student.num_heads} "
      f"heads, feed-forward {student.intermediate_size}; initialisation: {_init(cfg)}",
      f"- Corpus: `{cfg['corpus']}` ({corpus.get('examples', '?')} examples of {cfg['max_seq_len']} "
      f"tokens, {corpus.get('tokens', '?')} tokens); {tokens:,.0f} tokens seen",
      f"- Steps: {step} of {cfg['max_steps']}, batch {cfg['global_batch_size']}, peak learning rate "
      f"{cfg['learning_rate']}, seed {cfg['seed']}",
      *_losses(records),
      f"- Hardware: {'; '.join(sorted({launch['devices'] for launch in launches})) or 'not recorded'}"
      f"; training wall time {_duration(seconds)}",
  ]
  title = "Masked-LM baseline" if mlm else f"Student of {teacher}"
  return _card(meta, f"{title} (minilm_jax)", {
      "Training": training,
      "Reproduce": ["Every setting is in the run's `config.json`.", "", "```bash", command, "```"],
      "Usage": _usage(meta["library_name"], head)})


def for_checkpoint(directory: str | pathlib.Path, step: int) -> str:
  """The card of a checkpoint's step: its run's, or (a converted model) where it came from."""
  directory = checkpoint_lib.resolve(directory)
  tokenizer_dir = directory / checkpoint_lib.TOKENIZER_DIR
  if directory.name == "checkpoints" and (directory.parent / workdir_lib.CONFIG_FILE).is_file():
    return for_run(directory.parent, step, tokenizer_dir)
  config = checkpoint_lib.read_model_config(directory)
  meta = _pipeline(tokenizer_dir, None, config)
  return _card(meta, "Model converted by minilm_jax", {
      "Origin": [f"- The minilm_jax checkpoint `{directory}`, step {step}: {config.num_layers} "
                 f"layers, hidden {config.hidden_size}, {config.num_heads} heads"],
      "Usage": _usage(meta["library_name"], None)})


def _finetune_seconds(run_dir: str | pathlib.Path, batch_size: int) -> float:
  """Training and dev-scoring seconds summed over a fine-tuning run's epoch records."""
  records = read_metrics(run_dir) if (pathlib.Path(run_dir) / "metrics.jsonl").is_file() else []
  return _throughput(records, batch_size)[1] + sum(r.get("eval_seconds", 0.0) for r in records)


def for_finetune(cfg, run_dir: str | pathlib.Path, best: dict) -> str:
  """The card of a fine-tuned task model: `cfg` a `FinetuneConfig`, `run_dir` the seed's
  directory (`run_seeds`' workdir/seed-N), `best` the epoch exported."""
  squad = cfg.task == "squad2"  # tasks.SQUAD (finetune imports this module)
  head = hf_names.QUESTION_ANSWERING if squad else hf_names.SEQUENCE_CLASSIFICATION
  meta = _pipeline(pathlib.Path(), head)
  meta |= {"base_model": None if cfg.random_init else HUB_IDS.get(cfg.model),
           "language": _language(cfg.model),
           "datasets": ["rajpurkar/squad_v2" if squad else "nyu-mll/glue"]}
  defaults = type(cfg)()
  overrides = [f"--config.{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg)
               if f.name not in ("task", "model", "data", "seed")
               and getattr(cfg, f.name) != getattr(defaults, f.name)]
  command = shlex.join(["python", "-m", "minilm_jax", "finetune", "--task", cfg.task, "--model",
                        cfg.model, "--workdir", str(pathlib.Path(run_dir).parent), "--data", cfg.data,
                        "--seeds", str(cfg.seed), *overrides])
  training = [
      f"- Base model: `{cfg.model}`" + (f" ({cfg.num_layers} bottom layers)" if cfg.num_layers else "")
      + (", re-initialised at random" if cfg.random_init else ""),
      f"- Task: {cfg.task} ({'SQuAD 2.0' if squad else 'GLUE'}); {cfg.epochs} epochs, batch "
      f"{cfg.batch_size}, peak learning rate {cfg.learning_rate}, seed {cfg.seed}",
      f"- Exported epoch {best['epoch']}: training loss {best['train_loss']:.4f}, dev score "
      f"{best['score']:.4f}",
      f"- Hardware: {workdir_lib.devices()}; wall time {_duration(_finetune_seconds(run_dir, cfg.batch_size))}",
  ]
  return _card(meta, f"{cfg.model} fine-tuned on {cfg.task} (minilm_jax)", {
      "Training": training, "Reproduce": ["```bash", command, "```"],
      "Usage": _usage(meta["library_name"], head)})
