"""Pre-training data: packing vs the tokenizer's counts, sharding, exact resume, TFDS, errors."""

import gzip
import json
import lzma

import grain
import numpy as np
import pytest
import tokenizers
import transformers

from minilm_jax import convert, corpus_tfds, data, documents, teachers, tokenization

TEACHER = teachers.resolve_model_dir("all-MiniLM-L6-v2")
TOKENIZER = tokenization.for_pretraining(TEACHER)
BOOK = """The Project Gutenberg eBook of A Tiny Book

This eBook is for the use of anyone anywhere.

*** START OF THE PROJECT GUTENBERG EBOOK A TINY BOOK ***

Chapter one. The quick brown fox jumps over the lazy dog, and then it
runs far away into the deep dark forest where nobody can find it.

Chapter two. Ten short words follow here.

*** END OF THE PROJECT GUTENBERG EBOOK A TINY BOOK ***

Section 1. General Terms of Use and Redistributing Project Gutenberg eBooks
"""


@pytest.fixture(scope="module")
def demo():
  return data.pretraining_examples("demo", TOKENIZER, max_seq_len=64)


def rows(examples):
  return [examples[i] for i in range(len(examples))]


def text_tokens(example, special):
  """The example's text tokens, checking its `[CLS] ... [SEP] [PAD]...` layout on the way."""
  ids, mask, types = example["input_ids"], example["attention_mask"], example["token_type_ids"]
  n = int(mask.sum())
  assert all(a.dtype == np.int32 for a in example.values())
  assert mask[:n].all() and not mask[n:].any(), "attention_mask is not a prefix of ones"
  assert ids[0] == special.cls and ids[n - 1] == special.sep
  assert (ids[n:] == special.pad).all()
  if not types.any():
    return list(ids[1:n - 1])
  a_end = int(np.argmax(types)) - 1  # the [SEP] closing segment A
  assert ids[a_end] == special.sep and types[a_end + 1:n].all() and not types[n:].any()
  return list(ids[1:a_end]) + list(ids[a_end + 1:n - 1])


