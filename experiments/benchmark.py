"""Speed of one distillation step, JAX vs PyTorch `transformers`; see `minilm_jax.benchmark`.

  python experiments/benchmark.py --mode cpu    # tiny models, seconds (what the tests run)
  python experiments/benchmark.py --mode gpu    # BERT-base/large -> L6-H384, 256x128 and 64x512
  python experiments/benchmark.py --mode gpu --configs large-v2 --routes jax,torch-compiled --max-batch

Rows are appended to experiments/results/benchmark-<device>.jsonl; the table of the latest
rows is rewritten to experiments/results/benchmark-<device>.md.
"""

import sys

from minilm_jax.benchmark import main

if __name__ == "__main__":
  main.main(sys.argv[1:])
