"""Shared fixtures: the packaged teacher, loaded once per test session, a tiny model of it, and a
finished smoke run to copy.

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


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
  """The demo documents as two text files (a corpus a test may copy and change)."""
  from minilm_jax import documents
  out = tmp_path_factory.mktemp("corpus")
  docs = documents.demo_documents()
  (out / "a.txt").write_text("\n\n".join(docs[:len(docs) // 2]) + "\n")
  (out / "b.txt").write_text("\n\n".join(docs[len(docs) // 2:]) + "\n")
  return out


@pytest.fixture(scope="session")
def finished(tmp_path_factory, corpus):
  """A completed smoke run (steps 2 and 4, exported) on `corpus`, to be copied, never changed."""
  from minilm_jax import distill
  from tiny import smoke_config
  workdir = tmp_path_factory.mktemp("finished") / "run"
  distill.run(smoke_config(corpus=corpus), workdir)
  return workdir


@pytest.fixture
def run_copy(finished, tmp_path):
  import shutil
  out = tmp_path / "run"
  shutil.copytree(finished, out)
  return out
