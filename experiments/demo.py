"""Demo: the packaged teacher all-MiniLM-L6-v2 -> a 3-layer, 384-wide, 12-head student.

MiniLM v1 (attention transfer + value relation) on the embedded demo corpus (Python's
documentation topics), sequence 128. Finishes on 2 CPU cores in a few minutes with a
clearly falling loss:

    python -m minilm_jax distill --config experiments/demo.py --workdir runs/demo

`--config experiments/demo.py:smoke` is a seconds-long variant for tests.
"""

from minilm_jax.config import DistillConfig, check_choice

VARIANTS = ("", "smoke")  # "" = the demo itself


def get_config(variant: str = "") -> DistillConfig:
  check_choice("demo.py variant", variant, VARIANTS)
  cfg = DistillConfig(
      teacher="all-MiniLM-L6-v2", version="v1",
      student_layers=3, student_hidden=384, student_heads=12,
      corpus="demo", max_seq_len=128,
      global_batch_size=16, max_steps=200, learning_rate=5e-4, warmup_steps=20,
      log_every=10, checkpoint_every=100)
  if variant == "smoke":
    cfg.student_layers, cfg.max_seq_len, cfg.global_batch_size = 1, 32, 8
    cfg.max_steps, cfg.warmup_steps, cfg.log_every, cfg.checkpoint_every = 4, 1, 2, 2
  return cfg
