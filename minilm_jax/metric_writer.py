"""Metrics a person can plot: `metrics.jsonl` (one JSON object per record) and TensorBoard.

Only process 0 writes. TensorBoard goes through tensorboardX, which needs no TensorFlow. A
distillation record holds the step's training terms `loss/<term>` and, at an evaluation step,
the same terms over the held-out set, `eval/<term>` (`minilm_jax.heldout`); each scalar is a
TensorBoard tag of its own name, so the two families sit side by side.
"""

import json
import logging
import pathlib
import time

import jax


class MetricWriter:
  """Appends `{"step": s, "time": t, **scalars}` lines and TensorBoard scalars."""

  def __init__(self, workdir: str | pathlib.Path):
    self.enabled = jax.process_index() == 0
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    self._tb = None
    if self.enabled:
      from tensorboardX import SummaryWriter
      self.path.parent.mkdir(parents=True, exist_ok=True)
      self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    with self.path.open("a") as f:
      f.write(json.dumps({"step": step, "time": time.time(), **scalars}) + "\n")
    for name, value in scalars.items():
      self._tb.add_scalar(name, value, step)
    self._tb.flush()

  def write_text(self, name: str, text: str) -> None:
    if self.enabled:
      self._tb.add_text(name, f"```\n{text}\n```", 0)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str | pathlib.Path, drop_torn_tail: bool = False) -> list[dict]:
  """The records of a run's `metrics.jsonl`, in order.

  A process killed while appending leaves a torn last line: `drop_torn_tail` drops it
  (a resume redoes it); any other unreadable line is an error naming the file and line.
  """
  path = pathlib.Path(workdir) / "metrics.jsonl"
  lines = [(i, line) for i, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
  records = []
  for i, line in lines:
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      if drop_torn_tail and i == lines[-1][0]:
        logging.warning("%s:%d is a torn record (the run was killed while writing it): dropped", path, i)
        break
      raise ValueError(f"{path}:{i} is not a JSON record ({e}): the file is damaged; remove that "
                       "line") from e
  return records
