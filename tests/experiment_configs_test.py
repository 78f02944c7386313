"""experiments/configs/: every variant of every config file is a valid run, each file's
`smoke` variant distils one step through the command line, and the paper recipes fit the
shapes of the papers' teachers.

A paper config's smoke variant swaps in the packaged teacher all-MiniLM-L6-v2 itself
(`common.PACKAGED_TEACHER`): the papers' teachers are not packaged, so the test runs the
file as a user would, substituting nothing.
"""

import importlib
import pathlib

import pytest

from minilm_jax import cli, losses, model as model_lib, teacher_assistant
from minilm_jax import step as step_lib
from minilm_jax.config import check_config
from minilm_jax.metric_writer import read_metrics

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "configs"
FILES = sorted(p for p in CONFIGS.glob("*.py") if "\ndef get_config(" in p.read_text())

TEACHERS = {  # the shapes of the papers' teachers, as their config.json files give them
    "bert-base": model_lib.ModelConfig(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
    "bert-large": model_lib.ModelConfig(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096),
    "roberta-large": model_lib.ModelConfig(model_type="roberta", vocab_size=50265, hidden_size=1024,
                                           num_layers=24, num_heads=16, intermediate_size=4096,
                                           max_position_embeddings=514, type_vocab_size=1, pad_token_id=1),
    "xlmr-base": model_lib.ModelConfig(model_type="xlm-roberta", vocab_size=250002, hidden_size=768,
                                       num_layers=12, num_heads=12, intermediate_size=3072,
                                       max_position_embeddings=514, type_vocab_size=1, pad_token_id=1),
}


def load(name):
  return importlib.import_module(f"experiments.configs.{name}")


def test_the_glob_finds_the_config_files_and_not_their_helper():
  assert {"ablations", "demo", "distilbert_cosine", "paper", "tinybert_attention"} <= {p.stem for p in FILES} - {"common"}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_every_variant_and_its_smoke_passes_check_config(path):
  module = load(path.stem)
  for name in module.NAMES:
    for variant in (name, ",".join(filter(None, (name, "smoke")))):
      check_config(module.get_config(variant))
  with pytest.raises(ValueError, match=r"variant 'smok' is unknown: did you mean 'smoke'\?"):
    module.get_config("smok")


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_smoke_variant_distils_one_step(path, tmp_path):
  cli.main(["distill", f"--config={path}:smoke", f"--workdir={tmp_path}", "--config.max_steps=1",
            "--config.log_every=1", "--config.export_hf=False"])
  last_stage = tmp_path / "student"  # tinybert's 2 x 96 student goes through an assistant
  records = read_metrics(last_stage if last_stage.is_dir() else tmp_path)
  assert [r["step"] for r in records] == [1] and records[0]["loss/total"] > 0


@pytest.mark.parametrize("name", load("paper").NAMES)
def test_paper_configs_fit_their_teachers(name):
  cfg = load("paper").get_config(name)
  teacher_name = name[3:].rsplit("-", 2)[0]
  teacher = TEACHERS[teacher_name]
  setup = step_lib.make_setup(cfg, teacher)
  layers, hidden = (int(x[1:]) for x in name.rsplit("-", 2)[1:])
  assert cfg.max_seq_len == 512 and cfg.global_batch_size == 1024 and cfg.max_steps == 400_000
  assert (setup.student.num_layers, setup.student.hidden_size) == (layers, hidden)
  assert setup.teacher.num_layers == (21 if "large" in name else teacher.num_layers)
  assert setup.relation_heads == {"v1": 12, "v2": 64 if "large" in name else 48}[cfg.version]
  assert setup.student.vocab_size == teacher.vocab_size
  assert setup.student.max_position_embeddings == teacher.max_position_embeddings
  with_assistant = hidden == 384 and (layers <= 6 or "large" in name)  # M <= L/2 and D' <= D/2
  assert teacher_assistant.uses_assistant(cfg, teacher) == with_assistant


def test_ablations_keep_the_named_terms(teacher):
  module = load("ablations")
  for name, terms in module.TERMS.items():
    cfg = module.get_config(name)
    assert cfg.loss_terms == terms and cfg.max_steps == 400_000
    assert losses.check_terms(cfg.version, cfg.loss_terms) == terms
    setup = step_lib.make_setup(module.get_config(f"{name},smoke"), teacher[0])
    assert setup.loss.keywords["terms"] == terms
