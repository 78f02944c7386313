"""Shared fixtures: the packaged teacher, loaded once per test session, and a tiny model of it.

Their plain helpers (tiny configs, batches, runs) are in tiny.py."""

import os
import pathlib

import pytest

# libtpu (the `tpu` extra) lets one process load it at a time; pytest's workers each may.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def teacher_dir():
  from minilm_jax.teachers import resolve_model_dir
  return resolve_model_dir("all-MiniLM-L6-v2")


@pytest.fixture(scope="session")
def teacher(teacher_dir):
  from minilm_jax import convert
  return convert.load_hf(teacher_dir)


@pytest.fixture(scope="session")
def shared_data():
  if not SHARED_DATA.is_dir():
    pytest.skip(f"{SHARED_DATA} is absent (the project's shared data sits beside the checkout)")
  return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, teacher_dir):
  """`tiny.TINY_BERT` with random weights and the teacher's tokenizer, as a Hugging Face directory."""
  from minilm_jax import convert
  from minilm_jax import model as model_lib
  from tiny import TINY_BERT
  out = tmp_path_factory.mktemp("tiny") / "hf"
  return convert.save_hf(out, TINY_BERT, model_lib.init_params(TINY_BERT, seed=3), teacher_dir)
