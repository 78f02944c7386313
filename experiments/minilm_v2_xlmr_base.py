"""MiniLMv2 from XLM-R base (12 layers, 768 wide, 250k SentencePiece vocab).

Multilingual students; the last teacher layer, 48 relation heads.

    python -m minilm_jax distill --config experiments/minilm_v2_xlmr_base.py:L6-H384 --workdir runs/minilm_v2_xlmr_base-L6-H384 --config.teacher=/path/to/xlm-roberta-base --config.corpus=...

The teacher is a local Hugging Face directory (nothing is downloaded): override
`--config.teacher`. Students: L6-H768, L12-H384, L6-H384, L4-H384, L3-H384; the default is L6-H384.
"""

from minilm_jax.config import paper_config


def get_config(student: str = "L6-H384"):
  return paper_config(teacher="xlm-roberta-base", version="v2", student=student,
                      learning_rate=5e-4, relation_heads=48)
