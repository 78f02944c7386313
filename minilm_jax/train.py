"""The distillation step: the run's config, its static setup and one pure, jit-compiled update.

    (state, teacher_params, batch) -> (state, metrics)

The teacher is frozen, in eval mode, truncated at the layer it is distilled from and
stored in its compute dtype; the student trains with dropout and float32 master weights.
The step is data-parallel over a `('data',)` mesh (see `sharding.py`): the batch is
sharded, everything else replicated, the student state donated. Gradient accumulation
runs micro-batches in a `lax.scan` inside the step (one micro-batch needs no loop) and
weights each by its real tokens, so any number of micro-batches gives the big batch's
exact loss and gradient. On a GPU or TPU dropout masks come from "rbg" keys
(`dropout_prng="auto"`): XLA's RngBitGenerator (Philox on a GPU) where the default threefry
spends one 20-round hash per random word. Per the `jax.random` docs its bits are
deterministic per key on one platform and identical across shardings, so exact resume and
the one-device = N-device equality hold (they differ between CPU, GPU and TPU, and each
device generates the whole array rather than its shard). On a CPU XLA's RngBitGenerator is
slower than threefry (`experiments/results/dropout-prng-cpu.md`), so "auto" keeps threefry
there. jax.random's own Philox is cheaper still, but on jax 0.10 a sharded step using it does
not compile (its `mulhi` fails the MHLO -> StableHLO conversion).
"""

import dataclasses
import difflib
import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from minilm_jax import internals_loss, loops, losses, mlm, sharding
from minilm_jax import optimizer as optimizer_lib
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
  num_relation_heads: int = 48        # MiniLMv2 relation heads (48 base-size, 64 large teachers)
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
  student_dropout: float = 0.1        # hidden dropout (embeddings, sublayer outputs) during distillation
  student_attention_dropout: float = 0.1  # dropout on the student's attention probabilities (BERT: 0.1)
  fused_attention_dropout: bool = False  # GPU: that dropout fused in cuDNN (faster; its masks do not resume exactly)
  compute_dtype: str = "auto"         # "auto" = bfloat16 on GPU/TPU, float32 on CPU
  dropout_prng: str = "auto"          # dropout keys' jax.random impl; "auto" = rbg on GPU/TPU, threefry2x32 on CPU
  # Data.
  corpus: str = "demo"                # "demo", text files/globs, or "tfds:NAME[/CONFIG][:SPLIT]"
  data_dir: str = ""                  # TFDS data_dir for tfds: corpora
  text_feature: str = "text"          # the TFDS dataset's text feature
  doc_per_line: bool = False          # text files: a document per line (default: per blank-line block)
  doc_per_file: bool = False          # text files: a document per file (books, articles)
  two_segments: bool = False          # pack [CLS] A [SEP] B [SEP] with token types 0 / 1
  max_seq_len: int = 128              # tokens per example, [CLS] and [SEP] included
  data_workers: int = 0               # grain worker processes (0 = in the main process)
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
  checkpoint_every: int = 200         # steps between checkpoints (and one at the end)
  keep_checkpoints: int = 3           # checkpoints kept
  export_hf: bool = True              # write the student as a Hugging Face directory at the end

  def resolved_prng(self, platform: str | None = None) -> str:
    """`dropout_prng` on `platform`, the one the step is compiled for (default: this host's)."""
    if self.dropout_prng != "auto":
      return self.dropout_prng
    return "threefry2x32" if (platform or jax.default_backend()) == "cpu" else "rbg"

  def resolved_dtype(self, platform: str | None = None) -> str:
    """`compute_dtype` on `platform`, the one the step is compiled for (default: this host's)."""
    if self.compute_dtype != "auto":
      return self.compute_dtype
    return "float32" if (platform or jax.default_backend()) == "cpu" else "bfloat16"


COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
PAPER_STUDENTS = ("L6-H768", "L12-H384", "L6-H384", "L4-H384", "L3-H384")


def check_choice(what: str, value: str, choices) -> None:
  """Raises naming the closest valid choice (difflib) when `value` is not one of `choices`."""
  if value not in choices:
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ValueError(f"{what} {value!r} is unknown: {hint}use one of {', '.join(map(repr, choices))}")


