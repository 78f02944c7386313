"""Multilingual-MiniLM: XLM-R base (12 layers, 768 wide, 250,002-token SentencePiece
vocabulary) distilled into L12-H384 and L6-H384 students that keep XLM-R's tokenizer.

The papers' recipes, from the teacher's last layer (both papers use the last layer of a
base-size teacher): MiniLM v1 (Wang et al., 2020; its Multilingual-MiniLM is the 12 x 384
student) transfers attention and value relations with XLM-R's 12 heads; MiniLMv2 (Wang
et al., 2021) its Q-Q, K-K and V-V relations with 48 relation heads. The student takes
the teacher's vocabulary, position table (514, offset by the padding id 1) and tokenizer
files, so its export has one embedding row per token and loads with `AutoTokenizer` and
`AutoModel` (tests/multilingual_test.py proves it on a tiny XLM-R teacher). L6-H384 is at
most half the teacher's depth and width, so `teacher_assistant="auto"` first distils a
12 x 384 assistant (MiniLM Sec. 3.3); L12-H384 is distilled directly.

    python -m minilm_jax distill --config experiments/multilingual_minilm.py:v1-L12-H384 \
        --workdir runs/multilingual-v1-L12-H384 --config.teacher=/path/to/xlm-roberta-base \
        --config.corpus='/data/cc100/*.txt'
"""

from minilm_jax.config import paper_config

VARIANTS = ("v1-L12-H384", "v1-L6-H384", "v2-L12-H384", "v2-L6-H384")


def get_config(variant: str = "v1-L12-H384"):
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}: use one of {VARIANTS}")
  version, student = variant.split("-", 1)
  return paper_config(teacher="xlm-roberta-base", version=version, student=student,
                      learning_rate=5e-4, relation_heads=48)
