"""Document sources: a corpus name -> a list of documents (strings).

MiniLM (Wang et al., 2020, Sec. 4) distils on the teacher's own pre-training data (English
Wikipedia + BookCorpus for BERT). Here a corpus is one of:

  * "demo": a small *demo corpus* of real English text that every Python install ships, the
    ~79 documentation topics of `pydoc_data.topics` (one topic = one document, ~465k chars).
  * local plain-text files: paths, globs or directories, comma-separated in one string or a
    list; `.txt`, `.gz`, `.xz`. One document per blank-line-separated block (BERT's layout),
    or per line with `doc_per_line=True`, or per file with `doc_per_file=True` (books and
    articles whose blocks are paragraphs: paragraph documents leave most of a 512-token
    example as padding). Project Gutenberg header and licence are dropped.
  * "tfds:NAME[/CONFIG][:SPLIT]" (split defaults to "train"): a TFDS dataset already prepared
    as array_record in `data_dir`, read by index with `tfds.data_source` (no TensorFlow). Each
    record's text feature is one document. `minilm_jax.corpus_tfds` prepares local text files
    this way.

Below both `minilm_jax.data` (which tokenizes and packs the documents) and
`minilm_jax.corpus_tfds` (which turns local text files into a TFDS dataset).
"""

import glob
import gzip
import lzma
import os
import pathlib
import re
from typing import Sequence