def check_config(cfg: DistillConfig) -> None:
  """Field values a run cannot start with, checked before anything is written."""
  check_choice("compute_dtype", cfg.compute_dtype, COMPUTE_DTYPES)
  check_choice("version", cfg.version, tuple(losses.TERMS))
  check_choice("objective", cfg.objective, OBJECTIVES)
  positive = ("student_layers", "student_hidden", "student_heads", "max_seq_len",
              "global_batch_size", "grad_accum_steps", "max_steps", "log_every", "checkpoint_every",
              "keep_checkpoints")
  for name in positive:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      raise ValueError(f"{name}={value!r} must be a positive integer: pass --config.{name}=N, N >= 1")
  for name in ("teacher_layer", "student_intermediate", "warmup_steps", "data_workers"):
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      raise ValueError(f"{name}={value!r} must be an integer >= 0")
  if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or not 0 <= cfg.seed < 2**32:
    raise ValueError(f"seed={cfg.seed!r} must be an integer in [0, 2**32)")
  for name in ("student_dropout", "student_attention_dropout"):
    if not 0 <= getattr(cfg, name) < 1:
      raise ValueError(f"{name}={getattr(cfg, name)} must be in [0, 1)")
  try:
    jax.random.key(0, impl=cfg.resolved_prng())
  except (ValueError, TypeError) as e:
    raise ValueError(f"dropout_prng {cfg.dropout_prng!r} is not a jax.random implementation ({e}): "
                     "use 'auto', 'threefry2x32' or 'rbg'") from e
  if not cfg.learning_rate > 0 or cfg.clip_grad_norm < 0:
    raise ValueError(f"learning_rate={cfg.learning_rate} must be > 0 and clip_grad_norm="
                     f"{cfg.clip_grad_norm} >= 0 (0 = no clipping)")


def paper_config(*, teacher: str, version: str, student: str, learning_rate: float,
                 teacher_layer: int = 0, num_relation_heads: int = 48) -> DistillConfig:
  """The papers' recipe for a student "L<layers>-H<hidden>" (12 heads, F = 4D).

  MiniLM / MiniLMv2: English Wikipedia + BookCorpus, sequences of 512, batch 1024,
  400k steps, 4k warmup then linear decay, AdamW (0.9, 0.999), weight decay 0.01.
  """
  check_choice("student", student, PAPER_STUDENTS)
  layers, hidden = (int(x[1:]) for x in student.split("-"))
  return DistillConfig(
      teacher=teacher, version=version, teacher_layer=teacher_layer,
      num_relation_heads=num_relation_heads, student_layers=layers, student_hidden=hidden,
      student_heads=12, max_seq_len=512, global_batch_size=1024, max_steps=400_000,
      warmup_steps=4_000, learning_rate=learning_rate, log_every=100, checkpoint_every=5_000)


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # int32 scalar: optimizer steps taken
  params: nnx.State        # student parameters, float32
  opt_state: Any           # optax state
  rng: jax.Array           # threefry key data; step t's dropout key: `dropout_key(rng, t, impl)`


@dataclasses.dataclass(frozen=True)
class Setup:
  """The static half of a run: model configs and which layers meet in which loss."""
  teacher: model_lib.ModelConfig     # truncated at the deepest distilled layer, no pooler
  student: model_lib.ModelConfig
  version: str
  relation_heads: int                # heads of the built-in loss; 0 with internals_loss
  loss: internals_loss.InternalsLoss  # the built-in MiniLM / MiniLMv2 loss, or `internals_loss`
  teacher_layers: tuple[int, ...]    # 0-based teacher layers whose internals the loss gets
  student_layers: tuple[int, ...]    # 0-based student layers whose internals the loss gets
  return_logits: bool                # capture attention logits too (custom losses)
  dropout_prng: str = "threefry2x32"  # jax.random implementation of the step's dropout keys


