"""Models made of a teacher's layers: its bottom layers (the truncated teacher) and the
student initialised from chosen teacher layers (`DistillConfig.student_init`).

The step distils from the teacher cut at its deepest distilled layer, and the study's
truncated-teacher baseline is that cut fine-tuned: both are `bottom_layers`. A student of
the teacher's width, heads and feed-forward size can also start from teacher layers
instead of random weights: DistilBERT (Sanh et al., 2019) keeps every second layer of
BERT-base, and all-MiniLM-L6-v2 is every second layer of MiniLM-L12. `student_init` is

    "random"   fresh weights (BERT's truncated normal), as in the MiniLM papers
    "spaced"   evenly spaced teacher layers ending at the last: student layer i of M
               copies teacher layer floor(i L / M) (1-based; 2, 4, 6 of 6 for M = 3)
    "2,4,6"    the 1-based teacher layers, one per student layer, bottom first

and the embeddings (and the pooler, where the teacher has one) are copied too, so the
student at step 0 is the teacher cut to those layers.
"""

import jax
import jax.numpy as jnp
from flax import nnx


RANDOM, SPACED = "random", "spaced"


def bottom_layers(pure: dict, num_layers: int) -> dict:
  """A model's pure parameter dict with only its bottom `num_layers` layers (embeddings and
  any pooler kept): the teacher up to the layer it is distilled from, the truncated-teacher
  baseline. The config to go with it is `config.replace(num_layers=num_layers)`."""
  total = len(pure["layers"])
  if not 1 <= num_layers <= total:
    raise ValueError(f"num_layers={num_layers} is outside 1..{total} (the model's layers)")
  return {**pure, "layers": {i: pure["layers"][i] for i in range(num_layers)}}


def parse(spec: str) -> tuple[int, ...] | str:
  """The choice `spec` names: "random", "spaced" or the 1-based layers of "2,4,6"; else raises."""
  if spec in (RANDOM, SPACED):
    return spec
  try:
    layers = tuple(int(n) for n in str(spec).split(","))
  except ValueError:
    layers = ()
  if not layers or min(layers) < 1:
    raise ValueError(f"student_init={spec!r} is not 'random', 'spaced' or 1-based teacher layers "
                     "such as '2,4,6' (one per student layer)")
  return layers


def teacher_layers(spec: str, teacher, student) -> tuple[int, ...]:
  """The 0-based teacher layers that student layers 0, 1, ... start from (() for "random"),
  checked against both models (`model.ModelConfig`s): the copied weights must fit the
  student's shapes."""
  chosen, total, m = parse(spec), teacher.num_layers, student.num_layers
  if chosen == RANDOM:
    return ()
  if chosen == SPACED:
    if m > total:
      raise ValueError(f"student_init='spaced' needs at most the teacher's {total} layers, but the "
                       f"student has {m}: use fewer student_layers or student_init='random'")
    chosen = tuple(i * total // m for i in range(1, m + 1))
  if len(chosen) != m:
    raise ValueError(f"student_init={spec!r} names {len(chosen)} teacher layers for a student of "
                     f"{m} layers (student_layers): name one per student layer")
  if bad := [n for n in chosen if n > total]:
    raise ValueError(f"student_init={spec!r}: layers {bad} are out of range, the teacher has "
                     f"{total} layers (use 1..{total})")
  flags = {"hidden_size": "student_hidden", "num_heads": "student_heads",
           "intermediate_size": "student_intermediate"}
  if differ := [f"{f} {getattr(student, f)} != {getattr(teacher, f)}" for f in flags
                if getattr(student, f) != getattr(teacher, f)]:
    fix = ", ".join(f"{flag}={getattr(teacher, f)}" for f, flag in flags.items())
    raise ValueError(f"student_init={spec!r} copies teacher layers, but the student's shape is not "
                     f"the teacher's ({'; '.join(differ)}): set {fix}, or student_init='random'")
  return tuple(n - 1 for n in chosen)


def from_teacher(fresh: nnx.State, teacher_params: nnx.State | None,
                 layers: tuple[int, ...]) -> nnx.State:
  """`fresh` (the student's fresh parameters) with the teacher's embeddings, its layers
  `layers` (0-based, one per student layer) and its pooler, if it has one, copied in:
  new buffers, so donating the student's state never deletes the teacher's."""
  if teacher_params is None:
    raise ValueError(f"student_init copies teacher layers {[n + 1 for n in layers]}: the step-0 "
                     "state needs the whole teacher's parameters (init_state's teacher_params)")
  teacher = teacher_params.to_pure_dict()
  pure = fresh.to_pure_dict()
  pure["embeddings"] = teacher["embeddings"]
  pure["layers"] = {i: teacher["layers"][n] for i, n in enumerate(layers)}
  if "pooler" in teacher:
    pure["pooler"] = teacher["pooler"]
  state = jax.tree.map(lambda x: x, fresh)  # a new tree: `fresh` stays as it was
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.array, pure))
  return state
