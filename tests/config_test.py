"""The run's config: values refused before any compute."""

import os
import pathlib
import subprocess
import sys

import jax
import pytest
from tiny import smoke_config

from minilm_jax import sharding
from minilm_jax import workdir as workdir_lib
from minilm_jax import step as step_lib
from minilm_jax.config import DistillConfig, check_config


def test_bad_configs_fail_before_compute(teacher):
  config = teacher[0]
  with pytest.raises(ValueError, match="teacher has 12 heads and the student 8.*student_heads=12.*v2"):
    step_lib.make_setup(DistillConfig(student_heads=8), config)
  with pytest.raises(ValueError, match="relation_heads=36 does not divide the teacher hidden size 384"):
    step_lib.make_setup(DistillConfig(version="v2", relation_heads=36), config)
  with pytest.raises(ValueError, match="teacher_layer 7 is out of range: the teacher has 6 layers"):
    step_lib.make_setup(DistillConfig(teacher_layer=7), config)
  with pytest.raises(ValueError, match="max_seq_len 600 exceeds the teacher's position table"):
    step_lib.make_setup(DistillConfig(max_seq_len=600), config)
  with pytest.raises(ValueError, match="version 'v3' is unknown"):
    step_lib.make_setup(DistillConfig(version="v3"), config)
  with pytest.raises(ValueError, match="dropout_prng 'mt19937' is not a jax.random implementation.*'rbg'"):
    step_lib.make_setup(DistillConfig(dropout_prng="mt19937"), config)
  with pytest.raises(ValueError, match="remat 'feedforward' is unknown: did you mean 'feed-forward'"):
    step_lib.make_setup(DistillConfig(remat="feedforward"), config)
  mesh = sharding.make_mesh(jax.devices() * 1)
  with pytest.raises(ValueError, match="global_batch_size 30 is not divisible by 1 devices x 4 "
                     "gradient-accumulation steps: use a multiple of 4"):
    sharding.check_batch_size(30, mesh, 4)


@pytest.mark.parametrize("field,value", [("learning_rate", float("inf")), ("clip_grad_norm", float("nan")),
                                         ("adam_eps", float("-inf")), ("student_dropout", float("nan"))])
def test_inf_and_nan_are_refused_in_every_float_field(field, value):
  with pytest.raises(ValueError, match=rf"{field}=(-?inf|nan) is not a finite number: pass --config.{field}="):
    check_config(DistillConfig(**{field: value}))


def test_warmup_beyond_the_run_is_refused():
  check_config(DistillConfig(warmup_steps=4, max_steps=4))
  with pytest.raises(ValueError, match="warmup_steps=10 exceeds max_steps=4"):
    check_config(DistillConfig(warmup_steps=10, max_steps=4))
  with pytest.raises(ValueError, match="warmup_steps=10 exceeds assistant_steps=4"):
    check_config(DistillConfig(warmup_steps=10, assistant_steps=4))
  check_config(DistillConfig(warmup_steps=10, assistant_steps=4, teacher_assistant="off"))


def test_float16_is_refused_on_the_cpu_it_would_compile_for():
  check_config(DistillConfig(compute_dtype="float16"), platform="gpu")
  with pytest.raises(ValueError, match="compute_dtype='float16' does not run on CPU.*bfloat16 or float32"):
    check_config(DistillConfig(compute_dtype="float16"), platform="cpu")


def test_a_resumed_batch_names_the_device_counts_that_divide_it(tmp_path):
  """A batch-8 run resumed on 3 devices: the batch is fixed by the run, so the fix is a device
  count that divides it, not "use a multiple of 3"."""
  root = pathlib.Path(__file__).resolve().parents[1]
  workdir_lib.write(tmp_path / "run", smoke_config(), {})
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {
      "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=3",
      "PYTHONPATH": str(root)}
  done = subprocess.run([sys.executable, "-m", "minilm_jax", "distill",
                         f"--config={root / 'experiments' / 'configs' / 'demo.py'}:smoke",
                         f"--workdir={tmp_path / 'run'}"], env=env, cwd=root, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode != 0
  assert (f"global_batch_size 8 is not divisible by 3 devices x 1 gradient-accumulation steps, and "
          f"the batch of the run in {tmp_path / 'run'} is fixed by its checkpoints: resume it on a "
          "device count that divides 8 (1, 2, 4, 8), or start a new --workdir") in done.stderr, done.stderr


def test_remat_auto_recomputes_the_feed_forward_on_a_tpu_only(teacher):
  """The student recomputes its feed-forward where the step is compiled for a TPU (or when
  asked); the teacher, which takes no gradient, never does."""
  config = teacher[0]
  remats = lambda cfg, platform: [(s := step_lib.make_setup(cfg, config, platform)).teacher.remat_feed_forward,
                                  s.student.remat_feed_forward]
  assert remats(DistillConfig(), "tpu") == [False, True]
  assert remats(DistillConfig(), "gpu") == remats(DistillConfig(), "cpu") == [False, False]
  assert remats(DistillConfig(remat="none"), "tpu") == [False, False]
  assert remats(DistillConfig(remat="feed-forward"), "cpu") == [False, True]
