"""MiniLM (v1) from BERT-base (12 layers, 768 wide, 12 heads).

Attention transfer + value relation from the last teacher layer to the last student
layer; 12 attention heads in teacher and student, as v1 requires (Wang et al., 2020).

    python -m minilm_jax distill --config experiments/minilm_v1_bert_base.py:L6-H384 --workdir runs/minilm_v1_bert_base-L6-H384 --config.teacher=/path/to/bert-base-uncased --config.corpus=...

The teacher is a local Hugging Face directory (nothing is downloaded): override
`--config.teacher`. Students: L6-H768, L12-H384, L6-H384, L4-H384, L3-H384; the default is L6-H768.
"""

from minilm_jax.config import paper_config


def get_config(student: str = "L6-H768"):
  return paper_config(teacher="bert-base-uncased", version="v1", student=student,
                      learning_rate=5e-4)
