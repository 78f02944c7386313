"""MiniLMv2 from RoBERTa-large (24 layers, 1024 wide), 64 relation heads.

An upper-middle teacher layer (21 of 24); position ids offset by padding_idx + 1.

    python -m minilm_jax distill --config experiments/minilm_v2_roberta_large.py:L6-H384 --workdir runs/minilm_v2_roberta_large-L6-H384 --config.teacher=/path/to/roberta-large --config.corpus=...

The teacher is a local Hugging Face directory (nothing is downloaded): override
`--config.teacher`. Students: L6-H768, L12-H384, L6-H384, L4-H384, L3-H384; the default is L6-H384.
"""

from minilm_jax.config import paper_config


def get_config(student: str = "L6-H384"):
  return paper_config(teacher="roberta-large", version="v2", student=student,
                      learning_rate=3e-4, teacher_layer=21, relation_heads=64)
