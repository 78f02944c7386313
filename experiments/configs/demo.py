"""Demo: the packaged teacher all-MiniLM-L6-v2 -> a 3-layer, 384-wide, 12-head student.

MiniLM v1 (attention transfer + value relation) on the embedded demo corpus (Python's
documentation topics), sequence 128, with 8 of its 79 documents held out and the loss terms
over them evaluated every 20 steps (`eval/*` in metrics.jsonl). Finishes on 2 CPU cores in a
few minutes with a clearly falling loss:

    python -m minilm_jax distill --config experiments/configs/demo.py --workdir runs/demo

`--config experiments/configs/demo.py:smoke` is a seconds-long variant for tests, without the
held-out set (tests run it on corpora of a few documents).
"""

from experiments.configs import common
from minilm_jax.config import DistillConfig

NAMES = ("",)  # "" = the demo itself


def get_config(variant: str = "") -> DistillConfig:
  _, smoke = common.parse(__file__, variant, NAMES, default="")
  cfg = DistillConfig(
      teacher="all-MiniLM-L6-v2", version="v1",
      student_layers=3, student_hidden=384, student_heads=12,
      corpus="demo", max_seq_len=128, heldout_documents=8,
      global_batch_size=16, max_steps=200, learning_rate=5e-4, warmup_steps=20,
      log_every=10, eval_every=20, checkpoint_every=100)
  return common.smoke(cfg, student_layers=1, heldout_documents=0, eval_every=0) if smoke else cfg