def make_setup(cfg: DistillConfig, teacher_full: model_lib.ModelConfig,
               platform: str | None = None) -> Setup:
  """Checks the run's configuration against the teacher, before any compute.

  Every "auto" (compute dtype, dropout PRNG) is resolved for `platform`, the platform the
  step is compiled for: this host's by default, "tpu" when compiling for a pod slice from
  a machine without one (`minilm_jax.aot`).
  """
  check_config(cfg)
  if cfg.teacher_assistant not in ("auto", "on", "off"):
    raise ValueError(f"teacher_assistant {cfg.teacher_assistant!r} is unknown: use 'auto' (MiniLM's "
                     "rule: student depth and width at most half the teacher's), 'on' or 'off'")
  if cfg.assistant_steps < 0:
    raise ValueError(f"assistant_steps {cfg.assistant_steps} is negative: use 0 (= max_steps) or more")
  layer = cfg.teacher_layer or teacher_full.num_layers
  if not 1 <= layer <= teacher_full.num_layers:
    raise ValueError(f"teacher_layer {cfg.teacher_layer} is out of range: the teacher has "
                     f"{teacher_full.num_layers} layers (use 1..{teacher_full.num_layers}, 0 = last)")
  teacher_layers = internals_loss.layer_indices(cfg.loss_teacher_layers, layer, teacher_full.num_layers,
                                                "teacher")
  student_layers = internals_loss.layer_indices(cfg.loss_student_layers, cfg.student_layers,
                                                cfg.student_layers, "student")
  dtype = cfg.resolved_dtype(platform)
  student = teacher_full.replace(
      num_layers=cfg.student_layers, hidden_size=cfg.student_hidden, num_heads=cfg.student_heads,
      intermediate_size=cfg.student_intermediate or 4 * cfg.student_hidden,
      hidden_dropout=cfg.student_dropout, attention_dropout=cfg.student_attention_dropout, use_pooler=True,
      cudnn_dropout=cfg.fused_attention_dropout, dtype=dtype)
  teacher = teacher_full.replace(num_layers=max(teacher_layers) + 1, use_pooler=False, dtype=dtype)
  # Masked LM distils nothing: no loss of internals, any head count.
  loss, heads = (None, student.num_heads) if cfg.objective == "mlm" else internals_loss.choose(cfg, teacher, student)
  teacher.check_max_seq_len(cfg.max_seq_len, "the teacher")  # the student shares its table
  return Setup(teacher, student, cfg.version, heads, loss, teacher_layers, student_layers,
               return_logits=bool(cfg.internals_loss), dropout_prng=cfg.resolved_prng(platform))


def truncate_teacher(setup: Setup, params: nnx.State) -> nnx.State:
  """The teacher's parameters up to the distilled layer, cast to the compute dtype."""
  pure = model_lib.bottom_layers(params.to_pure_dict(), setup.teacher.num_layers)
  pure.pop("pooler", None)
  state = model_lib.abstract_params(setup.teacher)
  nnx.replace_by_pure_dict(state, pure)
  return jax.tree.map(lambda x: jnp.asarray(x, setup.teacher.dtype), state)


def init_state(cfg: DistillConfig, setup: Setup, optimizer: optax.GradientTransformation) -> TrainState:
  init = mlm.init_params if cfg.objective == "mlm" else model_lib.init_params
  params = init(setup.student, cfg.seed)
  rng = jax.random.key_data(jax.random.fold_in(jax.random.key(cfg.seed), 1))
  return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), rng)


def dropout_key(rng: jax.Array, step: jax.Array, impl: str) -> jax.Array:
  """Step `step`'s dropout key of implementation `impl`: fold_in(threefry key `rng`, step)
  itself, or a key whose bits are drawn from it, so that the checkpointed state keeps
  threefry key data whatever the implementation."""
  step_key = jax.random.fold_in(jax.random.wrap_key_data(rng), step)
  if impl == "threefry2x32":
    return step_key
  shape = jax.random.key_data(jax.random.key(0, impl=impl)).shape
  return jax.random.wrap_key_data(jax.random.bits(step_key, shape, jnp.uint32), impl=impl)


def distill_loss(params, teacher_params, batch, dropout_rng, setup: Setup):
  """Student loss on one (micro-)batch: (total, per-term dict), means over real tokens."""
  args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
  teacher = model_lib.apply(setup.teacher, teacher_params, *args, capture=setup.teacher_layers,
                            return_logits=setup.return_logits)
  teacher = jax.tree.map(jax.lax.stop_gradient, tuple(teacher.internals[i] for i in setup.teacher_layers))
  student = model_lib.apply(setup.student, params, *args, dropout_rng=dropout_rng,
                            capture=setup.student_layers, return_logits=setup.return_logits)
  terms = setup.loss(teacher, tuple(student.internals[i] for i in setup.student_layers),
                     batch["attention_mask"])
  if not isinstance(terms, dict) or "total" not in terms:
    raise ValueError(f"the loss {setup.loss} returned {type(terms).__name__} "
                     f"{list(terms) if isinstance(terms, dict) else ''}: an internals loss returns "
                     "a dict of scalar terms with a 'total' (the value minimised)")
  if bad := [k for k, v in terms.items() if jnp.shape(v) != ()]:
    raise ValueError(f"the loss {setup.loss} returned non-scalar terms {bad}: average them to scalars")
  return terms["total"], terms


def make_loss_fn(cfg: DistillConfig, setup: Setup, tokenizer_dir) -> Callable:
  """The per-micro-batch loss of `cfg.objective`, as `make_train_step` takes it."""
  if cfg.objective == "mlm":
    return mlm.make_loss(setup.student, tokenizer_dir)
  return functools.partial(distill_loss, setup=setup)


