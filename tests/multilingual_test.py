"""RoBERTa / XLM-R students end to end, offline: a tiny teacher built here, distilled, exported.

Each teacher is made inside the test: a tokenizer trained with `tokenizers` (SentencePiece-
style Unigram for XLM-R, byte-level BPE for RoBERTa) on a few shared-corpus paragraphs
(or an inline text when the shared data is absent) plus a few non-English sentences, and a
random small `XLMRobertaModel` / `RobertaModel` saved by transformers with it. The
student's export must load with `AutoTokenizer` / `AutoModel`, tokenize exactly as the
distillation did, have one embedding row per token, and match JAX to 1e-5.
"""

import pathlib

import numpy as np
import pytest
import tokenizers
import torch
import transformers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from minilm_jax import checkpoint, distill, tokenization
from minilm_jax.config import DistillConfig
from minilm_jax import model as model_lib
from conftest import SHARED_DATA

INLINE = ("Knowledge distillation trains a small student to imitate a large teacher. The student "
          "copies the self-attention of the teacher's last layer.\n\n"
          "La distillation transfère la connaissance d'un grand modèle vers un petit modèle.\n\n"
          "Die Destillation überträgt das Wissen eines großen Modells auf ein kleines.\n\n"
          "知识蒸馏把大模型的知识迁移到小模型。\n\n"
          "El estudiante imita las relaciones de autoatención del profesor.")
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # RoBERTa / XLM-R ids 0, 1, 2, 3 (mask last)


def corpus_text() -> str:
  """A few Wikipedia paragraphs of the shared corpus (when present) and the inline text."""
  wiki = SHARED_DATA / "corpus" / "wikipedia" / "squad-v1.0-train-paragraphs"
  shared = ""
  if wiki.is_dir():
    paragraphs = [p for f in sorted(wiki.glob("*.txt"))[:2] for p in f.read_text().split("\n\n")
                  if len(p) > 200]
    shared = "\n\n".join(paragraphs[:12]) + "\n\n"
  return shared + INLINE


def train_tokenizer(family: str, text: str):
  """A trained `tokenizers` tokenizer wrapped as XLMRobertaTokenizerFast / RobertaTokenizerFast."""
  lines = [p for p in text.split("\n\n") if p.strip()]
  if family == "xlm-roberta":
    tok = tokenizers.Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok.train_from_iterator(lines, trainers.UnigramTrainer(vocab_size=400, special_tokens=SPECIALS[:4],
                                                           unk_token="<unk>"))
    tok.add_special_tokens(["<mask>"])  # XLM-R's <mask> is the last id
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    wrapper = transformers.XLMRobertaTokenizerFast
  else:
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    wrapper = transformers.RobertaTokenizerFast
  names = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", sep_token="</s>",
               cls_token="<s>", pad_token="<pad>", mask_token="<mask>")
  return wrapper(tokenizer_object=tok, **names)


def build_teacher(family: str, out: pathlib.Path, text: str) -> pathlib.Path:
  tokenizer = train_tokenizer(family, text)
  kind = {"xlm-roberta": (transformers.XLMRobertaConfig, transformers.XLMRobertaModel),
          "roberta": (transformers.RobertaConfig, transformers.RobertaModel)}[family]
  config = kind[0](vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=64, max_position_embeddings=32 + 2, type_vocab_size=1,
                   pad_token_id=1, bos_token_id=0, eos_token_id=2)
  torch.manual_seed(0)
  kind[1](config).save_pretrained(out)
  tokenizer.save_pretrained(out)
  return out


@pytest.mark.parametrize("family", ["xlm-roberta", "roberta"])
def test_student_of_a_tiny_teacher_loads_in_pytorch_and_matches_jax(family, tmp_path):
  text = corpus_text()
  (tmp_path / "corpus.txt").write_text(text)
  teacher = build_teacher(family, tmp_path / "teacher", text)
  cfg = DistillConfig(teacher=str(teacher), version="v2", relation_heads=4, student_layers=1,
                      student_hidden=16, student_heads=4, corpus=str(tmp_path / "corpus.txt"),
                      max_seq_len=32, global_batch_size=8, max_steps=2, warmup_steps=1,
                      log_every=1, checkpoint_every=2, teacher_assistant="off")
  summary = distill.run(cfg, tmp_path / "run")
  assert summary["steps"] == 2 and np.isfinite(summary["last_loss"])
  export = tmp_path / "run" / "hf"

  tok = transformers.AutoTokenizer.from_pretrained(export)
  pt, info = transformers.AutoModel.from_pretrained(export, output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
  assert type(pt).__name__ == {"xlm-roberta": "XLMRobertaModel", "roberta": "RobertaModel"}[family]
  assert family.replace("-", "") in type(tok).__name__.lower()
  rows = pt.get_input_embeddings().weight.shape[0]
  assert len(tok) == rows == pt.config.vocab_size  # no tokenizer / embedding disagreement
  assert tok.pad_token_id == pt.config.pad_token_id == 1 and (tok.cls_token_id, tok.sep_token_id) == (0, 2)

  # The exported tokenizer tokenizes as the distillation did: <s> text </s> from tokenizer.json.
  sentences = ["Die Destillation überträgt das Wissen.", "知识蒸馏把大模型的知识迁移到小模型。 The teacher."]
  raw, special = tokenization.for_pretraining(teacher)
  for s in sentences:
    body = raw.encode(s, add_special_tokens=False).ids
    assert tok(s)["input_ids"] == [special.cls, *body, special.sep]

  batch = tok(sentences, padding=True, truncation=True, max_length=cfg.max_seq_len, return_tensors="np")
  with torch.no_grad():
    ref = pt.eval()(**{k: torch.tensor(v) for k, v in batch.items()}).last_hidden_state.numpy()
  config, params, _, _ = checkpoint.restore_params(tmp_path / "run")
  assert config.model_type == family and config.vocab_size == rows
  mine = model_lib.apply(config, params, batch["input_ids"], batch["attention_mask"],
                         np.zeros_like(batch["input_ids"]))
  real = batch["attention_mask"].astype(bool)
  np.testing.assert_allclose(np.asarray(mine.last_hidden_state)[real], ref[real], rtol=0, atol=1e-5)
