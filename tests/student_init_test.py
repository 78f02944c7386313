"""student_init: the student starts as the teacher cut to chosen layers, bit for bit, and its
export at step 0 is that cut in PyTorch; shapes and choices it cannot honour are refused."""

import dataclasses

import jax
import numpy as np
import pytest
import torch
import transformers

from minilm_jax import cli, optimizer as optimizer_lib, sharding, student_init, teacher_assistant
from minilm_jax import model as model_lib
from minilm_jax import step as step_lib
from minilm_jax.config import DistillConfig, check_config
from tiny import packed_batch

TEACHER = model_lib.ModelConfig(num_layers=12, hidden_size=384, num_heads=12, intermediate_size=1536)


def layers_of(spec, student_layers, teacher=TEACHER):
  """1-based teacher layers that `spec` gives a student of `student_layers` layers."""
  student = teacher.replace(num_layers=student_layers)
  return [n + 1 for n in student_init.teacher_layers(spec, teacher, student)]


def test_spaced_layers_end_at_the_last_and_lists_are_taken_as_given():
  assert layers_of("spaced", 3, TEACHER.replace(num_layers=6)) == [2, 4, 6]
  assert layers_of("spaced", 6) == [2, 4, 6, 8, 10, 12]  # all-MiniLM-L6-v2 from MiniLM-L12
  assert layers_of("spaced", 5) == [2, 4, 7, 9, 12]
  assert layers_of("spaced", 12) == list(range(1, 13))
  assert layers_of("1,3,5,8,10,12", 6) == [1, 3, 5, 8, 10, 12]  # DistilBERT's [0, 2, 4, 7, 9, 11]
  assert layers_of("random", 3) == []


@pytest.mark.parametrize("spec, student, error", [
    ("2,4", {}, r"names 2 teacher layers for a student of 3 layers \(student_layers\)"),
    ("2,4,13", {}, r"layers \[13\] are out of range, the teacher has 12 layers \(use 1..12\)"),
    ("spaced", {"num_layers": 13}, r"student_init='spaced' needs at most the teacher's 12 layers"),
    ("spaced", {"hidden_size": 192, "num_heads": 12, "intermediate_size": 768},
     r"\(hidden_size 192 != 384; intermediate_size 768 != 1536\): set student_hidden=384, "
     r"student_heads=12, student_intermediate=1536, or student_init='random'"),
    ("spaced", {"num_heads": 6}, r"\(num_heads 6 != 12\)"),
    ("spaced", {"intermediate_size": 1024}, r"\(intermediate_size 1024 != 1536\)"),
])
def test_a_student_the_teacher_layers_do_not_fit_is_refused(spec, student, error):
  with pytest.raises(ValueError, match=error):
    student_init.teacher_layers(spec, TEACHER, TEACHER.replace(**{"num_layers": 3} | student))


@pytest.mark.parametrize("spec", ["2;4;6", "0,2,4", "layers", "", "2,,4"])
def test_a_malformed_choice_is_refused_by_check_config(spec):
  with pytest.raises(ValueError, match=rf"student_init={spec!r} is not 'random', 'spaced' or 1-based"):
    check_config(DistillConfig(student_init=spec))


def test_masked_lm_and_a_teacher_assistant_refuse_student_init(tmp_path):
  with pytest.raises(ValueError, match="objective='mlm' is the masked-LM baseline .* student_init='random'"):
    check_config(DistillConfig(student_init="spaced", objective="mlm"))
  cfg = DistillConfig(student_init="spaced", teacher_assistant="on")
  with pytest.raises(ValueError, match="would be the teacher itself: set teacher_assistant='off'"):
    teacher_assistant.stages(cfg, TEACHER, tmp_path)
  assert len(teacher_assistant.stages(dataclasses.replace(cfg, student_init="random"), TEACHER, tmp_path)) == 2


def test_step_zero_is_the_chosen_teacher_layers_bit_for_bit(teacher):
  config, params = teacher
  cfg = DistillConfig(student_layers=3, student_init="2,3,6", max_seq_len=32, global_batch_size=8)
  setup = step_lib.make_setup(cfg, config)
  optimizer = optimizer_lib.for_distillation(cfg)
  with pytest.raises(ValueError, match=r"copies teacher layers \[2, 3, 6\]: .* teacher_params"):
    step_lib.init_state(cfg, setup, optimizer)
  mesh = sharding.make_mesh()
  on_device = jax.device_put(params, sharding.replicated(mesh))  # what a donated copy would delete
  state = step_lib.init_state(cfg, setup, optimizer, teacher_params=on_device)
  student, full = state.params.to_pure_dict(), on_device.to_pure_dict()
  pairs = [(student["embeddings"], full["embeddings"]), (student["pooler"], full["pooler"])]
  pairs += [(student["layers"][i], full["layers"][n]) for i, n in enumerate((1, 2, 5))]
  for mine, theirs in pairs:
    jax.tree.map(np.testing.assert_array_equal, mine, theirs)
  abstract = step_lib.abstract_inputs(cfg, setup, optimizer, mesh)[0]  # needs no teacher (aot)
  shapes = lambda tree: [(x.shape, x.dtype) for x in jax.tree.leaves(tree)]
  assert shapes(abstract) == shapes(state)
  step = step_lib.make_train_step(setup, optimizer, mesh)
  state, _ = step(jax.device_put(state, sharding.replicated(mesh)),
                  step_lib.truncate_teacher(setup, on_device), sharding.global_batch(packed_batch(8, 32), mesh))
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(on_device))  # not donated


def test_export_at_step_zero_is_the_teacher_cut_in_pytorch(tmp_path, teacher_dir):
  # warmup_steps=1: the first step's learning rate is 0, so step 1 holds step 0's weights.
  cli.main(["distill", "--config=experiments/configs/demo.py:smoke", f"--workdir={tmp_path}",
            "--config.student_layers=3", "--config.student_hidden=384", "--config.student_heads=12",
            "--config.student_init=2,4,6", "--config.max_steps=1", "--config.warmup_steps=1",
            "--config.teacher_assistant=off"])
  student = transformers.AutoModel.from_pretrained(tmp_path / "hf").eval()
  cut = transformers.AutoModel.from_pretrained(teacher_dir).eval()
  cut.encoder.layer = torch.nn.ModuleList([cut.encoder.layer[n - 1] for n in (2, 4, 6)])
  for name, tensor in student.state_dict().items():  # bit for bit, the pooler included
    torch.testing.assert_close(tensor, cut.state_dict()[name], rtol=0, atol=0, msg=name)
  batch = {k: torch.as_tensor(v, dtype=torch.long) for k, v in packed_batch(4, 40).items()}
  with torch.no_grad():
    mine, theirs = student(**batch, output_hidden_states=True), cut(**batch, output_hidden_states=True)
  assert len(mine.hidden_states) == 4
  real = batch["attention_mask"].bool()
  for a, b in zip(mine.hidden_states, theirs.hidden_states):
    np.testing.assert_allclose(a[real].numpy(), b[real].numpy(), rtol=0, atol=1e-6)
