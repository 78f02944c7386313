"""Every saved step is verified when it is read back: a digest per item, written at save.

One finished smoke run (steps 2 and 4, conftest's `finished`) is shared, copied
per case; each case damages a copy as storage or a killed process would, and checks that
`convert` and a resume refuse it naming the step and `--resume-from-step`.
"""

import json
import logging

import jax
import numpy as np
import pytest
import tokenizers

from minilm_jax import checkpoint, cli, digests, distill
from tiny import digest, fails, smoke_config


def test_every_saved_item_has_a_digest_of_what_was_saved(finished):
  record = json.loads((finished / "checkpoints" / digests.FILE).read_text())
  assert sorted(record) == ["2", "4"]
  assert all(sorted(r) == ["data", "opt_state", "params", "train"] for r in record.values())
  _, params, _, _ = checkpoint.restore_params(finished, 4)  # verified on the way
  assert digests.digest(params) == record["4"]["params"]
  host = jax.tree.map(np.array, params)  # the same numbers on the host: the same digest
  assert digests.digest(host) == record["4"]["params"]
  host["embeddings"]["word_embeddings"]["embedding"].value[7, 3] += np.float32(1e-6)
  assert digests.digest(host) != record["4"]["params"]


def test_flipped_bytes_in_a_step_s_parameters_are_refused_naming_the_step(run_copy, corpus, tmp_path):
  """XOR into 8 bytes of the largest parameter file: convert exported the damage with exit 0."""
  largest = max((p for p in (run_copy / "checkpoints" / "4" / "params").rglob("*") if p.is_file()),
                key=lambda p: p.stat().st_size)
  data = bytearray(largest.read_bytes())
  middle = len(data) // 2
  data[middle:middle + 8] = bytes(b ^ 0x5A for b in data[middle:middle + 8])
  largest.write_bytes(bytes(data))
  before = digest(run_copy)
  message = fails(["convert", "--from-checkpoint", str(run_copy), "--to-hf", str(tmp_path / "hf")])
  assert f"checkpoint {run_copy / 'checkpoints'}/4 does not match what was saved: its params " \
         "changed on disk" in message and "--resume-from-step 2" in message
  assert not (tmp_path / "hf").exists()
  with pytest.raises(ValueError, match=r"checkpoints/4 does not match what was saved: its params "
                     r"changed.*resume from step 2 with --resume-from-step 2"):
    distill.run(smoke_config(corpus=corpus), run_copy)
  assert digest(run_copy) == before
  cli.main(["convert", "--from-checkpoint", str(run_copy), "--step", "2", "--to-hf",
            str(tmp_path / "hf")])  # the earlier step is intact


def test_a_truncated_data_iterator_state_names_the_file_and_the_step_to_resume_from(run_copy, corpus):
  """It said only "Unterminated string starting at: line 1 column ..."."""
  (state,) = (run_copy / "checkpoints" / "4" / "data").glob("process_*.json")
  state.write_text(state.read_text()[:20])
  with pytest.raises(ValueError, match=rf"{state}, the data iterator state of step 4, is not valid "
                     r"JSON .*cut short: resume from step 2 with --resume-from-step 2"):
    distill.run(smoke_config(corpus=corpus), run_copy)


def test_a_changed_data_iterator_state_is_refused(run_copy, corpus):
  (state,) = (run_copy / "checkpoints" / "4" / "data").glob("process_*.json")
  saved = json.loads(state.read_text())
  state.write_text(json.dumps(saved).replace(": 4", ": 5", 1))
  assert json.loads(state.read_text()) != saved
  with pytest.raises(ValueError, match=r"checkpoints/4 does not match what was saved: its data "
                     r"changed.*--resume-from-step 2"):
    distill.run(smoke_config(corpus=corpus), run_copy)


def test_a_step_without_a_digest_is_read_with_a_warning(run_copy, caplog):
  (run_copy / "checkpoints" / digests.FILE).unlink()
  with caplog.at_level(logging.WARNING):
    checkpoint.restore_params(run_copy)
  assert "checkpoints/4 has no digest in digests.json" in caplog.text
  assert "not verified" in caplog.text


def test_resume_without_corpus_json_is_refused(run_copy, corpus):
  """A new corpus.json was written for whatever corpus the resumed run read."""
  (run_copy / "corpus.json").unlink()
  before = digest(run_copy)
  with pytest.raises(ValueError, match=r"corpus.json is missing, but the run in .* has checkpoints "
                     r"\(steps \[2, 4\]\).*restore corpus.json, or use a new --workdir"):
    distill.run(smoke_config(corpus=corpus), run_copy)
  assert digest(run_copy) == before


def test_a_checkpoint_whose_tokenizer_does_not_fit_its_model_is_refused(run_copy, tmp_path):
  """checkpoints/tokenizer/ given ids past the embedding table: `restore_params` refuses it, so
  `convert` writes no export that PyTorch would index out of range with."""
  path = run_copy / "checkpoints" / checkpoint.TOKENIZER_DIR / "tokenizer.json"
  tok = tokenizers.Tokenizer.from_file(str(path))
  tok.add_tokens(["[extra-1]", "[extra-2]"])
  tok.save(str(path))
  message = fails(["convert", "--from-checkpoint", str(run_copy), "--to-hf", str(tmp_path / "hf")])
  assert "tokenizer.json has 30524 tokens but config.json vocab_size is 30522" in message
  assert not (tmp_path / "hf").exists()
