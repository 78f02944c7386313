"""The distillation step: a run's static setup and one pure, jit-compiled update.

    (state, teacher_params, batch) -> (state, metrics)

The teacher is frozen, in eval mode, truncated at the layer it is distilled from and
stored in its compute dtype; the student trains with dropout and float32 master weights.
The step is data-parallel over a `('data',)` mesh (see `sharding.py`): the batch is
sharded, everything else replicated, the student state donated. Gradient accumulation
runs micro-batches in a `lax.scan` inside the step (one micro-batch needs no loop) and
weights each by its real tokens, so any number of micro-batches gives the big batch's
exact loss and gradient. On a GPU dropout masks come from "rbg" keys
(`dropout_prng="auto"`): XLA's RngBitGenerator (Philox there) where the default threefry
spends one 20-round hash per random word. Per the `jax.random` docs its bits are
deterministic per key on one platform and identical across shardings, so exact resume and
the one-device = N-device equality hold (they differ between CPU, GPU and TPU), but each
device generates the whole global array rather than its shard. On a TPU slice that costs
more than the hashes: compiled for v5e:2x2 the BERT-base step at 64 x 128 per chip moves 2.0
GB more with rbg than with threefry, whose partitionable bits each chip draws for its shard
alone (`experiments/results/tpu-compile.md`), and the waste grows with the slice. On a CPU
XLA's RngBitGenerator is slower than threefry (`experiments/results/dropout-prng-cpu.md`). So
"auto" is threefry on a CPU or TPU. jax.random's own Philox is cheaper still, but on jax 0.10
a sharded step using it does not compile (its `mulhi` fails the MHLO -> StableHLO conversion).
"""

import dataclasses
import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from minilm_jax import internals_loss, loops, sharding, student_init
from minilm_jax import model as model_lib
from minilm_jax import optimizer as optimizer_lib
from minilm_jax.config import DistillConfig, check_config, student_model


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
  relation_heads: int                # R of the built-in loss; 0 with internals_loss
  loss: internals_loss.InternalsLoss  # the built-in MiniLM / MiniLMv2 loss, or `internals_loss`
  teacher_layers: tuple[int, ...]    # 0-based teacher layers whose internals the loss gets
  student_layers: tuple[int, ...]    # 0-based student layers whose internals the loss gets
  return_logits: bool                # capture attention logits too (custom losses)
  dropout_prng: str = "threefry2x32"  # jax.random implementation of the step's dropout keys
  student_init: tuple[int, ...] = ()  # 0-based teacher layers the student starts from; () = fresh


def make_setup(cfg: DistillConfig, teacher_full: model_lib.ModelConfig,
               platform: str | None = None) -> Setup:
  """Checks the run's configuration against the teacher, before any compute.

  Every "auto" (compute dtype, dropout PRNG, remat) is resolved for `platform`, the platform the
  step is compiled for: this host's by default, "tpu" when compiling for a pod slice from
  a machine without one (`minilm_jax.aot`).
  """
  check_config(cfg, platform)
  layer = cfg.teacher_layer or teacher_full.num_layers
  if not 1 <= layer <= teacher_full.num_layers:
    raise ValueError(f"teacher_layer {cfg.teacher_layer} is out of range: the teacher has "
                     f"{teacher_full.num_layers} layers (use 1..{teacher_full.num_layers}, 0 = last)")
  teacher_layers = internals_loss.layer_indices(cfg.loss_teacher_layers, layer, teacher_full.num_layers,
                                                "teacher")
  student_layers = internals_loss.layer_indices(cfg.loss_student_layers, cfg.student_layers,
                                                cfg.student_layers, "student")
  dtype = cfg.resolved_dtype(platform)
  student = student_model(cfg, teacher_full).replace(
      cudnn_dropout=cfg.fused_attention_dropout, dtype=dtype,
      remat_feed_forward=cfg.resolved_remat(platform) == "feed-forward")
  teacher = teacher_full.replace(num_layers=max(teacher_layers) + 1, use_pooler=False, dtype=dtype)
  # Masked LM distils nothing: no loss of internals, any head count.
  loss, relation_heads = ((None, student.num_heads) if cfg.objective == "mlm" else
                          internals_loss.choose(cfg, teacher, student))
  teacher.check_max_seq_len(cfg.max_seq_len, "the teacher")  # the student shares its table
  return Setup(teacher, student, relation_heads, loss, teacher_layers, student_layers,
               return_logits=bool(cfg.internals_loss), dropout_prng=cfg.resolved_prng(platform),
               student_init=student_init.teacher_layers(cfg.student_init, teacher_full, student))


def truncate_teacher(setup: Setup, params: nnx.State) -> nnx.State:
  """The teacher's parameters up to the distilled layer, cast to the compute dtype."""
  pure = student_init.bottom_layers(params.to_pure_dict(), setup.teacher.num_layers)
  pure.pop("pooler", None)
  state = model_lib.abstract_params(setup.teacher)
  nnx.replace_by_pure_dict(state, pure)
  return jax.tree.map(lambda x: jnp.asarray(x, setup.teacher.dtype), state)


