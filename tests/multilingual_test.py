"""RoBERTa / XLM-R students end to end, offline: a tiny teacher built here, distilled, exported.

Each teacher is made inside the test: a tokenizer trained with `tokenizers` (SentencePiece-
style Unigram for XLM-R, byte-level BPE for RoBERTa) on a few shared-corpus paragraphs
(or an inline text when the shared data is absent) plus a few non-English sentences, and a
random small `XLMRobertaModel` / `RobertaModel` saved by transformers with it. The
student's export must load with `AutoTokenizer` / `AutoModel`, tokenize exactly as the
distillation did, have one embedding row per token, and match JAX to 1e-5.
"""

import numpy as np
import pytest
import torch
import transformers

from minilm_jax import checkpoint, distill, tokenization
from minilm_jax.config import DistillConfig
from minilm_jax import model as model_lib
from conftest import SHARED_DATA
from roberta_family import INLINE, build_teacher


def corpus_text() -> str:
  """A few Wikipedia paragraphs of the shared corpus (when present) and the inline text."""
  wiki = SHARED_DATA / "corpus" / "wikipedia" / "squad-v1.0-train-paragraphs"
  shared = ""
  if wiki.is_dir():
    paragraphs = [p for f in sorted(wiki.glob("*.txt"))[:2] for p in f.read_text().split("\n\n")
                  if len(p) > 200]
    shared = "\n\n".join(paragraphs[:12]) + "\n\n"
  return shared + INLINE


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
