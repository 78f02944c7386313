"""Teacher assistant: the two-stage chain, its resume after SIGTERM in either stage, its exports."""

import dataclasses
import os
import signal

import numpy as np
import pytest
import transformers

from minilm_jax import distill, teacher_assistant
from minilm_jax import step as step_lib
from minilm_jax.config import DistillConfig
from minilm_jax.metric_writer import MetricWriter, read_metrics
from tiny import comparable, params_of, smoke_config


def tiny_chain_config():
  """The 6-layer, 384-wide teacher -> 1 layer, 96 wide: "auto" takes an assistant, of the
  distilled teacher depth (layer 2, to keep the test small) and the student's width."""
  return smoke_config(teacher_layer=2, student_hidden=96, max_steps=4, assistant_steps=4,
                      log_every=1, checkpoint_every=2)


def test_auto_follows_the_papers_rule(teacher):
  config = teacher[0]  # 6 layers, 384 wide
  rule = lambda **kw: teacher_assistant.uses_assistant(DistillConfig(**kw), config)
  assert rule(student_layers=3, student_hidden=192) and rule(student_layers=1, student_hidden=96)
  assert not rule(student_layers=4, student_hidden=192)   # deeper than L/2
  assert not rule(student_layers=3, student_hidden=384)   # wider than d/2 (the demo student)
  assert rule(student_layers=3, student_hidden=384, teacher_assistant="on")
  assert not rule(student_layers=1, student_hidden=96, teacher_assistant="off")
  with pytest.raises(ValueError, match="teacher_assistant 'yes' is unknown: use 'auto'"):
    step_lib.make_setup(DistillConfig(teacher_assistant="yes"), config)


def preempt_at(monkeypatch, stage: str, step: int):
  """SIGTERM to this process right after `stage` logs `step`: deterministic pre-emption."""
  write = MetricWriter.write

  def write_then_signal(self, s, scalars):
    write(self, s, scalars)
    if self.path.parent.name == stage and s == step:
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(MetricWriter, "write", write_then_signal)


def run_preempted(cfg, workdir):
  try:
    summary = distill.run(cfg, workdir)
  except SystemExit as e:  # a pre-empted run may exit with a non-zero pre-emption code
    assert e.code not in (0, None)
    return
  assert summary["preempted"], summary


def assert_same_run(got, want):
  (s1, p1), (s2, p2) = params_of(got), params_of(want)
  assert s1 == s2
  for a, b in zip(p1, p2):
    np.testing.assert_array_equal(a, b)  # bit-identical on CPU
  assert comparable(read_metrics(got)) == comparable(read_metrics(want))


def test_chain_resumes_exactly_in_either_stage_and_equals_plain_runs(tmp_path, monkeypatch, teacher):
  cfg = tiny_chain_config()
  assistant_cfg, _ = teacher_assistant.stage_configs(cfg, teacher[0], tmp_path / "chain")
  assert (assistant_cfg.student_layers, assistant_cfg.student_hidden) == (2, 96)
  # References: the assistant as a plain run, and a plain run from its export.
  distill.run(assistant_cfg, tmp_path / "plain_assistant")
  plain_student = dataclasses.replace(cfg, teacher=str(tmp_path / "plain_assistant" / "hf"),
                                      teacher_assistant="off")
  distill.run(plain_student, tmp_path / "plain_student")

  chain = tmp_path / "chain"
  preempt_at(monkeypatch, "assistant", 2)
  run_preempted(cfg, chain)
  stopped, _ = params_of(chain / "assistant")
  assert 2 <= stopped < 4 and not (chain / "assistant" / "hf").exists()
  assert not (chain / "student").exists()  # a pre-empted stage does not start the next one

  preempt_at(monkeypatch, "student", 2)
  run_preempted(cfg, chain)  # finishes the assistant, then the student stops part-way
  stopped, _ = params_of(chain / "student")
  assert 2 <= stopped < 4 and not (chain / "student" / "hf").exists()

  monkeypatch.undo()
  summary = distill.run(cfg, chain)
  assert summary["stage"] == "student" and summary["steps"] == 4 and not summary["preempted"]
  assert_same_run(chain / "assistant", tmp_path / "plain_assistant")
  assert_same_run(chain / "student", tmp_path / "plain_student")
  for stage, layers in (("assistant", 2), ("student", 1)):
    pt = transformers.AutoModel.from_pretrained(chain / stage / "hf")
    assert (pt.config.num_hidden_layers, pt.config.hidden_size) == (layers, 96)

  with pytest.raises(ValueError, match="holds a finished assistant trained otherwise \\(max_steps: 4 -> 6\\)"):
    distill.run(dataclasses.replace(cfg, assistant_steps=6), chain)
  with pytest.raises(ValueError, match="holds a teacher-assistant run.*teacher_assistant='on'"):
    distill.run(dataclasses.replace(cfg, teacher_assistant="off"), chain)
  with pytest.raises(ValueError, match="holds a single-stage run.*teacher_assistant='off'"):
    distill.run(dataclasses.replace(cfg, teacher_assistant="on"), tmp_path / "plain_student")
