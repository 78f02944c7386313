"""The run's config: values refused before any compute, and the papers' configs against
their teachers' shapes."""

import importlib.util
import pathlib

import jax
import pytest

from minilm_jax import model as model_lib, sharding
from minilm_jax import step as step_lib
from minilm_jax.config import DistillConfig, PAPER_STUDENTS

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"


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


TEACHERS = {  # the shapes of the papers' teachers, as their config.json files give them
    "bert_base": model_lib.ModelConfig(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
    "bert_large": model_lib.ModelConfig(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096),
    "roberta_large": model_lib.ModelConfig(model_type="roberta", vocab_size=50265, hidden_size=1024,
                                           num_layers=24, num_heads=16, intermediate_size=4096,
                                           max_position_embeddings=514, type_vocab_size=1, pad_token_id=1),
    "xlmr_base": model_lib.ModelConfig(model_type="xlm-roberta", vocab_size=250002, hidden_size=768,
                                       num_layers=12, num_heads=12, intermediate_size=3072,
                                       max_position_embeddings=514, type_vocab_size=1, pad_token_id=1),
}


def load_experiment(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("minilm_v*.py")), ids=lambda p: p.stem)
def test_paper_configs_are_valid_for_their_teachers(path):
  module = load_experiment(path)
  teacher = TEACHERS[path.stem.split("_", 2)[2]]
  for student in PAPER_STUDENTS:
    cfg = module.get_config(student)
    setup = step_lib.make_setup(cfg, teacher)
    assert cfg.max_seq_len == 512 and cfg.global_batch_size == 1024 and cfg.max_steps == 400_000
    assert setup.student.hidden_size == int(student.split("H")[1])
    assert setup.teacher.num_layers == (21 if "large" in path.stem else teacher.num_layers)
    assert setup.relation_heads == {"v1": 12, "v2": 64 if "large" in path.stem else 48}[cfg.version]
