"""HF <-> Orbax <-> HF conversion: exact round trips, PyTorch loading, clear errors."""

import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from minilm_jax import checkpoint, convert, model as model_lib

IDS = np.array([[101, 7592, 2088, 2003, 1037, 3231, 102, 0, 0],
                [101, 2460, 2028, 102, 0, 0, 0, 0, 0]], np.int32)
MASK = (IDS != 0).astype(np.int32)


def torch_hidden(model_dir, ids=IDS, mask=MASK):
  pt = transformers.AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()
  with torch.no_grad():
    return pt(input_ids=torch.tensor(ids, dtype=torch.long),
              attention_mask=torch.tensor(mask, dtype=torch.long)).last_hidden_state.numpy()


def cli(*args):
  return subprocess.run([sys.executable, "-m", "minilm_jax", *map(str, args)], capture_output=True,
                        text=True, timeout=300)


def test_round_trip_is_bit_identical(teacher_dir, tmp_path):
  ck, hf = tmp_path / "ck", tmp_path / "hf"
  assert cli("convert", "--from-hf", teacher_dir, "--to", ck).returncode == 0
  assert cli("convert", "--from-checkpoint", ck, "--step", 0, "--to-hf", hf).returncode == 0
  src = safetensors.numpy.load_file(teacher_dir / "model.safetensors")
  out = safetensors.numpy.load_file(hf / "model.safetensors")
  assert set(src) - set(out) == {"embeddings.position_ids"}  # a buffer, not a weight
  for name, value in out.items():
    assert value.dtype == src[name].dtype and np.array_equal(value, src[name]), name
  _, info = transformers.AutoModel.from_pretrained(hf, output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
  np.testing.assert_array_equal(torch_hidden(hf), torch_hidden(teacher_dir))
  tok = transformers.AutoTokenizer.from_pretrained(hf)
  assert tok("hello world")["input_ids"] == [101, 7592, 2088, 102]


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_fresh_student_export_matches_pytorch(teacher_dir, tmp_path, model_type):
  extra = dict(pad_token_id=1, type_vocab_size=1, max_position_embeddings=514) if model_type == "roberta" else {}
  config = model_lib.ModelConfig(model_type=model_type, num_layers=3, hidden_size=384, num_heads=12,
                                 intermediate_size=1536, **extra)
  params = model_lib.init_params(config, seed=3)
  convert.save_hf(tmp_path / "hf", config, params, teacher_dir)
  ids = np.where(IDS == 0, config.pad_token_id, IDS)  # RoBERTa pads with its own id
  mine = model_lib.apply(config, params, ids, MASK).last_hidden_state
  real = MASK.astype(bool)
  np.testing.assert_allclose(np.asarray(mine)[real], torch_hidden(tmp_path / "hf", ids)[real], rtol=0, atol=1e-5)
  hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert hf_config["model_type"] == model_type
  assert hf_config["architectures"] == [{"bert": "BertModel", "roberta": "RobertaModel"}[model_type]]
  assert model_lib.ModelConfig.from_hf(hf_config) == config


def test_pytorch_model_bin_is_read_with_weights_only(teacher_dir, tmp_path):
  src = tmp_path / "bin"
  src.mkdir()
  for name in ("config.json", "tokenizer.json", "vocab.txt"):
    shutil.copy(teacher_dir / name, src / name)
  tensors = safetensors.numpy.load_file(teacher_dir / "model.safetensors")
  torch.save({"bert." + k: torch.from_numpy(v) for k, v in tensors.items()}, src / "pytorch_model.bin")
  config, params = convert.load_hf(src)
  _, ref = convert.load_hf(teacher_dir)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)):
    np.testing.assert_array_equal(a, b)


@pytest.fixture
def hf_copy(teacher_dir, tmp_path):
  d = tmp_path / "model"
  shutil.copytree(teacher_dir, d)
  return d


def edit_config(d, **changes):
  cfg = json.loads((d / "config.json").read_text()) | changes
  (d / "config.json").write_text(json.dumps(cfg))


def test_error_missing_config(hf_copy):
  (hf_copy / "config.json").unlink()
  with pytest.raises(FileNotFoundError, match="config.json is missing"):
    convert.load_hf(hf_copy)


