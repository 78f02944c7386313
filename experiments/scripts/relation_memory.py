"""Temporary memory of the relation loss, direct (`losses.relation_loss`) against blockwise
(`blockwise_relation.blockwise_relation_loss`, what the step trains with), from XLA's
`compiled.memory_analysis()`: compiling is enough, nothing runs, so a CPU answers for
BERT-base shapes.

  python -m experiments.scripts.relation_memory [--full-step] [--out experiments/results]

Rows: the v1 and v2 loss + gradient on the captured q/k/v of a BERT-base teacher (768 wide)
and an L6-H384 student at 256x128 and 64x512 (R = 12 heads for v1, 48 relation heads for v2),
in float32 and bfloat16; `--full-step` adds the whole jit train step of the benchmark's
base-v1 / base-v2 workloads (bf16) at 64x512, the direct loss swapped in for the blockwise one.
Off a GPU the student's attention with dropout keeps its [B, N, T, S] probabilities (cuDNN
fuses them on a GPU), so the step rows include base-v2 with attention dropout 0 too.
"""

import dataclasses
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
from absl import flags

from minilm_jax.benchmark import harness, jax_routes, workloads
from minilm_jax import blockwise_relation, cli_flags, losses, optimizer as optimizer_lib, sharding
from minilm_jax import step as step_lib
from minilm_jax import model as model_lib
from minilm_jax.model import AttentionInternals

RELATIONS = {"direct": losses.relation_loss, "blockwise": blockwise_relation.blockwise_relation_loss}


def loss_memory(version: str, relation, batch: int, seq: int, dtype) -> dict:
  """memory_analysis of jit(value_and_grad(v1/v2 loss)) on captured-layer tensors."""
  heads = 12 if version == "v1" else 48
  internals = lambda d: AttentionInternals(*(jax.ShapeDtypeStruct((batch, seq, d), dtype) for _ in range(3)))
  mask = jax.ShapeDtypeStruct((batch, seq), jnp.int32)

  def loss(student, teacher, mask):
    pairs = ([("query", "key"), ("value", "value")] if version == "v1"
             else [("query", "query"), ("key", "key"), ("value", "value")])
    return sum(relation(getattr(teacher, a), getattr(teacher, b), getattr(student, a), getattr(student, b),
                        mask, heads) for a, b in pairs)
  compiled = jax.jit(jax.value_and_grad(loss)).lower(internals(384), internals(768), mask).compile()
  return _bytes(compiled)


def step_memory(config: str, relation, batch: int, seq: int, attention_dropout: float,
                student_layers: int = 6) -> dict:
  """memory_analysis of the benchmark's JAX train step (bf16), with `relation` in the losses."""
  original = losses.blockwise_relation_loss
  losses.blockwise_relation_loss = relation  # what minilm_loss calls
  try:
    w = workloads.workload("gpu", config)
    w = dataclasses.replace(w, attention_dropout=attention_dropout,
                            student=dataclasses.replace(w.student, layers=student_layers))
    cfg, setup, _ = jax_routes.jax_setup(w, batch, seq)
    optimizer = optimizer_lib.for_distillation(cfg, cfg.learning_rate)
    abstract = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    state = abstract(jax.eval_shape(lambda: step_lib.init_state(cfg, setup, optimizer)))
    teacher = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, setup.teacher.dtype),
                           model_lib.abstract_params(setup.teacher))
    data = {k: jax.ShapeDtypeStruct((batch, seq), jnp.int32) for k in ("input_ids", "attention_mask", "token_type_ids")}
    step = step_lib.make_train_step(setup, optimizer, sharding.make_mesh(jax.devices()[:1]))
    return _bytes(step.lower(state, teacher, data).compile())
  finally:
    losses.blockwise_relation_loss = original


def _bytes(compiled) -> dict:
  m = compiled.memory_analysis()
  return {"temp": m.temp_size_in_bytes, "arguments": m.argument_size_in_bytes, "output": m.output_size_in_bytes}


def main(argv=None):
  usage = "usage: python -m experiments.scripts.relation_memory [--full-step] [--out experiments/results]"

  def define(fv):
    flags.DEFINE_boolean("full-step", False, "add the whole train step of base-v1 / base-v2",
                         flag_values=fv)
    flags.DEFINE_string("out", "experiments/results", "where the page goes", flag_values=fv)

  a = cli_flags.parse("relation_memory", sys.argv[1:] if argv is None else argv, define, usage)
  full_step = a["full-step"].value
  lines = [f"# Relation loss temporary memory (XLA memory_analysis, {jax.devices()[0].device_kind}, "
           f"jax {jax.__version__})", "",
           "Compiled only (nothing runs): `python -m experiments.scripts.relation_memory --full-step`. "
           "Temp = XLA's temporary buffers of the compiled program (arguments and outputs excluded).", "",
           "| what | B x T | dtype | direct temp GiB | blockwise temp GiB | ratio |", "|---|---|---|---|---|---|"]
  rows = [(f"{v} loss + grad (captured q/k/v)", v, b, t, d) for v in ("v1", "v2") for b, t in ((256, 128), (64, 512))
          for d in (jnp.float32, jnp.bfloat16)]
  for label, version, batch, seq, dtype in rows:
    got = {name: loss_memory(version, rel, batch, seq, dtype)["temp"] for name, rel in RELATIONS.items()}
    lines.append(f"| {label} | {batch}x{seq} | {jnp.dtype(dtype).name} | {got['direct'] / 2**30:.2f} "
                 f"| {got['blockwise'] / 2**30:.2f} | {got['direct'] / got['blockwise']:.1f}x |")
    print(lines[-1], flush=True)
  if full_step:
    for config, attention_dropout, layers in (("base-v1", 0.1, 6), ("base-v2", 0.1, 6), ("base-v2", 0.0, 6),
                                              ("base-v2", 0.1, 1)):
      t0 = time.time()
      got = {name: step_memory(config, rel, 64, 512, attention_dropout, layers)["temp"]
             for name, rel in RELATIONS.items()}
      lines.append(f"| {config} full train step (bf16, L{layers}-H384 student, attention dropout "
                   f"{attention_dropout:g}) | 64x512 | bfloat16 "
                   f"| {got['direct'] / 2**30:.2f} | {got['blockwise'] / 2**30:.2f} "
                   f"| {got['direct'] / got['blockwise']:.1f}x |")
      print(lines[-1], f"({time.time() - t0:.0f} s to compile both)", flush=True)
  if full_step:
    lines += ["", "The 6-layer full-step rows share 20-24 GiB that is not the loss: off a GPU the student's "
              "attention is XLA's, which keeps [B, N, T, S] float32 logits and probabilities for the "
              "backward pass (with attention dropout 0 too), about 3 GiB per student layer (compare the "
              "1-layer row). On a GPU cuDNN's flash attention keeps none of them."]
  out = pathlib.Path(a.out) / f"relation-memory-{harness.device_name()}.md"
  out.write_text("\n".join(lines) + "\n")
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