BUILD_TFDS_COMMAND = "python -m minilm_jax data --build-tfds FILES --data-dir DIR"
_TEXT_SUFFIXES = (".txt", ".gz", ".xz")
_GUTENBERG_START = re.compile(
    r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG EBOOK.*$", re.I | re.M)
_GUTENBERG_END = re.compile(r"^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG EBOOK.*$", re.I | re.M)


def demo_documents() -> list[str]:
  """The demo corpus: Python's documentation topics (`pydoc_data.topics`), one per document."""
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  return [topics.topics[k].strip() for k in sorted(topics.topics) if topics.topics[k].strip()]


def expand_paths(files: str | Sequence[str]) -> list[pathlib.Path]:
  """Paths, globs and directories (all .txt/.gz/.xz inside, recursively) -> sorted file list."""
  specs = files.split(",") if isinstance(files, str) else list(files)
  paths = []
  for spec in (str(s).strip() for s in specs):
    if not spec:
      continue
    if glob.has_magic(spec):
      found = sorted(glob.glob(os.path.expanduser(spec), recursive=True))
      if not found:
        raise FileNotFoundError(f"corpus glob {spec!r} matches no file")
      paths += [pathlib.Path(p) for p in found if os.path.isfile(p)]
    elif os.path.isdir(spec):
      found = sorted(p for p in pathlib.Path(spec).rglob("*") if p.suffix in _TEXT_SUFFIXES)
      if not found:
        raise FileNotFoundError(f"corpus directory {spec!r} holds no .txt/.gz/.xz file")
      paths += found
    elif os.path.isfile(os.path.expanduser(spec)):
      paths.append(pathlib.Path(spec).expanduser())
    else:
      raise FileNotFoundError(
          f"corpus file {spec!r} does not exist: pass text files, globs or directories, "
          "'demo', or 'tfds:NAME[/CONFIG][:SPLIT]' for a prepared TFDS dataset")
  if not paths:
    raise FileNotFoundError(f"corpus {files!r} names no file")
  return paths


def read_text(path: str | pathlib.Path) -> str:
  """Reads one UTF-8 text file (.gz and .xz decompressed) with any Gutenberg boilerplate cut."""
  path = pathlib.Path(path)
  opener = {".gz": gzip.open, ".xz": lzma.open}.get(path.suffix, open)
  try:
    with opener(path, "rt", encoding="utf-8-sig") as f:
      text = f.read()
  except FileNotFoundError:
    raise FileNotFoundError(f"corpus file {str(path)!r} does not exist") from None
  except (OSError, EOFError, lzma.LZMAError, UnicodeDecodeError) as e:
    raise ValueError(
        f"cannot read corpus file {str(path)!r} ({type(e).__name__}: {e}): it must be UTF-8 "
        "text, gzip (.gz) or xz (.xz); re-download or re-compress it") from e
  return strip_gutenberg(text)


def strip_gutenberg(text: str) -> str:
  """Keeps only the book between the '*** START/END OF THE PROJECT GUTENBERG EBOOK' lines."""
  start = _GUTENBERG_START.search(text)
  if start:
    text = text[start.end():]
  end = _GUTENBERG_END.search(text)
  if end:
    text = text[:end.start()]
  return text


def split_documents(text: str, doc_per_line: bool = False,
                    doc_per_file: bool = False) -> list[str]:
  """Blank-line-separated blocks (lines joined by spaces), lines, or the whole text as documents.

  With doc_per_file the blocks are kept as lines of one document; empty documents are dropped.
  """
  if doc_per_line and doc_per_file:
    raise ValueError("doc_per_line and doc_per_file exclude each other: pass at most one")
  if doc_per_file:
    doc = "\n".join(split_documents(text))
    return [doc] if doc else []
  if doc_per_line:
    return [line.strip() for line in text.splitlines() if line.strip()]
  blocks = re.split(r"\n\s*\n", text)
  docs = (" ".join(line.strip() for line in block.splitlines() if line.strip()) for block in blocks)
  return [d for d in docs if d]


def parse_tfds_corpus(corpus: str) -> tuple[str, str]:
  """'tfds:NAME[/CONFIG][:SPLIT]' -> (name, split); the split defaults to 'train'."""
  name, _, split = corpus.removeprefix("tfds:").partition(":")
  if not name:
    raise ValueError(f"corpus {corpus!r}: expected 'tfds:NAME[/CONFIG][:SPLIT]'")
  return name, split or "train"


def tfds_documents(corpus: str, data_dir: str | None, text_feature: str = "text",
                   max_documents: int | None = None) -> list[str]:
  """Reads the text feature of every record of a prepared TFDS dataset (no download)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (heavy; TFDS corpora only)
  name, split = parse_tfds_corpus(corpus)
  check_prepared(name, data_dir)
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except (tfds.core.registered.DatasetNotFoundError, AssertionError, FileNotFoundError,
          NotImplementedError) as e:  # NotImplementedError: registered builder, not prepared
    raise FileNotFoundError(
        f"TFDS dataset {name!r} (split {split!r}) is not prepared in data_dir {data_dir!r}: "
        "nothing is downloaded. Prepare it offline as array_record (`tfds build NAME "
        "--data_dir DIR --file_format=array_record`), or turn local text files into one with "
        f"`{BUILD_TFDS_COMMAND}` (then --corpus tfds:text_corpus)") from e
  n = len(source) if max_documents is None else min(len(source), max_documents)
  docs = []
  for lo in range(0, n, 1024):
    for record in source.__getitems__(list(range(lo, min(n, lo + 1024)))):
      if text_feature not in record:
        raise ValueError(f"TFDS dataset {name!r} has no feature {text_feature!r}; it has "
                         f"{sorted(record)}: pass the text feature's name")
      text = record[text_feature]
      docs.append(text.decode("utf-8") if isinstance(text, bytes) else str(text))
  return docs


def load_documents(corpus: str | Sequence[str], *, data_dir: str | None = None,
                   doc_per_line: bool = False, doc_per_file: bool = False,
                   text_feature: str = "text", max_documents: int | None = None) -> list[str]:
  """Documents of 'demo', 'tfds:...' or local text files (see the module docstring)."""
  if isinstance(corpus, str) and corpus == "demo":
    docs = demo_documents()
  elif isinstance(corpus, str) and corpus.startswith("tfds:"):
    docs = tfds_documents(corpus, data_dir, text_feature, max_documents)
  else:
    docs = [d for p in expand_paths(corpus)
            for d in split_documents(read_text(p), doc_per_line, doc_per_file)]
  return docs[:max_documents]


def check_prepared(name: str, data_dir: str | pathlib.Path | None) -> None:
  """Raises naming the directory and the fix when a prepared version of TFDS dataset `name`
  ("NAME[/CONFIG]") in `data_dir` (default TFDS's) lacks its `dataset_info.json` or holds an
  array_record shard that is missing, truncated or corrupt (counted against the info's records),
  as a build cut short leaves it. A dataset with no version folder is left to TFDS's reader."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (heavy; TFDS corpora only)
  fix = (f"rebuild it (`{BUILD_TFDS_COMMAND}` for local text files, else `tfds build {name} "
         "--data_dir DIR --file_format=array_record`)")
  for version_dir in version_dirs(name, data_dir or tfds.core.constants.DATA_DIR):
    if not (version_dir / "dataset_info.json").is_file():
      raise FileNotFoundError(f"{version_dir} has no dataset_info.json: the TFDS dataset was not "
                              f"prepared to the end; {fix}")
    try:
      splits = tfds.builder_from_directory(str(version_dir)).info.splits.values()
    except Exception as e:  # TFDS raises several types for a garbled info file
      raise ValueError(f"{version_dir}/dataset_info.json is unreadable ({e}); {fix}") from e
    for split in splits:
      for path, length in zip(split.filepaths, split.shard_lengths):
        if ".array_record" in path.name and _records(path) != length:
          raise ValueError(f"{version_dir}: shard {path.name} is missing, truncated or corrupt "
                           f"(its split {split.name!r} lists {length} records in it); {fix}")


def version_dirs(name: str, data_dir: str | pathlib.Path) -> list[pathlib.Path]:
  """The prepared version folders ("1.0.0", ...) of TFDS dataset `name` in `data_dir`."""
  return [d for d in pathlib.Path(data_dir, name).glob("*") if re.fullmatch(r"\d+\.\d+\.\d+", d.name)]


def _records(path) -> int | None:
  """How many records an array_record shard holds; None when it is absent or unreadable."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  try:
    reader = array_record_module.ArrayRecordReader(str(path))
    count = reader.num_records()
    reader.close()  # a torn shard opens with 0 records and raises here
  except RuntimeError:
    return None
  return count
