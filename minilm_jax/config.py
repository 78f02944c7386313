"""The run's configuration: `DistillConfig`, the papers' recipe (`paper_config`), the checks of
its values alone (`check_config`, made before anything is written) and the student's shape.

`experiments/configs/*.py` return a `DistillConfig`; every field can be overridden on the command line
as `--config.<field>=<value>`.
"""

import dataclasses
import difflib
import math

import jax

from minilm_jax import losses, student_init
from minilm_jax import model as model_lib

OBJECTIVES = ("distill", "mlm")


@dataclasses.dataclass
class DistillConfig:
  """Everything a distillation run depends on; `experiments/configs/*.py` return one.

  Against the papers' recipe (MiniLM / MiniLMv2: AdamW b1 0.9, b2 0.999, eps 1e-6, weight
  decay 0.01, peak lr 5e-4 .. 6e-4 at batch 256 .. 1024 after 4k warmup steps of 400k,
  linear decay): the optimizer settings are the papers'; the defaults of the schedule and
  batch (lr 3e-4, 100 warmup steps, batch 32, 1,000 steps) size a short run on one host,
  and `paper_config` gives the papers' full recipe. Parameters no loss reaches (the last
  student layer past its q/k/v, the pooler) are not decayed: see `optimizer.untrained_mask`.

  Dropout: the student trains with hidden dropout `student_dropout` = 0.1 and attention-
  probability dropout `student_attention_dropout` = 0.1, BERT's values and those of the
  MiniLM students (the packaged all-MiniLM-L6-v2, itself one, says 0.1 for both in its
  config.json); the teacher runs in eval mode (no dropout), so its targets are exact, and
  the student's captured queries, keys and values are taken before any dropout of their
  own layer: dropout regularises only the layers below, as in BERT pre-training.
  """
  # Teacher and what is distilled.
  teacher: str = "all-MiniLM-L6-v2"   # local Hugging Face directory or packaged teacher name
  teacher_layer: int = 0              # 1-based teacher layer distilled from; 0 = last layer
  version: str = "v1"                 # "v1": attention transfer + value relation; "v2": Q-Q, K-K, V-V relations
  relation_heads: int = 48            # R: MiniLMv2 relation heads (48 base-size, 64 large teachers)
  loss_terms: tuple[str, ...] | None = None  # terms of losses.TERMS[version]; None = the paper's
  internals_loss: str = ""            # an InternalsLoss "module:function" / "file.py:function"; "" = v1/v2
  loss_teacher_layers: tuple[int, ...] = ()  # 1-based teacher layers internals_loss gets; () = teacher_layer
  loss_student_layers: tuple[int, ...] = ()  # 1-based student layers internals_loss gets; () = the last
  teacher_assistant: str = "auto"     # MiniLM Sec. 3.3: "auto" (if M <= L/2 and D' <= D/2), "on", "off"
  assistant_steps: int = 0            # optimizer steps of the teacher-assistant stage; 0 = max_steps
  objective: str = "distill"          # "distill" (MiniLM) or "mlm" (BERT masked LM from scratch: the baseline)
  # Student (vocabulary, positions and model type follow the teacher).
  student_layers: int = 3             # L
  student_hidden: int = 384           # D
  student_heads: int = 12             # N (v1 needs the teacher's head count)
  student_intermediate: int = 0       # F; 0 = 4 * D
  student_init: str = "random"        # "random", "spaced" or 1-based teacher layers "2,4,6" (student_init.py)
  student_dropout: float = 0.1        # hidden dropout (embeddings, sublayer outputs) during distillation
  student_attention_dropout: float = 0.1  # dropout on the student's attention probabilities (BERT: 0.1)
  fused_attention_dropout: bool = False  # GPU: that dropout fused in cuDNN (faster; its masks do not resume exactly)
  compute_dtype: str = "auto"         # "auto" = bfloat16 on GPU/TPU, float32 on CPU
  dropout_prng: str = "auto"          # dropout keys' jax.random impl; "auto" = rbg on a GPU, threefry2x32 on CPU/TPU
  remat: str = "auto"                 # "feed-forward": the student's backward recomputes its F-wide activations
                                      # (+1 up-projection: ~3% FLOPs); "none"; "auto" = feed-forward on a TPU
  # Data.
  corpus: str = "demo"                # "demo", text files/globs, or "tfds:NAME[/CONFIG][:SPLIT]"
  data_dir: str = ""                  # TFDS data_dir for tfds: corpora
  text_feature: str = "text"          # the TFDS dataset's text feature
  doc_per_line: bool = False          # text files: a document per line (default: per blank-line block)
  doc_per_file: bool = False          # text files: a document per file (books, articles)
  two_segments: bool = False          # pack [CLS] A [SEP] B [SEP] with token types 0 / 1
  max_seq_len: int = 128              # tokens per example, [CLS] and [SEP] included
  data_workers: int = 0               # grain worker processes (0 = in the main process)
  heldout_documents: int = 0          # whole documents kept out of training (drawn by seed): held out
  # Optimisation (paper: peak 3e-4 / 5e-4, 4k warmup, 400k steps, batch 1024).
  global_batch_size: int = 32         # examples per optimizer step, over all devices and hosts
  grad_accum_steps: int = 1           # micro-batches per step (global batch / this per pass)
  max_steps: int = 1000               # optimizer steps
  learning_rate: float = 3e-4         # peak of linear warmup then linear decay to 0
  warmup_steps: int = 100             # linear warmup steps
  weight_decay: float = 0.01          # AdamW decay, not applied to biases and LayerNorm
  adam_b1: float = 0.9
  adam_b2: float = 0.999
  adam_eps: float = 1e-6
  clip_grad_norm: float = 1.0         # global-norm clipping; 0 = off
  seed: int = 0                       # student init, dropout and data order
  # Bookkeeping.
  log_every: int = 10                 # steps between metric records
  eval_every: int = 0                 # steps between held-out evaluations (and one at the end); 0 = none
  checkpoint_every: int = 200         # steps between checkpoints (and one at the end)
  keep_checkpoints: int = 3           # checkpoints kept
  export_hf: bool = True              # write the student as a Hugging Face directory at the end

  def resolved_prng(self, platform: str | None = None) -> str:
    """`dropout_prng` on `platform`, the one the step is compiled for (default: this host's)."""
    if self.dropout_prng != "auto":
      return self.dropout_prng
    return "rbg" if (platform or jax.default_backend()) == "gpu" else "threefry2x32"

  def resolved_remat(self, platform: str | None = None) -> str:
    """`remat` on `platform`, the one the step is compiled for (default: this host's): on a TPU
    the feed-forward's [B, T, F] activations are recomputed rather than kept, which cuts
    XLA's bytes of BERT-base -> L6-H384 at 64 x 128 on v5e by 10% (experiments/results/tpu-compile.md)."""
    if self.remat != "auto":
      return self.remat
    return "feed-forward" if (platform or jax.default_backend()) == "tpu" else "none"

  def resolved_dtype(self, platform: str | None = None) -> str:
    """`compute_dtype` on `platform`, the one the step is compiled for (default: this host's)."""
    if self.compute_dtype != "auto":
      return self.compute_dtype
    return "float32" if (platform or jax.default_backend()) == "cpu" else "bfloat16"


COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
REMATS = ("auto", "none", "feed-forward")
PAPER_STUDENTS = ("L6-H768", "L12-H384", "L6-H384", "L4-H384", "L3-H384")


def check_choice(what: str, value: str, choices) -> None:
  """Raises naming the closest valid choice (difflib) when `value` is not one of `choices`."""
  if value not in choices:
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ValueError(f"{what} {value!r} is unknown: {hint}use one of {', '.join(map(repr, choices))}")


def check_finite(cfg) -> None:
  """Every float field of a config dataclass is a number: inf or NaN (`--config.learning_rate=inf`)
  would pass the range checks below and surface only as a diverged step."""
  for field in dataclasses.fields(cfg):
    value = getattr(cfg, field.name)
    if isinstance(value, float) and not math.isfinite(value):
      raise ValueError(f"{field.name}={value} is not a finite number: pass --config.{field.name}="
                       f"<number> (default {field.default})")


def check_compute_dtype(cfg: DistillConfig, platform: str | None = None) -> None:
  """`compute_dtype` names a dtype that `platform` (the one the step is compiled for; default:
  this host's) computes in: XLA's CPU backend refuses float16 dot products."""
  check_choice("compute_dtype", cfg.compute_dtype, COMPUTE_DTYPES)
  platform = platform or jax.default_backend()
  if cfg.resolved_dtype(platform) == "float16" and platform == "cpu":
    raise ValueError("compute_dtype='float16' does not run on CPU (XLA's CPU backend refuses float16 "
                     "dot products): use --config.compute_dtype=bfloat16 or float32 ('auto' picks "
                     "float32 on CPU), or run on a GPU")


