"""MiniLMv2 from BERT-base: Q-Q, K-K, V-V relations, 48 relation heads.

From the last teacher layer to the last student layer (Wang et al., 2021).

    python -m minilm_jax distill --config experiments/minilm_v2_bert_base.py:L6-H384 --workdir runs/minilm_v2_bert_base-L6-H384 --config.teacher=/path/to/bert-base-uncased --config.corpus=...

The teacher is a local Hugging Face directory (nothing is downloaded): override
`--config.teacher`. Students: L6-H768, L12-H384, L6-H384, L4-H384, L3-H384; the default is L6-H384.
"""

from minilm_jax.config import paper_config


def get_config(student: str = "L6-H384"):
  return paper_config(teacher="bert-base-uncased", version="v2", student=student,
                      learning_rate=5e-4, relation_heads=48)