def make_train_step(setup: Setup, optimizer: optax.GradientTransformation, mesh,
                    micro_batches: int = 1, loss_fn: Callable | None = None) -> Callable:
  """The jit-compiled step `(state, teacher_params, batch) -> (state, metrics)`.

  `loss_fn(params, teacher_params, batch, dropout_rng) -> (total, terms)` is the loss of
  one micro-batch (default: `distill_loss`), a mean over some count of its tokens:
  `terms["tokens"]` when it returns one (masked LM: the predicted tokens), else the
  real tokens of `attention_mask` (distillation). The step weights each micro-batch by
  that count, so the accumulated loss and gradient are the whole batch's exact mean.
  The step is traced under `mesh`'s abstract mesh, so every layer picks its attention route
  for the platform it is compiled for (`attention.target_platform`).
  """
  loss_fn = loss_fn or functools.partial(distill_loss, setup=setup)

  def split_micro(x):  # [B, ...] -> [A, B/A, ...]; micro-batch a takes rows a, A+a, ... of every device
    x = x.reshape(x.shape[0] // micro_batches, micro_batches, *x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, sharding.DATA_AXIS)))

  def step(state: TrainState, teacher_params, batch):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # attention routes see the target
      return update(state, teacher_params, batch)

  def update(state: TrainState, teacher_params, batch):
    key = dropout_key(state.rng, state.step, setup.dropout_prng)

    def grads_of(micro, index):  # token-weighted sums, so micro-batches add up exactly
      def weighted(p):
        total, terms = loss_fn(p, teacher_params, micro, jax.random.fold_in(key, index))
        terms = dict(terms)
        tokens = terms.pop("tokens", jnp.sum(micro["attention_mask"])).astype(jnp.float32)
        tokens = jax.lax.stop_gradient(tokens)
        return total * tokens, ({k: v * tokens for k, v in terms.items()}, tokens)
      (_, (terms, tokens)), grads = jax.value_and_grad(weighted, has_aux=True)(state.params)
      return grads, terms, tokens, jnp.sum(micro["attention_mask"]).astype(jnp.float32)

    if micro_batches == 1:
      grads, terms, tokens, real_tokens = grads_of(batch, 0)
    else:
      micro = jax.tree.map(split_micro, batch)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                           jax.eval_shape(grads_of, jax.tree.map(lambda x: x[0], micro), 0))
      (grads, terms, tokens, real_tokens), _ = loops.scan(
          lambda carry, inputs: (jax.tree.map(jnp.add, carry, grads_of(*inputs)), None),
          zeros, (micro, jnp.arange(micro_batches)))
    tokens = jnp.maximum(tokens, 1.0)  # the count the loss means are over
    grads = jax.tree.map(lambda g: g / tokens, grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {f"loss/{k}": v / tokens for k, v in terms.items()} | {
        "grad_norm": optax.global_norm(grads), "tokens": real_tokens}
    return TrainState(state.step + 1, params, opt_state, state.rng), metrics

  replicated, batched = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  return jax.jit(step, in_shardings=(replicated, replicated, batched),
                 out_shardings=(replicated, replicated), donate_argnums=(0,))


def make_step(cfg: DistillConfig, setup: Setup, mesh, tokenizer_dir=None):
  """What a distillation run compiles: (schedule, optimizer, jitted step).

  `distill` trains with it and `minilm_jax.aot` compiles it for a TPU slice, so both see
  the same step. `tokenizer_dir` is read only by the masked-LM objective.
  """
  schedule = optimizer_lib.warmup_linear_decay(cfg.learning_rate, cfg.warmup_steps, cfg.max_steps)
  optimizer = optimizer_lib.for_distillation(cfg, schedule)
  step = make_train_step(setup, optimizer, mesh, cfg.grad_accum_steps,
                         make_loss_fn(cfg, setup, tokenizer_dir))
  return schedule, optimizer, step


BATCH_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def abstract_inputs(cfg: DistillConfig, setup: Setup, optimizer: optax.GradientTransformation, mesh):
  """The step's arguments (state, teacher parameters, batch) as shapes placed on `mesh`:
  what a checkpoint restores into and what ahead-of-time compilation lowers with."""
  def placed(tree, where):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=where), tree)
  replicated = sharding.replicated(mesh)
  state = placed(jax.eval_shape(lambda: init_state(cfg, setup, optimizer)), replicated)
  teacher = {} if cfg.objective == "mlm" else placed(  # masked LM has no teacher
      jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, setup.teacher.dtype),
                   model_lib.abstract_params(setup.teacher)), replicated)
  shape = jax.ShapeDtypeStruct((cfg.global_batch_size, cfg.max_seq_len), jnp.int32,
                               sharding=sharding.batch_sharded(mesh))
  return state, teacher, {k: shape for k in BATCH_KEYS}

