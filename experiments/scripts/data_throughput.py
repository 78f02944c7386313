"""Throughput of the pre-training input pipeline (`minilm_jax.data`) on this machine.

Measures, on the shared corpus (Gutenberg books + Wikipedia articles, ~31 MB):
  * tokenizer throughput of the teacher's tokenizer (tokens/s, batched Rust `tokenizers`);
  * read + tokenize + pack time, and how full the examples are, with a document per file
    (book/article) or per blank-line block (paragraph);
  * pipeline throughput (examples/s out of `batch_iterator`) at seq 128 and 512 with 0, 1 and
    several grain worker processes;
  * wall time of building the TFDS array_record dataset from the whole corpus (into /tmp)
    and of reading it back into packed examples.

  python -m experiments.scripts.data_throughput [--corpus ../shared/data/corpus]
Writes experiments/results/data_throughput.md.
"""

import os
import pathlib
import platform
import shutil
import sys
import tempfile
import time

import grain
from absl import flags

from minilm_jax import cli_flags, corpus_tfds, data, documents, teachers, tokenization

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_CORPUS = ROOT.parent / "shared" / "data" / "corpus"


def best_seconds(fn, repeats: int) -> float:
  """Fastest of `repeats` wall times of fn(): the machine is shared, noise only adds time."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def pipeline_rate(examples, *, worker_count: int, batch_size: int, batches: int,
                  repeats: int) -> float:
  """Examples/s out of the iterator over `batches` batches, after one warm-up batch."""
  it = data.batch_iterator(examples, global_batch_size=batch_size, seed=0,
                           process_index=0, process_count=1, worker_count=worker_count)
  try:
    next(it)
    seconds = best_seconds(lambda: [next(it) for _ in range(batches)], repeats)
    return batches * batch_size / seconds
  finally:
    if worker_count:
      it.close()


def _tfds_rows(files: str, tokenizer) -> list[str]:
  """The corpus built as a TFDS array_record dataset in a temporary folder, and read back."""
  rows, data_dir = [], pathlib.Path(tempfile.mkdtemp(prefix="minilm_tfds_"))
  try:
    start = time.perf_counter()
    corpus_tfds.build_text_corpus(files, data_dir)
    rows.append(f"| build TFDS array_record dataset (whole corpus, into /tmp) | "
                f"{time.perf_counter() - start:.2f} s |")
    print(rows[-1], flush=True)
    start = time.perf_counter()
    _, stats = data.pretraining_examples("tfds:text_corpus", tokenizer, data_dir=str(data_dir))
    rows.append(f"| pretraining_examples from that TFDS dataset, seq 128 | "
                f"{time.perf_counter() - start:.2f} s ({stats.tokens:,} tokens) |")
    print(rows[-1], flush=True)
  finally:
    shutil.rmtree(data_dir)
  return rows


def main(argv=None):
  usage = "usage: python -m experiments.scripts.data_throughput [--corpus DIR] [--out FILE.md]"

  def define(fv):
    flags.DEFINE_string("corpus", str(DEFAULT_CORPUS), "folder with gutenberg/ and wikipedia/", flag_values=fv)
    flags.DEFINE_string("tokenizer", "all-MiniLM-L6-v2", "teacher whose tokenizer is timed", flag_values=fv)
    flags.DEFINE_integer("batch-size", 256, "examples per batch", flag_values=fv)
    flags.DEFINE_integer("batches", 200, "batches per timing", flag_values=fv)
    flags.DEFINE_string("workers", "0,1,2", "grain worker counts", flag_values=fv)
    flags.DEFINE_integer("repeats", 3, "best of this many timings", flag_values=fv)
    flags.DEFINE_string("out", str(ROOT / "experiments/results/data_throughput.md"), "the page",
                        flag_values=fv)

  args = cli_flags.parse("data_throughput", sys.argv[1:] if argv is None else argv, define, usage)
  batch_size = args["batch-size"].value
  files = ",".join(str(pathlib.Path(args.corpus) / d) for d in ("gutenberg", "wikipedia"))
  rows = [f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores; "
          f"grain {grain.__version__}; corpus {files}; tokenizer {args.tokenizer}; load average "
          f"at start {os.getloadavg()[0]:.1f} (other jobs share the machine: numbers vary).", ""]

  start = time.perf_counter()
  docs = documents.load_documents(files)
  read_s = time.perf_counter() - start
  tokenizer = tokenization.for_pretraining(teachers.resolve_model_dir(args.tokenizer))
  tok, _ = tokenizer
  n_tokens = sum(len(d) for d in data.encode_documents(tok, docs))
  tok_s = best_seconds(lambda: data.encode_documents(tok, docs), args.repeats)
  chars = sum(len(d) for d in docs)
  rows += ["| measurement | value |", "|---|---|",
           f"| documents / characters / tokens | {len(docs):,} / {chars:,} / {n_tokens:,} |",
           f"| read + split text files | {read_s:.2f} s |",
           f"| tokenizer (encode_batch_fast, all docs, best of {args.repeats}) | "
           f"{n_tokens / tok_s:,.0f} tokens/s ({tok_s:.2f} s) |"]
  print("\n".join(rows), flush=True)

  for seq in (128, 512):
    for doc_per_file in (True, False):
      start = time.perf_counter()
      examples, stats = data.pretraining_examples(files, tokenizer, max_seq_len=seq,
                                                  doc_per_file=doc_per_file)
      rows.append(f"| pretraining_examples seq {seq}, document = "
                  f"{'file' if doc_per_file else 'blank-line block'} (read+tokenize+pack) | "
                  f"{time.perf_counter() - start:.2f} s: {stats.documents:,} documents, "
                  f"{stats.examples:,} examples, {stats.padded_examples:,} padded tails, "
                  f"{stats.tokens / (stats.examples * (seq - 2)):.1%} of text slots filled |")
      print(rows[-1], flush=True)
    for workers in map(int, args.workers.split(",")):
      rate = pipeline_rate(examples, worker_count=workers, batch_size=batch_size,
                           batches=args.batches, repeats=args.repeats)
      rows.append(f"| batch_iterator seq {seq}, batch {batch_size}, {workers} workers "
                  f"(best of {args.repeats} x {args.batches} batches) | {rate:,.0f} examples/s |")
      print(rows[-1], flush=True)

  rows += _tfds_rows(files, tokenizer)
  rows.append(f"\nLoad average at the end: {os.getloadavg()[0]:.1f}.")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text("# Input pipeline throughput\n\n" + __doc__.split("\n\n")[0] + "\n\n"
                 + "\n".join(rows) + "\n")
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
