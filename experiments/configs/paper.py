"""The papers' recipes: MiniLM (Wang et al., 2020) and MiniLMv2 (Wang et al., 2021).

A variant is `{v1|v2}-{teacher}-L{layers}-H{hidden}`:

    python -m minilm_jax distill --config experiments/configs/paper.py:v2-bert-base-L6-H384 \
        --workdir runs/v2-bert-base-L6-H384 --config.teacher=/path/to/bert-base-uncased \
        --config.corpus='/data/wiki-books/*.txt'

Students: L6-H768, L12-H384, L6-H384, L4-H384, L3-H384 (12 heads, F = 4D); the default
variant is v2-bert-base-L6-H384. Teachers (`TEACHERS`; each is a local Hugging Face
directory, nothing is downloaded: override `--config.teacher`):

  - bert-base (bert-base-uncased; 12 layers, 768 wide, 12 heads), v1 and v2;
  - bert-large (bert-large-uncased; 24 layers, 1024 wide, 16 heads), v2;
  - roberta-large (24 layers, 1024 wide; position ids offset by padding_idx + 1), v2;
  - xlmr-base (xlm-roberta-base; 12 layers, 768 wide, 250,002-token SentencePiece
    vocabulary), v1 and v2: Multilingual-MiniLM.

v1 transfers attention and value relations with the teacher's 12 heads, from the last
teacher layer to the last student layer. v2 transfers the Q-Q, K-K and V-V relations with
48 relation heads from a base-size teacher's last layer, and with 64 from a large
teacher's upper-middle layer 21 of 24. A student of xlmr-base takes the teacher's
vocabulary, position table (514, offset by the padding id 1) and tokenizer files, so its
export loads with `AutoTokenizer` and `AutoModel`. A student at most half the teacher's
depth and width (e.g. v1-xlmr-base-L6-H384) first distils a teacher assistant of the
teacher's depth and the student's width (`teacher_assistant="auto"`, MiniLM Sec. 3.3).

`NAME,smoke` (or `smoke`: the default's) is that recipe shrunk to a seconds-long run: the
packaged teacher all-MiniLM-L6-v2 (6 x 384, 12 heads; the papers' teachers are not
packaged) at its last layer, the demo corpus, a 1-layer student of the variant's width,
batch 8 x 32 tokens, 4 steps.
"""

from experiments.configs import common
from minilm_jax.config import PAPER_STUDENTS, DistillConfig, paper_config

TEACHERS = {  # variant word: (local directory name, peak learning rate, teacher layer, R)
    "bert-base": ("bert-base-uncased", 5e-4, 0, 48),
    "bert-large": ("bert-large-uncased", 3e-4, 21, 64),
    "roberta-large": ("roberta-large", 3e-4, 21, 64),
    "xlmr-base": ("xlm-roberta-base", 5e-4, 0, 48),
}
VERSIONS = {"v1": ("bert-base", "xlmr-base"), "v2": tuple(TEACHERS)}  # v1 needs 12 teacher heads
NAMES = tuple(f"{version}-{teacher}-{student}" for version, teachers in VERSIONS.items()
              for teacher in teachers for student in PAPER_STUDENTS)


def get_config(variant: str = "") -> DistillConfig:
  name, smoke = common.parse(__file__, variant, NAMES, default="v2-bert-base-L6-H384")
  version, rest = name.split("-", 1)
  teacher, layers, hidden = rest.rsplit("-", 2)
  directory, learning_rate, teacher_layer, relation_heads = TEACHERS[teacher]
  cfg = paper_config(teacher=directory, version=version, student=f"{layers}-{hidden}",
                     learning_rate=learning_rate, teacher_layer=teacher_layer,
                     relation_heads=relation_heads)
  return common.smoke(cfg, student_layers=1, **common.PACKAGED_TEACHER) if smoke else cfg
