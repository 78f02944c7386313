"""Tiny RoBERTa / XLM-R teachers built offline: a tokenizer trained with `tokenizers`
(SentencePiece-style Unigram for XLM-R, byte-level BPE for RoBERTa) and a random small
`XLMRobertaModel` / `RobertaModel` saved by transformers with it."""

import pathlib

import tokenizers
import torch
import transformers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

INLINE = ("Knowledge distillation trains a small student to imitate a large teacher. The student "
          "copies the self-attention of the teacher's last layer.\n\n"
          "La distillation transfère la connaissance d'un grand modèle vers un petit modèle.\n\n"
          "Die Destillation überträgt das Wissen eines großen Modells auf ein kleines.\n\n"
          "知识蒸馏把大模型的知识迁移到小模型。\n\n"
          "El estudiante imita las relaciones de autoatención del profesor.")
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # RoBERTa / XLM-R ids 0, 1, 2, 3 (mask last)


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
  """A random small `family` model and its tokenizer trained on `text`, saved in `out`."""
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