def check_config(cfg: DistillConfig, platform: str | None = None) -> None:
  """Field values a run cannot start with, checked before anything is written; `platform` is
  the one the step is compiled for (default: this host's)."""
  check_finite(cfg)
  check_compute_dtype(cfg, platform)
  check_choice("version", cfg.version, tuple(losses.TERMS))
  check_choice("objective", cfg.objective, OBJECTIVES)
  positive = ("student_layers", "student_hidden", "student_heads", "max_seq_len",
              "global_batch_size", "grad_accum_steps", "max_steps", "log_every", "checkpoint_every",
              "keep_checkpoints")
  for name in positive:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      raise ValueError(f"{name}={value!r} must be a positive integer: pass --config.{name}=N, N >= 1")
  for name in ("teacher_layer", "student_intermediate", "warmup_steps", "data_workers",
               "heldout_documents", "eval_every"):
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      raise ValueError(f"{name}={value!r} must be an integer >= 0")
  if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or not 0 <= cfg.seed < 2**32:
    raise ValueError(f"seed={cfg.seed!r} must be an integer in [0, 2**32)")
  for name in ("student_dropout", "student_attention_dropout"):
    if not 0 <= getattr(cfg, name) < 1:
      raise ValueError(f"{name}={getattr(cfg, name)} must be in [0, 1)")
  try:
    jax.random.key(0, impl=cfg.resolved_prng(platform))
  except (ValueError, TypeError) as e:
    raise ValueError(f"dropout_prng {cfg.dropout_prng!r} is not a jax.random implementation ({e}): "
                     "use 'auto', 'threefry2x32' or 'rbg'") from e
  check_choice("remat", cfg.remat, REMATS)
  if cfg.teacher_assistant not in ("auto", "on", "off"):
    raise ValueError(f"teacher_assistant {cfg.teacher_assistant!r} is unknown: use 'auto' (MiniLM's "
                     "rule: student depth and width at most half the teacher's), 'on' or 'off'")
  if cfg.assistant_steps < 0:
    raise ValueError(f"assistant_steps {cfg.assistant_steps} is negative: use 0 (= max_steps) or more")
  stages = {"max_steps": cfg.max_steps}
  if cfg.assistant_steps and cfg.teacher_assistant != "off":  # the teacher assistant's own run
    stages["assistant_steps"] = cfg.assistant_steps
  for name, steps in stages.items():
    if cfg.warmup_steps > steps:
      raise ValueError(f"warmup_steps={cfg.warmup_steps} exceeds {name}={steps}: the learning rate "
                       f"would never reach its peak; pass --config.warmup_steps=N with N <= {name}")
  chosen_init = student_init.parse(cfg.student_init)  # a malformed choice raises here
  if chosen_init != student_init.RANDOM and cfg.objective == "mlm":
    raise ValueError(f"student_init={cfg.student_init!r} copies teacher layers, but objective='mlm' "
                     "is the masked-LM baseline trained from scratch: use student_init='random'")
  if cfg.eval_every and not cfg.heldout_documents:
    raise ValueError(f"eval_every={cfg.eval_every} needs a held-out set: set "
                     "--config.heldout_documents=N (whole documents kept out of training)")
  if cfg.eval_every and cfg.objective == "mlm":
    raise ValueError(f"eval_every={cfg.eval_every} with objective='mlm': the held-out evaluation "
                     "needs a loss without randomness, and the masked LM draws its masks at "
                     "random: use eval_every=0")
  if not cfg.learning_rate > 0 or cfg.clip_grad_norm < 0:
    raise ValueError(f"learning_rate={cfg.learning_rate} must be > 0 and clip_grad_norm="
                     f"{cfg.clip_grad_norm} >= 0 (0 = no clipping)")


def student_model(cfg: DistillConfig, teacher: model_lib.ModelConfig) -> model_lib.ModelConfig:
  """The student's shape: the teacher's vocabulary, positions and model type; the config's
  layers, width, heads, F and dropouts; a pooler, as every exported student has."""
  return teacher.replace(
      num_layers=cfg.student_layers, hidden_size=cfg.student_hidden, num_heads=cfg.student_heads,
      intermediate_size=cfg.student_intermediate or 4 * cfg.student_hidden,
      hidden_dropout=cfg.student_dropout, attention_dropout=cfg.student_attention_dropout, use_pooler=True)


def paper_config(*, teacher: str, version: str, student: str, learning_rate: float,
                 teacher_layer: int = 0, relation_heads: int = 48) -> DistillConfig:
  """The papers' recipe for a student "L<layers>-H<hidden>" (12 heads, F = 4D).

  MiniLM / MiniLMv2: English Wikipedia + BookCorpus, sequences of 512, batch 1024,
  400k steps, 4k warmup then linear decay, AdamW (0.9, 0.999), weight decay 0.01.
  """
  check_choice("student", student, PAPER_STUDENTS)
  layers, hidden = (int(x[1:]) for x in student.split("-"))
  return DistillConfig(
      teacher=teacher, version=version, teacher_layer=teacher_layer,
      relation_heads=relation_heads, student_layers=layers, student_hidden=hidden,
      student_heads=12, max_seq_len=512, global_batch_size=1024, max_steps=400_000,
      warmup_steps=4_000, learning_rate=learning_rate, log_every=100, checkpoint_every=5_000)