@dataclasses.dataclass(frozen=True)
class Objective:
  """What the step minimises: the job picks it (`objective.choose`), the step only runs it."""
  init_params: Callable  # (student ModelConfig, seed) -> the student's fresh parameters
  loss: Callable         # (params, teacher_params, batch, dropout_rng) -> (total, terms), one micro-batch
  has_teacher: bool = True  # False: the step gets no teacher parameters ({})


def distillation(setup: Setup) -> Objective:
  """MiniLM's objective: a fresh encoder, `distill_loss` against the teacher."""
  return Objective(model_lib.init_params, functools.partial(distill_loss, setup=setup))


def init_state(cfg: DistillConfig, setup: Setup, optimizer: optax.GradientTransformation,
               objective: Objective | None = None, teacher_params: nnx.State | None = None) -> TrainState:
  """Step 0: the objective's fresh parameters (default: `distillation`), with the teacher layers
  of `setup.student_init` copied in from `teacher_params` (the whole teacher, float32), and
  their optimizer state."""
  params = (objective or distillation(setup)).init_params(setup.student, cfg.seed)
  if setup.student_init:
    params = student_init.from_teacher(params, teacher_params, setup.student_init)
  rng = jax.random.key_data(jax.random.fold_in(jax.random.key(cfg.seed), 1))
  return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), rng)


def start_state(cfg: DistillConfig, setup: Setup, optimizer: optax.GradientTransformation, mesh,
                objective: Objective, teacher_params: nnx.State,
                restore: Callable[[TrainState], TrainState] | None = None) -> TrainState:
  """A run's first state, replicated on `mesh`: step 0 (`init_state`), or what `restore` (a
  resumed run's checkpoint) fills into step 0's shapes."""
  def step_zero():
    return init_state(cfg, setup, optimizer, objective, teacher_params)
  if restore is not None:
    return restore(_placed(jax.eval_shape(step_zero), sharding.replicated(mesh)))
  return jax.device_put(step_zero(), sharding.replicated(mesh))


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


def make_train_step(setup: Setup, optimizer: optax.GradientTransformation, mesh,
                    micro_batches: int = 1, loss_fn: Callable | None = None) -> Callable:
  """The jit-compiled step `(state, teacher_params, batch) -> (state, metrics)`.

  `loss_fn(params, teacher_params, batch, dropout_rng) -> (total, terms)` is the loss of
  one micro-batch (default: `distill_loss`), a mean over some count of its tokens:
  `terms["tokens"]` when it returns one (masked LM: the predicted tokens), else the
  real tokens of `attention_mask` (distillation). The step weights each micro-batch by
  that count, so the accumulated loss and gradient are the whole batch's exact mean.
  The step is traced under `mesh`'s abstract mesh, so every layer picks its attention route
  for the platform it is compiled for (`sharding.target_platform`).
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


def make_step(cfg: DistillConfig, setup: Setup, mesh, objective: Objective | None = None):
  """What a distillation run compiles: (schedule, optimizer, jitted step).

  `distill` trains with it and `minilm_jax.aot` compiles it for a TPU slice, so both see
  the same step. `objective` defaults to `distillation(setup)`.
  """
  schedule = optimizer_lib.warmup_linear_decay(cfg.learning_rate, cfg.warmup_steps, cfg.max_steps)
  optimizer = optimizer_lib.for_distillation(cfg, schedule)
  step = make_train_step(setup, optimizer, mesh, cfg.grad_accum_steps,
                         (objective or distillation(setup)).loss)
  return schedule, optimizer, step


BATCH_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def abstract_inputs(cfg: DistillConfig, setup: Setup, optimizer: optax.GradientTransformation, mesh,
                    objective: Objective | None = None):
  """The step's arguments (state, teacher parameters, batch) as shapes placed on `mesh`, with
  no teacher weights: what ahead-of-time compilation (`aot`) lowers with."""
  objective = objective or distillation(setup)
  replicated = sharding.replicated(mesh)
  fresh = dataclasses.replace(setup, student_init=())  # the same shapes, whatever the init
  state = _placed(jax.eval_shape(lambda: init_state(cfg, fresh, optimizer, objective)), replicated)
  teacher = {} if not objective.has_teacher else _placed(
      jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, setup.teacher.dtype),
                   model_lib.abstract_params(setup.teacher)), replicated)
  shape = jax.ShapeDtypeStruct((cfg.global_batch_size, cfg.max_seq_len), jnp.int32,
                               sharding=sharding.batch_sharded(mesh))
  return state, teacher, {k: shape for k in BATCH_KEYS}


def _placed(tree, where):
  """`tree`'s shapes and dtypes, placed by the sharding `where`."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=where), tree)

