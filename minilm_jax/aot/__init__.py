"""Ahead-of-time compilation for TPU pods, on a machine without a TPU.

libtpu (`pip install -e .[tpu]`) describes any slice's devices and compiles for them, so
the distillation step can be checked on a pod before renting it: does it fit in each
device's HBM, what XLA counts in FLOPs and bytes, which collectives it runs, and how fast
its roofline lets it go. MaxText (`train_compile.py`) checks its pods the same way.

  chips.py   TPU generations: documented peak, HBM and bandwidth (with sources), slices.
  step.py    the step `distill` runs for a config, compiled for a slice: one row; the
             largest batch that fits.
  hlo.py     what the compiled program says: memory, XLA's counts, collectives, the
             kernels that move the most bytes.
  report.py  rows as a line, markdown tables, before / after.
  main.py    `python -m minilm_jax compile`.
"""