def test_packing_keeps_every_token_once(demo, teacher_dir):
  examples, stats = demo
  docs = documents.demo_documents()
  reference = transformers.AutoTokenizer.from_pretrained(teacher_dir)
  expected = [reference(d, add_special_tokens=False, split_special_tokens=True)["input_ids"]
              for d in docs]
  special = tokenization.for_pretraining(TEACHER)[1]
  assert (special.cls, special.sep, special.pad) == (
      reference.cls_token_id, reference.sep_token_id, reference.pad_token_id)
  packed = [t for ex in rows(examples) for t in text_tokens(ex, special)]
  assert packed == [t for doc in expected for t in doc]  # corpus order, no loss, no duplicate
  assert stats.documents == len(docs) == 79
  assert stats.tokens == len(packed) and stats.examples == len(examples)
  assert stats.examples == sum(-(-len(d) // 62) for d in expected)
  assert stats.padded_examples == sum(len(d) % 62 != 0 for d in expected)
  for i in (0, 21, 78):  # each example knows its document: a document's examples are its tokens
    own = examples.select(np.flatnonzero(examples.documents == i))
    assert [t for ex in rows(own) for t in text_tokens(ex, special)] == expected[i]


def test_special_token_text_stays_text(tmp_path):
  (tmp_path / "doc.txt").write_text("a literal [SEP] and [CLS] in the text")
  examples, _ = data.pretraining_examples(str(tmp_path / "doc.txt"), TOKENIZER)
  ids = examples[0]["input_ids"]
  assert list(ids[:2]) == [101, 1037] and (ids == 102).sum() == 1 and (ids == 101).sum() == 1


def test_two_segments_layout():
  examples, stats = data.pretraining_examples("demo", TOKENIZER, max_seq_len=32, two_segments=True)
  special = tokenization.for_pretraining(TEACHER)[1]
  packed = [t for ex in rows(examples) for t in text_tokens(ex, special)]
  assert len(packed) == stats.tokens
  full = examples[0]
  assert full["token_type_ids"].sum() == 15  # 29 text tokens: A 15, B 14 + final [SEP]
  assert list(np.flatnonzero(full["input_ids"] == special.sep)) == [16, 31]


def test_epoch_yields_each_example_once(demo):
  examples, _ = demo
  it = data.batch_iterator(examples, global_batch_size=1, seed=0, num_epochs=1,
                           process_index=0, process_count=1)
  seen = sorted(tuple(b["input_ids"][0]) for b in it)
  assert seen == sorted(tuple(ex["input_ids"]) for ex in rows(examples))


def test_batches_have_fixed_shape_and_dtype(demo):
  it = data.batch_iterator(demo[0], global_batch_size=8, seed=0, process_index=1, process_count=2)
  batch = next(it)
  assert set(batch) == {"input_ids", "attention_mask", "token_type_ids"}
  assert all(v.shape == (4, 64) and v.dtype == np.int32 for v in batch.values())


def test_processes_take_contiguous_blocks_of_the_single_process_batches():
  """P processes x D devices see the batches of 1 process x P*D devices (issue 14)."""
  examples = grain.MapDataset.range(103)
  single = list(data.batch_iterator(examples, global_batch_size=8, seed=7, num_epochs=2,
                                    process_index=0, process_count=1))
  assert len(single) == 2 * 103 // 8  # global batches run across the epoch boundary
  for count in (2, 4):
    blocks = [list(data.batch_iterator(examples, global_batch_size=8, seed=7, num_epochs=2,
                                       process_index=i, process_count=count))
              for i in range(count)]
    assert all(len(b) == len(single) for b in blocks)
    for step, batch in enumerate(single):  # process p: rows p*8/P .. (p+1)*8/P - 1
      np.testing.assert_array_equal(np.concatenate([b[step] for b in blocks]), batch)
  part = data.batch_iterator(examples, global_batch_size=8, seed=7, num_epochs=2,
                             process_index=1, process_count=2)
  for _ in range(3):
    next(part)
  whole = data.batch_iterator(examples, global_batch_size=8, seed=7, num_epochs=2,
                              process_index=0, process_count=1)
  whole.set_state(json.loads(json.dumps(part.get_state())))  # the state counts global batches
  np.testing.assert_array_equal(next(whole), single[3])
  rows = np.concatenate(single)
  assert sorted(rows[:103].tolist()) == list(range(103))  # each epoch takes every example once
  assert list(rows[103:]) != list(rows[:len(rows) - 103])  # and is reshuffled
  default = next(data.batch_iterator(examples, global_batch_size=4, seed=7))  # jax: 1 process
  assert list(default) == list(next(data.batch_iterator(
      examples, global_batch_size=4, seed=7, process_index=0, process_count=1)))


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_exact_resume_and_worker_independence(demo):
  examples, _ = demo
  kwargs = dict(global_batch_size=8, seed=3, process_index=0, process_count=1)
  straight = take(data.batch_iterator(examples, **kwargs), 20)
  first = data.batch_iterator(examples, **kwargs)
  assert_same(take(first, 10), straight[:10])
  saved = json.dumps(first.get_state())
  resumed = data.batch_iterator(examples, **kwargs)
  resumed.set_state(json.loads(saved))
  assert_same(take(resumed, 10), straight[10:])
  other_seed = take(data.batch_iterator(examples, **{**kwargs, "seed": 4}), 1)
  assert not np.array_equal(other_seed[0]["input_ids"], straight[0]["input_ids"])

  workers = data.batch_iterator(examples, worker_count=2, **kwargs)
  try:
    assert_same(take(workers, 10), straight[:10])
    saved = json.dumps(workers.get_state())
  finally:
    workers.close()
  workers = data.batch_iterator(examples, worker_count=2, **kwargs)
  try:
    workers.set_state(json.loads(saved))
    assert_same(take(workers, 10), straight[10:])
  finally:
    workers.close()


def test_tfds_build_and_read_back(tmp_path):
  corpus = tmp_path / "book.txt.gz"
  with gzip.open(corpus, "wt", encoding="utf-8") as f:
    f.write(BOOK)
  built = corpus_tfds.build_text_corpus(str(corpus), tmp_path / "tfds")
  assert any(p.name.startswith("text_corpus-train.array_record") for p in built.iterdir())
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  source = tfds.data_source("text_corpus", data_dir=tmp_path / "tfds", split="train",
                            download=False)
  texts = sorted(source[i]["text"].decode() for i in range(len(source)))
  assert texts == sorted(documents.split_documents(documents.read_text(corpus)))
  assert len(texts) == 2 and texts[1].startswith("Chapter two")
  from_tfds = data.pretraining_examples("tfds:text_corpus:train", TOKENIZER,
                                        data_dir=str(tmp_path / "tfds"))[1]
  from_file = data.pretraining_examples(str(corpus), TOKENIZER)[1]
  assert (from_tfds.documents, from_tfds.tokens) == (from_file.documents, from_file.tokens)


def test_damaged_tfds_is_named_and_rebuilt(tmp_path, capsys):
  """A truncated shard or a missing dataset_info.json (a build cut short) is named with its
  directory and the fix; `data --build-tfds` then rebuilds it instead of keeping it."""
  from minilm_jax import cli  # pylint: disable=g-import-not-at-top
  (tmp_path / "book.txt").write_text(BOOK)
  build = ["data", "--build-tfds", str(tmp_path / "book.txt"), "--data-dir", str(tmp_path / "tfds")]
  built = corpus_tfds.build_text_corpus(str(tmp_path / "book.txt"), tmp_path / "tfds")
  shard = next(built.glob("text_corpus-train.array_record-*"))
  for cut in (1000, len(shard.read_bytes()) // 2 + 4000):
    shard.write_bytes(shard.read_bytes()[:cut])
    with pytest.raises(ValueError, match=rf"{built}: shard {shard.name} is missing, truncated or "
                       r"corrupt .*rebuild it \(`python -m minilm_jax data --build-tfds FILES"):
      documents.load_documents("tfds:text_corpus", data_dir=str(tmp_path / "tfds"))
    cli.main(build)
    assert "wrote" in capsys.readouterr().out
    assert len(documents.load_documents("tfds:text_corpus", data_dir=str(tmp_path / "tfds"))) == 2
  (built / "dataset_info.json").unlink()
  with pytest.raises(FileNotFoundError, match=rf"{built} has no dataset_info.json: .*rebuild it"):
    documents.load_documents("tfds:text_corpus", data_dir=str(tmp_path / "tfds"))
  cli.main(build)
  assert len(documents.load_documents("tfds:text_corpus", data_dir=str(tmp_path / "tfds"))) == 2
  cli.main(build)
  assert "already built" in capsys.readouterr().out


def test_text_files_gutenberg_xz_globs_and_doc_per_line(tmp_path):
  with lzma.open(tmp_path / "b.xz", "wt", encoding="utf-8") as f:
    f.write(BOOK)
  (tmp_path / "a.txt").write_text("line one\nline two\n\nline three\n")
  docs = documents.load_documents(str(tmp_path / "*.txt") + "," + str(tmp_path / "b.xz"))
  assert docs == ["line one line two", "line three",
                  "Chapter one. The quick brown fox jumps over the lazy dog, and then it runs far "
                  "away into the deep dark forest where nobody can find it.",
                  "Chapter two. Ten short words follow here."]
  assert documents.load_documents([tmp_path / "a.txt"], doc_per_line=True) == [
      "line one", "line two", "line three"]
  assert len(documents.load_documents(str(tmp_path))) == 4  # a directory: every text file in it
  assert documents.load_documents(str(tmp_path), doc_per_file=True) == [
      "line one line two\nline three", "\n".join(docs[2:])]
  with pytest.raises(ValueError, match="exclude each other"):
    documents.load_documents(str(tmp_path), doc_per_file=True, doc_per_line=True)


def test_bad_input_raises_clear_errors(tmp_path, teacher_dir):
  (tmp_path / "empty.txt").write_text("\n\n  \n")
  with pytest.raises(ValueError, match="holds no text"):
    data.pretraining_examples(str(tmp_path / "empty.txt"), TOKENIZER)
  with pytest.raises(FileNotFoundError, match="missing.txt' does not exist"):
    data.pretraining_examples(str(tmp_path / "missing.txt"), TOKENIZER)
  with pytest.raises(FileNotFoundError, match="matches no file"):
    documents.load_documents(str(tmp_path / "*.nothing"))
  packed = gzip.compress(" ".join(map(str, range(2000))).encode())
  (tmp_path / "corrupt.txt.gz").write_bytes(packed[:len(packed) // 2])  # cut mid-stream
  with pytest.raises(ValueError, match="cannot read corpus file .*corrupt.txt.gz"):
    data.pretraining_examples(str(tmp_path / "corrupt.txt.gz"), TOKENIZER)
  (tmp_path / "plain.gz").write_text("not gzip at all")
  with pytest.raises(ValueError, match="cannot read corpus file .*plain.gz.*BadGzipFile"):
    documents.load_documents(str(tmp_path / "plain.gz"))
  (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
  with pytest.raises(ValueError, match="must be UTF-8"):
    documents.load_documents(str(tmp_path / "latin1.txt"))
  with pytest.raises(FileNotFoundError, match="not prepared .*--build-tfds"):
    data.pretraining_examples("tfds:wikipedia/20230601.en", TOKENIZER, data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="needs a data_dir"):
    corpus_tfds.build_text_corpus(str(tmp_path / "empty.txt"), None)
  with pytest.raises(FileNotFoundError, match="missing.txt' does not exist"):
    corpus_tfds.build_text_corpus(str(tmp_path / "missing.txt"), tmp_path / "tfds")
  with pytest.raises(ValueError, match="multiple of process_count=4"):
    data.batch_iterator(grain.MapDataset.range(10), global_batch_size=6, seed=0,
                        process_index=0, process_count=4)
  with pytest.raises(ValueError, match="give no batch"):
    data.batch_iterator(grain.MapDataset.range(10), global_batch_size=16, seed=0, num_epochs=1,
                        process_index=0, process_count=1)
  teacher_config = convert.read_hf_config(teacher_dir)[0]
  assert teacher_config.max_seq_len == 512  # 512 positions hold 512 tokens
  teacher_config.check_max_seq_len(512)


def sentencepiece_dir(tmp_path):
  """A tiny XLM-R-like Unigram tokenizer: <s>=0, <pad>=1, </s>=2, <unk>=3, no download."""
  pieces = ["<s>", "<pad>", "</s>", "<unk>", "▁", "▁the", "▁fox", "▁dog", "▁quick", "s", "e",
            "t", "h", "o", "f", "x", "d", "g", "q", "u", "i", "c", "k", "a", "n", "r", "."]
  model = tokenizers.models.Unigram([(p, -float(i)) for i, p in enumerate(pieces)], unk_id=3)
  tok = tokenizers.Tokenizer(model)
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
  tok.decoder = tokenizers.decoders.Metaspace()
  tok.add_special_tokens(["<s>", "<pad>", "</s>", "<unk>"])
  tok.save(str(tmp_path / "tokenizer.json"))
  return tmp_path, tok


def test_sentencepiece_specials(tmp_path):
  model_dir, tok = sentencepiece_dir(tmp_path)
  (model_dir / "corpus.txt").write_text("the quick fox and the dog.\n\nthe dogs\n")
  examples, stats = data.pretraining_examples(str(model_dir / "corpus.txt"), tokenization.for_pretraining(model_dir),
                                              max_seq_len=8)
  special = tokenization.for_pretraining(model_dir)[1]
  assert (special.cls, special.pad, special.sep) == (0, 1, 2)
  packed = [t for ex in rows(examples) for t in text_tokens(ex, special)]
  own = [tok.encode(d, add_special_tokens=False).ids for d in ("the quick fox and the dog.",
                                                              "the dogs")]
  assert packed == own[0] + own[1] and stats.tokens == len(packed)
  assert examples[0]["input_ids"][0] == 0 and 2 in examples[0]["input_ids"]


def test_show_examples_prints_statistics():
  lines = []
  stats = data.show_examples("demo", TEACHER, max_seq_len=128, show=2, echo=lines.append)
  assert len(lines) == 3 and lines[0].startswith("--- example 0") and "[CLS]" in lines[0]
  assert f"{stats.documents} documents" in lines[-1] and "tokens/s" in lines[-1]


def test_gutenberg_boilerplate_stripped_from_real_books(shared_data):
  book = shared_data / "corpus" / "gutenberg" / "pg1184.txt"
  if not book.is_file():
    pytest.skip(f"{book} is absent")
  text = documents.read_text(book)
  raw = book.read_text(encoding="utf-8-sig")
  assert raw.startswith("The Project Gutenberg eBook") and "*** START OF" in raw
  assert text.strip().startswith("THE COUNT OF MONTE CRISTO")
  assert "PROJECT GUTENBERG EBOOK" not in text.upper() and "FULL LICENSE" not in text.upper()
  for other in sorted(book.parent.glob("*.txt")):  # half of the books keep the boilerplate
    assert "PROJECT GUTENBERG" not in documents.read_text(other).upper(), other.name
  assert len(documents.expand_paths(str(shared_data / "corpus" / "wikipedia"))) == 442


def test_data_cli_builds_tfds_and_shows_it(tmp_path, capsys):
  from minilm_jax import cli  # pylint: disable=g-import-not-at-top
  (tmp_path / "book.txt").write_text(BOOK)
  cli.main(["data", "--build-tfds", str(tmp_path / "book.txt"), "--data-dir", str(tmp_path / "tfds")])
  assert "--corpus tfds:text_corpus" in capsys.readouterr().out
  cli.main(["data", "--corpus", "tfds:text_corpus", "--data-dir", str(tmp_path / "tfds"),
            "--tokenizer", str(TEACHER), "--max-seq-len", "32", "--show", "1"])
  out = capsys.readouterr().out
  stats = data.pretraining_examples(str(tmp_path / "book.txt"), TOKENIZER, max_seq_len=32)[1]
  assert out.startswith("--- example 0 (") and "\n[CLS] chapter" in out  # TFDS orders by key hash
  assert f"2 documents, {stats.tokens:,} tokens, {stats.examples} examples of 32 tokens" in out
  with pytest.raises(SystemExit, match="not prepared"):
    cli.main(["data", "--corpus", "tfds:wikipedia/20230601.en", "--data-dir", str(tmp_path)])
