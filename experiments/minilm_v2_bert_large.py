"""MiniLMv2 from BERT-large (24 layers, 1024 wide, 16 heads), 64 relation heads.

Large teachers are distilled from an upper-middle layer: layer 21 of 24.

    python -m minilm_jax distill --config experiments/minilm_v2_bert_large.py:L6-H384 --workdir runs/minilm_v2_bert_large-L6-H384 --config.teacher=/path/to/bert-large-uncased --config.corpus=...

The teacher is a local Hugging Face directory (nothing is downloaded): override
`--config.teacher`. Students: L6-H768, L12-H384, L6-H384, L4-H384, L3-H384; the default is L6-H384.
"""

from minilm_jax.config import paper_config


def get_config(student: str = "L6-H384"):
  return paper_config(teacher="bert-large-uncased", version="v2", student=student,
                      learning_rate=3e-4, teacher_layer=21, relation_heads=64)
