"""The papers' loss ablations as config: the paper's run with a chosen list of loss terms.

Each variant is the BERT-base recipe of `paper.py` (a 6-layer, 384-wide student) with
`loss_terms` set; the metrics log exactly the terms computed. Variants name the terms
kept:

  - MiniLM (Wang et al., 2020): `v1-AT` is attention transfer alone (the paper's "-VR"),
    `v1-VR` value relation alone ("-AT"), `v1-paper` both. The teacher-assistant
    ablation ("-TA") is `--config.teacher_assistant=off`.
  - MiniLMv2 (Wang et al., 2021; 48 relation heads): `v2-QQ`, `v2-KK`, `v2-VV` keep one
    self-attention relation, `v2-paper` sums all three. Any other subset is
    `--config.loss_terms=qq_relation --config.loss_terms=vv_relation`.

    python -m minilm_jax distill --config experiments/configs/ablations.py:v1-AT \
        --workdir runs/v1-AT --config.teacher=/path/to/bert-base-uncased --config.corpus=...
    python -m minilm_jax distill --config experiments/configs/ablations.py:v2-KK,smoke \
        --workdir runs/smoke-KK

`NAME,smoke` (or `smoke`: v1-AT's) runs that ablation in seconds on the packaged teacher
and the demo corpus, as `paper.py`'s smoke variants do.
"""

from experiments.configs import common
from minilm_jax.config import DistillConfig, paper_config

TERMS = {"v1-AT": ("attention_transfer",), "v1-VR": ("value_relation",),
         "v1-paper": ("attention_transfer", "value_relation"),
         "v2-QQ": ("qq_relation",), "v2-KK": ("kk_relation",), "v2-VV": ("vv_relation",),
         "v2-paper": ("qq_relation", "kk_relation", "vv_relation")}
NAMES = tuple(TERMS)


def get_config(variant: str = "") -> DistillConfig:
  name, smoke = common.parse(__file__, variant, NAMES, default="v1-AT")
  cfg = paper_config(teacher="bert-base-uncased", version=name[:2], student="L6-H384",
                     learning_rate=5e-4, relation_heads=48)
  cfg.loss_terms = TERMS[name]
  return common.smoke(cfg, student_layers=1, **common.PACKAGED_TEACHER) if smoke else cfg
