"""MiniLM (v1) loss ablations as config: the same run with a chosen list of loss terms.

Wang et al. (2020) ablate value-relation transfer ("-VR": attention transfer alone) on
a 6-layer, 384-wide student of BERT-base; "-AT" keeps value relation alone. Each variant
is the paper's recipe (`minilm_v1_bert_base.py`) with `loss_terms` set; the metrics log
exactly the terms computed. The teacher-assistant ablation ("-TA") is
`--config.teacher_assistant=off`.

    python -m minilm_jax distill --config experiments/ablation_minilm_v1.py:-VR --workdir runs/v1-VR \
        --config.teacher=/path/to/bert-base-uncased --config.corpus=...
    python -m minilm_jax distill --config experiments/ablation_minilm_v1.py:smoke-VR --workdir runs/smoke-VR

`smoke-VR` runs "-VR" in seconds on the packaged teacher and the demo corpus.
"""

from minilm_jax.config import DistillConfig, paper_config

VARIANTS = {"paper": ("attention_transfer", "value_relation"), "-VR": ("attention_transfer",),
            "-AT": ("value_relation",)}


def get_config(variant: str = "-VR") -> DistillConfig:
  if variant == "smoke-VR":
    return DistillConfig(teacher="all-MiniLM-L6-v2", version="v1", loss_terms=VARIANTS["-VR"],
                         student_layers=1, max_seq_len=32, global_batch_size=8, max_steps=4,
                         warmup_steps=1, log_every=2, checkpoint_every=2)
  cfg = paper_config(teacher="bert-base-uncased", version="v1", student="L6-H384", learning_rate=5e-4)
  cfg.loss_terms = VARIANTS[variant]
  return cfg
