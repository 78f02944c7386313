"""Shared fixtures: the packaged teacher, loaded once per test session."""

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
