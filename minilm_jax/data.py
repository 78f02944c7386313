"""Pre-training input pipeline: text -> teacher tokens -> packed BERT examples -> grain batches.

Documents (of a corpus, see `minilm_jax.documents`) are tokenized once at start-up with the teacher's Hugging Face `tokenizers` file
(batched, multithreaded Rust) and packed as in BERT pre-training: `[CLS] tokens [SEP]` filled
with consecutive tokens of ONE document; a document's short tail is padded, not dropped.
Tokens stay in memory as one array (2 bytes per token for vocabularies under 65,536 ids such
as BERT's, else 4; ~2 GB per billion BERT tokens). TFDS sources are tokenized eagerly too:
simple, exact, and resumable by example index; for corpora beyond host memory, prepare a
subset ("tfds:NAME:train[:10%]") or cap `max_documents`.

`hold_out` splits whole documents off as a held-out set, never trained on (evaluated by
`minilm_jax.heldout`). `batch_iterator` turns the packed examples into a grain pipeline:
global shuffle with a seed (reshuffled each epoch), repeat, global batches of which each
process builds only its own contiguous block of rows, worker processes and prefetch, with
an exactly resumable, JSON-serialisable iterator state that is the same on every process.
"""

import dataclasses
import functools
import pathlib
import time
from typing import Callable, Sequence

from absl import flags
import grain
import numpy as np
import tokenizers

from minilm_jax import documents, teachers, tokenization

# ----------------------------------------------------------------------------- tokens


def encode_documents(tok: tokenizers.Tokenizer, docs: Sequence[str],
                     batch_size: int = 4096) -> list[np.ndarray]:
  """Token ids of every document, without special tokens (batched, parallel in Rust)."""
  encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
  out = []
  for lo in range(0, len(docs), batch_size):
    encodings = encode(list(docs[lo:lo + batch_size]), add_special_tokens=False)
    out += [np.asarray(e.ids, np.int32) for e in encodings]
  return out


# ----------------------------------------------------------------------------- packing


@dataclasses.dataclass(frozen=True)
class CorpusStats:
  """What a corpus turned into; printed by `show_examples`."""
  source: str  # the corpus argument
  documents: int  # non-empty documents read
  tokens: int  # text tokens (no special tokens) packed
  examples: int  # packed examples of max_seq_len
  padded_examples: int  # examples shorter than max_seq_len: document tails, padded not dropped
  max_seq_len: int  # tokens per example, special tokens included
  tokenize_seconds: float  # wall time of tokenizing all documents

  @property
  def tokens_per_second(self) -> float:
    return self.tokens / max(self.tokenize_seconds, 1e-9)


