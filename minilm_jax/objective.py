"""What a distill run minimises and what it exports: MiniLM's distillation or the MLM baseline.

The step (`step.make_step`) runs any `step.Objective`; the job picks one here. Distillation
(`objective="distill"`, the papers') trains a fresh encoder against the teacher and exports
it as `hf/`. The baseline (`objective="mlm"`) trains BERT's masked LM from scratch on the
same tokens, with no teacher: its tokenizer gives the masks, and it exports `hf-mlm/` (a
`BertForMaskedLM`, BERT only) beside the encoder in `hf/`.
"""

import pathlib
from typing import Callable

import jax
import numpy as np

from minilm_jax import convert, mlm
from minilm_jax import model as model_lib
from minilm_jax import step as step_lib
from minilm_jax.config import DistillConfig


def choose(cfg: DistillConfig, setup: step_lib.Setup, tokenizer) -> step_lib.Objective:
  """The run's objective: `step.distillation`, or the masked LM with the ids of the teacher's
  `tokenizer` (`tokenization.for_pretraining`'s; only the masked LM reads it)."""
  if cfg.objective == "mlm":
    return step_lib.Objective(mlm.init_params, mlm.make_loss(setup.student, tokenizer),
                              has_teacher=False)
  return step_lib.distillation(setup)


def export(cfg: DistillConfig, workdir: pathlib.Path, config: model_lib.ModelConfig, params,
           tokenizer_dir: pathlib.Path, card: Callable[..., str]) -> dict:
  """Writes the trained student as `hf/` (a masked-LM run also as `hf-mlm/`), each with its
  model card, `card(head)` (`model_card.for_run`); their paths."""
  params = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), params)
  exports = mlm.exports(config, params) if cfg.objective == "mlm" else {"hf": (config, params, None)}
  return {name.replace("-", "_"): str(convert.save_hf(workdir / name, model, weights, tokenizer_dir, head=head,
                                                      card=card(head), overwrite=True))
          for name, (model, weights, head) in exports.items()}
