"""Speed of one MiniLM distillation step: the JAX step against PyTorch `transformers`.

One step = teacher forward up to the distilled layer (frozen, eval mode, no gradient,
bf16) + student forward and backward + the MiniLM relation losses + an AdamW update,
on random weights with the real models' shapes. Every (route, config, shape) gives one
JSON row (step time = median of the timed steps, each ended by `block_until_ready` /
`torch.cuda.synchronize()`; tokens/s, examples/s, peak device memory, MFU) appended to
`<out_dir>/benchmark-<device>.jsonl`; the markdown table of the latest rows goes to
`<out_dir>/benchmark-<device>.md` and stdout.

One module per job:
  workloads.py     the settings (`Workload`, `MODES`), their model FLOPs and random batches,
                   and `Built`, what every route hands the harness.
  jax_routes.py    the JAX route: `minilm_jax.step.make_train_step` at the workload's shape.
  torch_routes.py  the PyTorch reference routes and their MiniLM loss (the only module
                   that imports torch).
  harness.py       timing a `Built`, the matmul peak, one measurement per subprocess, the
                   largest-batch (OOM) search.
  report.py        rows (a measurement plus its rates) -> the markdown table.
  main.py          `run` (every config, shape and route of a mode) and the command line.

Run: `python -m minilm_jax benchmark --mode cpu` (tiny models, seconds, what the tests
run) or `--mode gpu` (the real workload; each measurement in its own process so memory
peaks, OOMs and JAX's preallocation stay apart). `--max-batch` adds the largest batch
that fits at seq 512, per framework's best route (doubling, then bisection).
"""
