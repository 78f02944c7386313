"""TFDS corpora: local text files -> a prepared array_record dataset; reading one by index.

A big corpus is read, split into documents and cleaned once (`minilm_jax.documents` rules: one
document per blank-line block, line or file; Project Gutenberg boilerplate cut), then stored as
`DATA_DIR/text_corpus/1.0.0/*.array_record` with one `{"text": ...}` record per document.
Training reads it back with `tfds.data_source("text_corpus", data_dir=DATA_DIR)`, i.e. corpus
"tfds:text_corpus". `minilm_jax.documents.tfds_documents` reads any prepared TFDS dataset ("tfds:NAME[/CONFIG]
[:SPLIT]") the same way. Nothing is downloaded and TensorFlow is not needed.

  python -m minilm_jax data --build-tfds 'corpus/**/*.txt' --data-dir /data/tfds
"""

import logging
import pathlib
from typing import Sequence

from etils import epath
import tensorflow_datasets as tfds

from minilm_jax import documents

NAME = "text_corpus"


class TextCorpus(tfds.core.GeneratorBasedBuilder):
  """Documents of local text files; one record per document, in file order before TFDS shuffles.

  Without `files` the builder can only read an already prepared dataset.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "One record per document of local text files."}

  def __init__(self, *, files: str | Sequence[str] | None = None, doc_per_line: bool = False,
               doc_per_file: bool = False, **kwargs):
    self._files = files  # paths, globs or directories of .txt/.gz/.xz files
    self._doc_per_line = doc_per_line  # one document per line instead of per blank-line block
    self._doc_per_file = doc_per_file  # one document per file (book, article)
    super().__init__(**kwargs)

  # tfds 4.9.10 finds a packaged builder's code through the `importlib_resources` backport,
  # which is not installed; this file is the code, and it has no checksums.tsv beside it.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__.splitlines()[0],
        features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing is downloaded
    if self._files is None:
      raise ValueError(f"{NAME!r} is not prepared in {str(self.data_dir)!r}: build it with "
                       f"`{documents.BUILD_TFDS_COMMAND}`")
    return {"train": self._generate_examples(documents.expand_paths(self._files))}

  def _generate_examples(self, paths: list[pathlib.Path]):
    for path in paths:
      docs = documents.split_documents(documents.read_text(path), self._doc_per_line, self._doc_per_file)
      for i, doc in enumerate(docs):
        yield f"{path}:{i}", {"text": doc}


def is_built(data_dir: str | pathlib.Path | None) -> bool:
  """Whether "tfds:text_corpus" is prepared in `data_dir`, whole: a damaged one is not built."""
  if not data_dir or not documents.version_dirs(NAME, data_dir):
    return False
  try:
    documents.check_prepared(NAME, data_dir)
  except (FileNotFoundError, ValueError):
    return False
  return True


def build_text_corpus(files: str | Sequence[str], data_dir: str | pathlib.Path, *,
                      doc_per_line: bool = False, doc_per_file: bool = False,
                      overwrite: bool = False) -> pathlib.Path:
  """`python -m minilm_jax data --build-tfds FILES --data-dir DIR`: prepares "tfds:text_corpus".

  Args:
    files: text files (paths, globs, directories; comma-separated or a list).
    data_dir: TFDS data directory that receives `text_corpus/1.0.0/`.
    doc_per_line: one document per line instead of per blank-line block.
    doc_per_file: one document per file (books, articles).
    overwrite: rebuild when the dataset already exists (else it is kept as is, unless damaged).

  Returns:
    The prepared dataset's directory.
  """
  if not data_dir:
    raise ValueError("building a TFDS dataset needs a data_dir (--data-dir DIR) to write into")
  paths = documents.expand_paths(files)  # fail on a missing file before TFDS creates anything
  if not any(documents.split_documents(documents.read_text(p), doc_per_line, doc_per_file) for p in paths):
    raise ValueError(f"{files!r} holds no text ({len(paths)} files, no document): nothing was "
                     "built; pass non-empty text files")
  builder = TextCorpus(files=[str(p) for p in paths], doc_per_line=doc_per_line,
                       doc_per_file=doc_per_file, data_dir=str(data_dir),
                       file_format="array_record")
  out = pathlib.Path(str(builder.data_dir))
  if is_built(data_dir) and not overwrite:
    return out
  if documents.version_dirs(NAME, data_dir) and not overwrite:
    logging.warning("%s was not prepared to the end or is damaged: rebuilding it", out)
  mode = tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS  # regenerate the dataset, no download
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(download_mode=mode))
  return out
