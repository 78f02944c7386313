"""The distillation loss over the captured layers' internals, and which layers it sees.

A loss of internals is a function `(teacher_internals, student_internals, mask) -> named
scalar terms with a "total"`: MiniLM (v1) and MiniLMv2 are two built in (`losses.minilm_loss`
of one teacher layer against the student's last), and `DistillConfig.internals_loss`
names any other ("module:function" or "path/file.py:function", e.g. TinyBERT's
attention MSE in `experiments/configs/tinybert_attention.py`, DistilBERT's hidden-state
cosine in `experiments/configs/distilbert_cosine.py`) over the layers of
`loss_teacher_layers` / `loss_student_layers`. `choose` checks the run's choice against
the two models before any compute.
"""

import functools
import importlib
import importlib.util
import pathlib
from typing import Callable

import jax

from minilm_jax import losses
from minilm_jax import model as model_lib

# A distillation loss of internals: (teacher_internals, student_internals, mask) -> named
# scalar terms with a "total" (what is minimised). The internals are the captured layers'
# `AttentionInternals` (q, k, v before dropout, the layer's output hidden states; a custom
# loss also gets the attention logits), in the order of `loss_teacher_layers` /
# `loss_student_layers`; mask is [B, T].
InternalsLoss = Callable[[tuple[model_lib.AttentionInternals, ...],
                          tuple[model_lib.AttentionInternals, ...], jax.Array], dict[str, jax.Array]]


def layer_pairs(name: str, term: Callable[[model_lib.AttentionInternals, model_lib.AttentionInternals,
                                             jax.Array], jax.Array]) -> InternalsLoss:
  """The `InternalsLoss` of one `term(teacher_layer, student_layer, mask)` per (teacher,
  student) layer pair: terms `<name>_1`, `<name>_2`, ... in the order of the layer lists,
  and their sum as the total (TinyBERT's and DistilBERT's per-layer losses are this)."""
  def loss(teacher_internals, student_internals, mask):
    terms = {f"{name}_{m}": term(t, s, mask)
             for m, (t, s) in enumerate(zip(teacher_internals, student_internals), start=1)}
    return terms | {"total": sum(terms.values())}
  return loss


def _paper_loss(teacher, student, mask, *, relation_heads: int, terms: tuple[str, ...]):
  """`losses.minilm_loss` as an `InternalsLoss`: one teacher layer against the student's last."""
  return losses.minilm_loss(teacher[0], student[0], mask, relation_heads, terms)


def load(spec: str) -> InternalsLoss:
  """The function named by "package.module:function" or "path/to/file.py:function"."""
  where, _, name = spec.rpartition(":")
  if not where or not name:
    raise ValueError(f"internals_loss {spec!r} is not 'module:function' or 'path/file.py:function'")
  if where.endswith(".py"):
    path = pathlib.Path(where).expanduser()
    if not path.is_file():
      raise FileNotFoundError(f"internals_loss file {path} does not exist: give a path relative to "
                              "the working directory, or an absolute one")
    module_spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
  else:
    try:
      module = importlib.import_module(where)
    except ModuleNotFoundError as e:
      raise ValueError(f"internals_loss module {where!r} cannot be imported ({e}): put it on "
                       "PYTHONPATH or name its file as 'path/file.py:function'") from e
  fn = getattr(module, name, None)
  if not callable(fn):
    raise ValueError(f"internals_loss {spec!r}: {where} has no function {name!r}")
  return fn


def layer_indices(chosen: tuple[int, ...], default: int, total: int, what: str) -> tuple[int, ...]:
  """1-based layer numbers (config) -> 0-based indices (model), range-checked."""
  chosen = tuple(chosen) or (default,)
  if bad := [n for n in chosen if not 1 <= n <= total]:
    raise ValueError(f"loss_{what}_layers {bad} are out of range: the {what} has {total} layers "
                     f"(use 1..{total})")
  return tuple(n - 1 for n in chosen)


def choose(cfg, teacher: model_lib.ModelConfig,
           student: model_lib.ModelConfig) -> tuple[InternalsLoss, int]:
  """The run's `InternalsLoss` and its relation-head count R, checked against the two models."""
  if cfg.internals_loss:
    if cfg.loss_terms is not None:
      raise ValueError("loss_terms chooses terms of the built-in v1/v2 losses; with internals_loss "
                       "your function returns its own terms: leave loss_terms unset (None)")
    return load(cfg.internals_loss), 0
  if cfg.loss_teacher_layers or cfg.loss_student_layers:
    raise ValueError("loss_teacher_layers / loss_student_layers choose the layers of an "
                     "internals_loss; the built-in losses use teacher_layer and the student's "
                     "last layer: set internals_loss or leave them empty")
  terms = losses.check_terms(cfg.version, losses.TERMS[cfg.version] if cfg.loss_terms is None
                             else cfg.loss_terms)
  if cfg.version == "v1":
    if teacher.num_heads != student.num_heads:
      raise ValueError(f"MiniLM v1 transfers attention head by head, but the teacher has "
                       f"{teacher.num_heads} heads and the student {student.num_heads}: set "
                       f"student_heads={teacher.num_heads}, or use version='v2' (relation heads)")
    relation_heads = teacher.num_heads
  else:
    relation_heads = cfg.relation_heads
    for name, c in (("teacher", teacher), ("student", student)):
      if c.hidden_size % relation_heads:
        raise ValueError(f"relation_heads={relation_heads} does not divide the {name} hidden size "
                         f"{c.hidden_size}: choose a divisor of both widths")
  return functools.partial(_paper_loss, relation_heads=relation_heads, terms=terms), relation_heads
