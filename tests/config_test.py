"""The run's config: values refused before any compute."""

import jax
import pytest

from minilm_jax import sharding
from minilm_jax import step as step_lib
from minilm_jax.config import DistillConfig


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
  mesh = sharding.make_mesh(jax.devices() * 1)
  with pytest.raises(ValueError, match="global_batch_size 30 is not divisible by 1 devices x 4 "
                     "gradient-accumulation steps: use a multiple of 4"):
    sharding.check_batch_size(30, mesh, 4)
