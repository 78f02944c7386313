"""The model's own fast tokenizer: reading `tokenizer.json`, a plain copy, the special ids.

Every path that tokenizes (pre-training data, masked LM, GLUE and SQuAD features, the
export checks) reads the file through `load`, so a missing or unreadable file gets one
error that names the fix; nothing downloads or falls back to a slow tokenizer.
"""

import dataclasses
import json
import pathlib

import tokenizers

# The files of a Hugging Face tokenizer that an export or a checkpoint copies (those present).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "vocab.json", "merges.txt", "sentencepiece.bpe.model", "spiece.model",
                   "added_tokens.json")
# Special tokens tried when the model dir names none: BERT WordPiece, then XLM-R SentencePiece.
_SPECIAL_CANDIDATES = {"cls": ("[CLS]", "<s>"), "sep": ("[SEP]", "</s>"), "pad": ("[PAD]", "<pad>")}


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  """Ids of the model's special tokens: [CLS]/[SEP]/[PAD] (BERT) or <s>/</s>/<pad> (XLM-R)."""
  cls: int  # starts every example
  sep: int  # ends every segment
  pad: int  # fills the tail past attention_mask


def load(model_dir: str | pathlib.Path) -> tokenizers.Tokenizer:
  """`model_dir/tokenizer.json` as saved (its own truncation / padding settings kept)."""
  path = pathlib.Path(model_dir).expanduser() / "tokenizer.json"
  if not path.is_file():
    raise FileNotFoundError(
        f"{path} not found (tokenizer.json is missing): minilm_jax tokenizes with the model's fast "
        "tokenizer; write it once with transformers.AutoTokenizer.from_pretrained(DIR)"
        ".save_pretrained(DIR)")
  try:
    return tokenizers.Tokenizer.from_file(str(path))
  except Exception as e:
    raise ValueError(f"{path} is not a readable tokenizers file ({e})") from e


def check_fits(model_dir: str | pathlib.Path, vocab_size: int) -> pathlib.Path:
  """Checks that `model_dir`'s tokenizer.json exists and that its ids fit an embedding table
  of `vocab_size` rows (config.json's); returns its path."""
  path = pathlib.Path(model_dir).expanduser() / "tokenizer.json"
  _check_size(load(model_dir), vocab_size, path)
  return path


def _check_size(tokenizer: tokenizers.Tokenizer, vocab_size: int, path: pathlib.Path) -> None:
  size = tokenizer.get_vocab_size(with_added_tokens=True)
  if size > vocab_size:
    raise ValueError(f"{path} has {size} tokens but config.json vocab_size is {vocab_size}: "
                     "the tokenizer does not belong to this model; use the model's own tokenizer")


def plain(tokenizer: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
  """A copy with truncation and padding off (tokenizer.json files often ship them at 128 or
  512), for counting and cutting by true lengths."""
  copy = tokenizers.Tokenizer.from_str(tokenizer.to_str())
  copy.no_truncation()
  copy.no_padding()
  return copy


def _named_special(model_dir: pathlib.Path, key: str) -> str | None:
  for name in ("special_tokens_map.json", "tokenizer_config.json"):
    path = model_dir / name
    if path.is_file():
      value = json.loads(path.read_text()).get(f"{key}_token")
      if isinstance(value, dict):
        value = value.get("content")
      if value:
        return value
  return None


def for_pretraining(model_dir: str | pathlib.Path,
                    vocab_size: int | None = None) -> tuple[tokenizers.Tokenizer, SpecialIds]:
  """The `plain` tokenizer of a model directory, reading a literal "[SEP]" or "<s>" in the
  text as text, and its special token ids (named in the dir's special_tokens_map.json or
  tokenizer_config.json, else BERT's, else XLM-R's). With the model's `vocab_size`, its ids
  are checked to fit the embedding table (`check_fits`), from the same single read."""
  model_dir = pathlib.Path(model_dir).expanduser()
  tok = load(model_dir)
  if vocab_size is not None:
    _check_size(tok, vocab_size, model_dir / "tokenizer.json")
  tok = plain(tok)
  tok.encode_special_tokens = True
  ids = {}
  for key, candidates in _SPECIAL_CANDIDATES.items():
    named = _named_special(model_dir, key)
    for token in ((named,) if named else candidates):
      if tok.token_to_id(token) is not None:
        ids[key] = tok.token_to_id(token)
        break
    else:
      raise ValueError(f"tokenizer {str(model_dir / 'tokenizer.json')!r} has no {key} token "
                       f"({named or candidates}): name it in special_tokens_map.json")
  return tok, SpecialIds(**ids)