class PackedExamples(grain.MapDataset):
  """BERT examples as a grain MapDataset; holds the tokens once and builds rows on access.

  Example i is tokens[starts[i] : starts[i] + lengths[i]] of document documents[i], the
  first a_lengths[i] of them in segment A and the rest in segment B (two_segments only).
  `gather` builds a whole batch with a few numpy ops instead of one row at a time.
  """

  def __init__(self, tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
               a_lengths: np.ndarray, documents: np.ndarray, special: tokenization.SpecialIds,
               max_seq_len: int, two_segments: bool):
    super().__init__()
    self.tokens = tokens  # uint16 or int32 [total tokens], all documents concatenated
    self.starts = starts  # int64 [examples], offset of each example in `tokens`
    self.lengths = lengths  # int32 [examples], text tokens of each example
    self.a_lengths = a_lengths  # int32 [examples], text tokens in segment A
    self.documents = documents  # int64 [examples], the corpus index of each example's document
    self.special = special  # [CLS]/[SEP]/[PAD] ids
    self.max_seq_len = max_seq_len  # row length
    self.two_segments = two_segments  # `[CLS] A [SEP] B [SEP]`, token_type 1 for B

  def __len__(self) -> int:
    return len(self.starts)

  def __str__(self) -> str:
    return f"PackedExamples({len(self)} x {self.max_seq_len})"

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return {k: v[0] for k, v in self.gather([index % len(self)]).items()}

  def gather(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
    """Examples `indices` as int32 [len(indices), max_seq_len] arrays."""
    idx = np.asarray(indices, np.int64)
    a, n = self.a_lengths[idx, None], self.lengths[idx, None]
    pos = np.arange(self.max_seq_len)[None]  # [1, T]
    in_a = (pos >= 1) & (pos <= a)  # [CLS] A... ; B starts after A's [SEP]
    in_b = (pos >= a + 2) & (pos <= n + 1) if self.two_segments else np.zeros_like(in_a)
    offset = self.starts[idx, None] + np.where(in_a, pos - 1, pos - 2)
    ids = np.where(in_a | in_b, self.tokens[np.where(in_a | in_b, offset, 0)], self.special.pad)
    ids = ids.astype(np.int32)
    ids[:, 0] = self.special.cls
    rows = np.arange(len(idx))
    ids[rows, a[:, 0] + 1] = self.special.sep
    used = (n + 3 if self.two_segments else a + 2)
    if self.two_segments:
      ids[rows, n[:, 0] + 2] = self.special.sep
    return {"input_ids": ids, "attention_mask": (pos < used).astype(np.int32),
            "token_type_ids": ((pos >= a + 2) & (pos < used) & self.two_segments).astype(np.int32)}

  def select(self, rows: np.ndarray) -> "PackedExamples":
    """Examples `rows` (indices, in that order), sharing this set's tokens."""
    return PackedExamples(self.tokens, self.starts[rows], self.lengths[rows], self.a_lengths[rows],
                          self.documents[rows], self.special, self.max_seq_len, self.two_segments)


def pack_documents(token_docs: Sequence[np.ndarray], special: tokenization.SpecialIds, max_seq_len: int,
                   two_segments: bool = False) -> PackedExamples:
  """Cuts each document into chunks of max_seq_len minus the special tokens; tails stay."""
  capacity = max_seq_len - (3 if two_segments else 2)
  if capacity < (2 if two_segments else 1):
    raise ValueError(f"max_seq_len={max_seq_len} leaves no room for text after the special "
                     f"tokens: use at least {5 if two_segments else 3}")
  doc_lengths = np.array([len(d) for d in token_docs], np.int64)
  doc_offsets = np.concatenate([[0], np.cumsum(doc_lengths)[:-1]]).astype(np.int64)
  per_doc = -(-doc_lengths // capacity)  # ceil; empty documents give no example
  doc_of_example = np.repeat(np.arange(len(token_docs)), per_doc)
  chunk = np.arange(len(doc_of_example)) - np.repeat(np.cumsum(per_doc) - per_doc, per_doc)
  starts = doc_offsets[doc_of_example] + chunk * capacity
  lengths = np.minimum(capacity, doc_lengths[doc_of_example] - chunk * capacity).astype(np.int32)
  # Two segments: A is the first half of the chunk (rounded up), B the rest.
  a_lengths = (lengths + 1) // 2 if two_segments else lengths
  tokens = np.concatenate(token_docs) if len(token_docs) else np.zeros(0, np.int32)
  if not len(tokens) or tokens.max() < 2**16:  # BERT's 30,522 ids fit in half the memory
    tokens = tokens.astype(np.uint16)
  return PackedExamples(tokens, starts, lengths, a_lengths.astype(np.int32), doc_of_example,
                        special, max_seq_len, two_segments)


def pretraining_examples(
    corpus: str | Sequence[str], tokenizer: tuple[tokenizers.Tokenizer, tokenization.SpecialIds], *,
    max_seq_len: int = 128,
    data_dir: str | None = None, two_segments: bool = False, doc_per_line: bool = False,
    doc_per_file: bool = False, text_feature: str = "text", max_documents: int | None = None,
) -> tuple[grain.MapDataset, CorpusStats]:
  """Packed BERT pre-training examples of a corpus, tokenized by the teacher's tokenizer.

  Args:
    corpus: "demo", local text files (paths/globs/dirs, comma-separated or a list), or
      "tfds:NAME[/CONFIG][:SPLIT]" for a TFDS dataset prepared in `data_dir`.
    tokenizer: the teacher's tokenizer and special ids, `tokenization.for_pretraining` of its
      directory (the teacher's position table is checked by `step.make_setup`).
    max_seq_len: tokens per example, special tokens included (128; 512 for paper runs).
    data_dir: TFDS data directory (TFDS corpora only).
    two_segments: `[CLS] A [SEP] B [SEP]` with token_type 1 for B, instead of one segment.
    doc_per_line: local files hold one document per line instead of per blank-line block.
    doc_per_file: each local file is one document (a book, an article).
    text_feature: name of the TFDS text feature.
    max_documents: read only the first documents (quick runs).

  Returns:
    A `grain.MapDataset` of {"input_ids", "attention_mask", "token_type_ids"}: int32
    [max_seq_len] each, in corpus order; and the corpus statistics.
  """
  tok, special = tokenizer
  docs = documents.load_documents(corpus, data_dir=data_dir, doc_per_line=doc_per_line,
                        doc_per_file=doc_per_file, text_feature=text_feature,
                        max_documents=max_documents)
  start = time.perf_counter()
  token_docs = encode_documents(tok, docs)
  seconds = time.perf_counter() - start
  packed = pack_documents(token_docs, special, max_seq_len, two_segments)
  if not len(packed):
    raise ValueError(f"corpus {corpus!r} holds no text ({len(docs)} documents, 0 tokens): "
                     "pass non-empty text files")
  capacity = max_seq_len - (3 if two_segments else 2)
  stats = CorpusStats(str(corpus), sum(len(d) > 0 for d in token_docs), len(packed.tokens),
                      len(packed), int((packed.lengths < capacity).sum()), max_seq_len, seconds)
  return packed, stats


def hold_out(examples: PackedExamples, documents: int,
             seed: int) -> tuple[PackedExamples, PackedExamples | None]:
  """Whole documents split off the corpus: (training examples, held-out examples).

  `documents` of the corpus's documents with text are drawn by `seed` (the same on every
  process and every resume); their examples, in corpus order, are the held-out set and the
  training examples are all the others, so no held-out token is ever trained on. With 0
  documents the corpus is returned unchanged, with no held-out set.
  """
  if documents == 0:
    return examples, None
  ids = np.unique(examples.documents)
  if documents >= len(ids):
    raise ValueError(f"heldout_documents={documents} leaves no document to train on: the corpus "
                     f"has {len(ids)} documents with text; hold out fewer")
  chosen = np.random.default_rng(seed).choice(ids, documents, replace=False)
  held = np.isin(examples.documents, chosen)
  return examples.select(np.flatnonzero(~held)), examples.select(np.flatnonzero(held))


# ----------------------------------------------------------------------------- loading


def _stack_examples(examples: grain.MapDataset, indices: np.ndarray):
  """Batch of any MapDataset whose elements are arrays or dicts of arrays."""
  rows = [examples[int(i)] for i in indices]
  if isinstance(rows[0], dict):
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  return np.stack(rows)


def _gather_block(gather: Callable, block: slice, indices: np.ndarray):
  """The rows of this process's block of one global batch of example indices."""
  return gather(indices[block])


def batch_iterator(examples: grain.MapDataset, *, global_batch_size: int, seed: int,
                   num_epochs: int | None = None, process_index: int | None = None,
                   process_count: int | None = None, worker_count: int = 0, prefetch: int = 2,
                   read_threads: int = 1) -> grain.DatasetIterator:
  """This process's rows of each global batch: shuffle -> repeat -> batch -> its block -> workers.

  Each epoch is globally shuffled by `seed` (reshuffled per epoch); global batches of
  `global_batch_size` examples run across epoch boundaries, and process p builds rows
  p * B/P .. (p + 1) * B/P - 1 of each, the rows a single process would give the devices
  of host p. So P processes x D devices see exactly the batches (and, as dropout follows a
  row's global position, the masks) of 1 process x P*D devices. Batches have a fixed shape
  (the last incomplete one of a finite run is dropped). The order depends on the seed, never
  on `worker_count` or `process_count`. `get_state()` is a JSON-serialisable dict, the same
  on every process (it counts global batches); `set_state()` on a freshly built iterator
  (same arguments, any process count) continues exactly.

  Args:
    examples: `pretraining_examples` output.
    global_batch_size: examples per step over all processes.
    seed: shuffle seed, 0 <= seed < 2**32.
    num_epochs: passes over the data; None repeats forever.
    process_index, process_count: this process's block; default jax.process_index/count().
    worker_count: grain worker processes (0: build batches in this process).
    prefetch: batches buffered per worker (and by the reading threads).
    read_threads: threads building batches inside each process.

  Returns:
    An iterator of {"input_ids", "attention_mask", "token_type_ids"}: np.int32
    [global_batch_size // process_count, max_seq_len].
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, {process_count})")
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                     f"process_count={process_count}")
  if not 0 <= seed < 2**32:
    raise ValueError(f"seed={seed} must be in [0, 2**32)")
  if num_epochs is not None and num_epochs * len(examples) < global_batch_size:
    raise ValueError(
        f"{num_epochs} epoch(s) of {len(examples)} examples give no batch of {global_batch_size}: "
        "lower global_batch_size or raise num_epochs")
  per_process = global_batch_size // process_count
  block = slice(process_index * per_process, (process_index + 1) * per_process)
  gather = examples.gather if isinstance(examples, PackedExamples) else functools.partial(
      _stack_examples, examples)
  # Shuffle and batch example *indices* globally; this process builds only its block's rows.
  order = grain.MapDataset.range(len(examples)).shuffle(seed).repeat(num_epochs)
  batches = order.batch(global_batch_size, drop_remainder=True).map(
      functools.partial(_gather_block, gather, block))
  ds = batches.to_iter_dataset(
      grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch))
  if worker_count > 0:
    # grain 0.2.18 reads an absl flag when it starts workers, which fails before absl parsed
    # the command line (pytest, notebooks, our CLI, whose flags live in their own FlagValues):
    # use the flag defaults then.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=worker_count, per_worker_buffer_size=prefetch))
  return iter(ds)


# ----------------------------------------------------------------------------- CLI


def show_examples(corpus: str | Sequence[str], tokenizer: str | pathlib.Path, *,
                  max_seq_len: int = 128, show: int = 3, data_dir: str | None = None,
                  two_segments: bool = False, doc_per_line: bool = False,
                  doc_per_file: bool = False, text_feature: str = "text",
                  max_documents: int | None = None,
                  echo: Callable[[str], None] = print) -> CorpusStats:
  """`python -m minilm_jax data`: prints `show` decoded examples and the corpus statistics;
  `tokenizer` is a packaged teacher name or a model directory."""
  read = tokenization.for_pretraining(teachers.resolve_model_dir(tokenizer))
  examples, stats = pretraining_examples(
      corpus, read, max_seq_len=max_seq_len, data_dir=data_dir, two_segments=two_segments,
      doc_per_line=doc_per_line, doc_per_file=doc_per_file, text_feature=text_feature,
      max_documents=max_documents)
  tok, _ = read
  for i in range(min(show, len(examples))):
    example = examples[i]
    ids = example["input_ids"][example["attention_mask"] == 1].tolist()
    echo(f"--- example {i} ({len(ids)} tokens)\n{tok.decode(ids, skip_special_tokens=False)}")
  echo(f"corpus {stats.source}: {stats.documents:,} documents, {stats.tokens:,} tokens, "
       f"{stats.examples:,} examples of {stats.max_seq_len} tokens "
       f"({stats.padded_examples:,} padded tails); tokenizer {stats.tokens_per_second:,.0f} "
       f"tokens/s")
  return stats
