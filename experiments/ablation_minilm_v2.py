"""MiniLMv2 loss ablations as config: each self-attention relation alone, or any subset.

Wang et al. (2021) sum the Q-Q, K-K and V-V relations; a single-relation variant keeps
one of them (`loss_terms`), on the paper's 6-layer, 384-wide student of BERT-base with
48 relation heads (`minilm_v2_bert_base.py`); the metrics log exactly the terms computed.

    python -m minilm_jax distill --config experiments/ablation_minilm_v2.py:VV --workdir runs/v2-VV \
        --config.teacher=/path/to/bert-base-uncased --config.corpus=...
    python -m minilm_jax distill --config experiments/ablation_minilm_v2.py:smoke-KK --workdir runs/smoke-KK

Any other subset is `--config.loss_terms=qq_relation --config.loss_terms=vv_relation`.
"""

from minilm_jax.config import DistillConfig, paper_config

VARIANTS = {"paper": ("qq_relation", "kk_relation", "vv_relation"), "QQ": ("qq_relation",),
            "KK": ("kk_relation",), "VV": ("vv_relation",)}


def get_config(variant: str = "VV") -> DistillConfig:
  if variant == "smoke-KK":
    return DistillConfig(teacher="all-MiniLM-L6-v2", version="v2", relation_heads=12,
                         loss_terms=VARIANTS["KK"], student_layers=1, max_seq_len=32,
                         global_batch_size=8, max_steps=4, warmup_steps=1, log_every=2,
                         checkpoint_every=2)
  cfg = paper_config(teacher="bert-base-uncased", version="v2", student="L6-H384",
                     learning_rate=5e-4, relation_heads=48)
  cfg.loss_terms = VARIANTS[variant]
  return cfg