def test_error_missing_weights(hf_copy):
  (hf_copy / "model.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="neither model.safetensors nor pytorch_model.bin"):
    convert.load_hf(hf_copy)


def test_error_corrupt_weights(hf_copy):
  data = (hf_copy / "model.safetensors").read_bytes()
  (hf_copy / "model.safetensors").write_bytes(data[: len(data) // 2])
  with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
    convert.load_hf(hf_copy)


def test_error_unknown_architecture(hf_copy):
  edit_config(hf_copy, model_type="gpt2")
  with pytest.raises(ValueError, match="config.json: unknown model_type 'gpt2'"):
    convert.load_hf(hf_copy)


def test_error_shape_mismatch(hf_copy):
  edit_config(hf_copy, intermediate_size=1024)
  with pytest.raises(ValueError, match="intermediate.dense.weight has shape \\(1536, 384\\), but "
                     "config.json implies \\(1024, 384\\)"):
    convert.load_hf(hf_copy)


def _edit_weights(d, edit):
  tensors = safetensors.numpy.load_file(d / "model.safetensors")
  edit(tensors)
  safetensors.numpy.save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})


def test_error_weights_beyond_config(hf_copy):
  """A teacher's weights match its config.json both ways: a stray tensor, or layers and a
  pooler that config.json says are not there, are refused by name, not ignored."""
  _edit_weights(hf_copy, lambda t: t.update(stray=np.zeros(3, np.float32)))
  with pytest.raises(ValueError, match="model.safetensors holds 1 tensors that config.json does not "
                     "imply: stray; .*fix config.json or export the model again"):
    convert.load_hf(hf_copy)
  _edit_weights(hf_copy, lambda t: t.pop("stray"))
  edit_config(hf_copy, num_hidden_layers=5, add_pooling_layer=False)
  with pytest.raises(ValueError, match="holds 18 tensors that config.json does not imply: encoder.layer.5."):
    convert.load_hf(hf_copy)
  edit_config(hf_copy, num_hidden_layers=7, add_pooling_layer=True)
  with pytest.raises(ValueError, match="lacks 16 tensors that config.json implies, e.g. "
                     "\\['encoder.layer.6.attention.self.query.weight'"):
    convert.load_hf(hf_copy)


def test_a_masked_lm_teachers_head_is_not_read(hf_copy, teacher):
  """A teacher saved as a task model (BertForMaskedLM: encoder under "bert.", head under "cls.")
  gives its encoder; the head is not the encoder's and not refused."""
  def as_masked_lm(tensors):
    for name in list(tensors):
      tensors[f"bert.{name}"] = tensors.pop(name)
    tensors["cls.predictions.bias"] = np.zeros(30522, np.float32)
  _edit_weights(hf_copy, as_masked_lm)
  _, params = convert.load_hf(hf_copy)
  jax.tree.map(np.testing.assert_array_equal, params.to_pure_dict(), teacher[1].to_pure_dict())


def test_error_vocab_disagrees_with_tokenizer(hf_copy):
  """Weights and config.json agree on 1,000 embedding rows; the tokenizer has 30,522 ids."""
  tensors = safetensors.numpy.load_file(hf_copy / "model.safetensors")
  tensors["embeddings.word_embeddings.weight"] = tensors["embeddings.word_embeddings.weight"][:1000]
  safetensors.numpy.save_file(tensors, hf_copy / "model.safetensors", metadata={"format": "pt"})
  edit_config(hf_copy, vocab_size=1000)
  with pytest.raises(ValueError, match="tokenizer.json has 30522 tokens but config.json vocab_size is 1000"):
    convert.load_hf(hf_copy)


def test_error_missing_tokenizer(hf_copy):
  (hf_copy / "tokenizer.json").unlink()
  with pytest.raises(FileNotFoundError, match="tokenizer.json is missing.*save_pretrained"):
    convert.load_hf(hf_copy)


def test_error_unknown_name_does_not_download():
  with pytest.raises(FileNotFoundError, match="neither a packaged teacher.*nothing is downloaded"):
    convert.load_hf("bert-base-uncased")


def test_existing_output_is_kept_whole(teacher, teacher_dir, tmp_path, monkeypatch):
  config, params = teacher
  out = tmp_path / "hf"
  out.mkdir()
  (out / "precious.txt").write_text("keep me")
  result = cli("convert", "--from-hf", teacher_dir, "--to", out)
  assert result.returncode != 0 and "already exists" in result.stderr and "--overwrite" in result.stderr
  assert (out / "precious.txt").read_text() == "keep me"
  # A failure half-way (weights written, then the sentence-transformers files fail) leaves
  # the old directory untouched and no temporary behind.
  def fail(*args):
    raise OSError("No space left on device")
  with monkeypatch.context() as m:
    m.setattr(convert.sentence_transformers_files, "copy", fail)
    with pytest.raises(OSError, match="No space left"):
      convert.save_hf(out, config, params, teacher_dir, overwrite=True)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
  assert (out / "precious.txt").read_text() == "keep me"
  convert.save_hf(out, config, params, teacher_dir, overwrite=True)
  assert not (out / "precious.txt").exists() and (out / "model.safetensors").is_file()


def test_error_missing_or_corrupt_checkpoint(teacher, teacher_dir, tmp_path):
  config, params = teacher
  with pytest.raises(FileNotFoundError, match="does not exist"):
    checkpoint.restore_params(tmp_path / "nowhere")
  ck = checkpoint.save_model(tmp_path / "ck", config, params, teacher_dir)
  with pytest.raises(FileNotFoundError, match="has no step 7; it has steps \\[0\\]"):
    checkpoint.restore_params(ck, 7)
  for f in (ck / "0" / "params").rglob("*"):
    if f.is_file() and f.stat().st_size > 1000:
      f.write_bytes(b"\0" * 16)
  with pytest.raises(ValueError, match="could not be restored.*corrupt"):
    checkpoint.restore_params(ck)
  (ck / "model.json").write_text("{not json")
  with pytest.raises(ValueError, match="model.json is corrupt"):
    checkpoint.restore_params(ck)
