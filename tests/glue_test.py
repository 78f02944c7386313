"""GLUE registry, TSV / TFDS readers and features, checked against transformers' tokenizer."""

import numpy as np
import pytest

from minilm_jax import tokenization
from minilm_jax.finetune import glue

PAPER_TASKS = {"mnli", "qnli", "qqp", "rte", "sst2", "mrpc", "cola", "stsb"}

# One tiny file per task in the original GLUE layout (header, column order, label strings).
TINY = {
    "CoLA/dev.tsv": "gj04\t1\t\tThe sailors rode the breeze clear of the rocks.\n"
                    "gj04\t0\t*\tThe \"quoted word he said.\n",
    "SST-2/dev.tsv": "sentence\tlabel\nit 's a \"charming journey . \t1\nbleak \t0\n",
    "MRPC/dev.tsv": "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
                    "1\t1\t2\tHe said \"yes.\tHe agreed.\n0\t3\t4\tA cat.\tA dog.\n",
    "STS-B/dev.tsv": "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\t"
                     "sentence2\tscore\n0\tmain-captions\tMSRvid\t2012test\t0000\tnone\tnone\t"
                     "A man plays.\tA man is playing.\t4.750\n",
    "QQP/dev.tsv": "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
                   "1\t2\t3\tHow do I \"learn?\tHow to learn?\t1\n"
                   "2\t4\t5\tA question with no pair\n",  # run_glue skips such QQP rows
    "MNLI/dev_matched.tsv": "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\t"
                            "sentence2_binary_parse\tsentence1_parse\tsentence2_parse\t"
                            "sentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\t"
                            "gold_label\n0\t1\t1e\tgov\t( a )\t( b )\t(S a)\t(S b)\tThe cat sat."
                            "\tA cat sat.\tneutral\tentailment\tentailment\tentailment\t"
                            "entailment\tentailment\n",
    "QNLI/dev.tsv": "index\tquestion\tsentence\tlabel\n0\tWhat?\tThis.\tnot_entailment\n",
    "RTE/dev.tsv": "index\tsentence1\tsentence2\tlabel\n0\tA b.\tB a.\tentailment\n",
}


@pytest.fixture
def glue_dir(tmp_path):
  for name, text in TINY.items():
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text(text, encoding="utf-8")
  return tmp_path


def test_registry_has_every_paper_task():
  assert set(glue.TASKS) == PAPER_TASKS
  assert glue.get_task("mnli").labels == ("contradiction", "entailment", "neutral")
  assert glue.get_task("MNLI").dev_file == "dev_matched.tsv"
  assert glue.get_task("stsb").is_regression and glue.get_task("stsb").num_labels == 1
  assert glue.get_task("SST-2").dir_name == "SST-2"
  assert glue.get_task("cola").metric == "matthews"
  assert {glue.get_task(t).metric for t in ("mrpc", "qqp")} == {"accuracy_f1"}


def test_reads_every_task_in_glue_layout(glue_dir):
  cola = glue.load_glue("cola", glue_dir, "dev")
  assert cola[1] == glue.Example('The "quoted word he said.', None, 0)  # quote kept verbatim
  assert glue.load_glue("sst2", glue_dir, "dev")[0] == glue.Example(
      "it 's a \"charming journey . ", None, 1)
  assert glue.load_glue("mrpc", glue_dir, "dev")[0] == glue.Example(
      'He said "yes.', "He agreed.", 1)
  assert glue.load_glue("stsb", glue_dir, "dev")[0] == glue.Example(
      "A man plays.", "A man is playing.", 4.75)
  assert [e.label for e in glue.load_glue("qqp", glue_dir, "dev")] == [1]
  mnli = glue.load_glue("mnli", glue_dir, "dev")[0]  # gold_label, not label1
  assert (mnli.text_a, mnli.text_b, mnli.label) == ("The cat sat.", "A cat sat.", 1)
  assert glue.load_glue("qnli", glue_dir, "dev")[0].label == 1
  assert glue.load_glue("rte", glue_dir, "dev")[0] == glue.Example("A b.", "B a.", 0)


def test_clear_errors(glue_dir):
  with pytest.raises(KeyError, match="unknown GLUE task 'wnli'.*mnli, qnli"):
    glue.get_task("wnli")
  with pytest.raises(FileNotFoundError, match=r"MRPC/train.tsv not found.*<glue_dir>/MRPC"):
    glue.load_glue("mrpc", glue_dir, "train")
  with pytest.raises(ValueError, match="unknown split 'test'"):
    glue.load_glue("rte", glue_dir, "test")
  (glue_dir / "RTE/train.tsv").write_text("index\tsentence1\tlabel\n0\ta\tentailment\n")
  with pytest.raises(ValueError, match=r"missing column\(s\) \['sentence2'\]"):
    glue.load_glue("rte", glue_dir, "train")
  (glue_dir / "RTE/train.tsv").write_text(
      "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\tmaybe\n")
  with pytest.raises(ValueError, match=r"train.tsv line 3: label 'maybe' is not one of"):
    glue.load_glue("rte", glue_dir, "train")
  (glue_dir / "RTE/train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\n")
  with pytest.raises(ValueError, match="line 2: 2 tab-separated fields"):
    glue.load_glue("rte", glue_dir, "train")
  with pytest.raises(FileNotFoundError, match="tokenizer.json not found"):
    tokenization.load(glue_dir)


def test_features_match_transformers_tokenizer(glue_dir, teacher_dir):
  transformers = pytest.importorskip("transformers")
  reference = transformers.AutoTokenizer.from_pretrained(str(teacher_dir))
  tokenizer = tokenization.load(teacher_dir)
  long_a = "a very long premise about many things . " * 30
  examples = [glue.Example(long_a, "a short hypothesis .", 1),
              glue.Example("short premise", "long hypothesis " * 80, 0),
              glue.Example("A man plays.", "A man is playing.", 1)]
  features = glue.encode_examples(examples, tokenizer, "rte", max_len=32)
  expected = reference([e.text_a for e in examples], [e.text_b for e in examples],
                       truncation="longest_first", max_length=32, padding="max_length",
                       return_tensors="np")
  for key in ("input_ids", "attention_mask", "token_type_ids"):
    assert features[key].dtype == np.int32 and features[key].shape == (3, 32)
    np.testing.assert_array_equal(features[key], expected[key])
  np.testing.assert_array_equal(features["labels"], [1, 0, 1])
  single = glue.encode_examples(glue.load_glue("sst2", glue_dir, "dev"), tokenizer, "sst2")
  assert single["input_ids"].shape == (2, 128) and set(np.unique(single["token_type_ids"])) == {0}
  stsb = glue.encode_examples(glue.load_glue("stsb", glue_dir, "dev"), tokenizer, "stsb")
  assert stsb["labels"].dtype == np.float32 and stsb["labels"][0] == np.float32(4.75)


def test_encoding_leaves_callers_tokenizer_untouched(teacher_dir):
  tokenizer = tokenization.load(teacher_dir)
  before = tokenizer.to_str()
  glue.encode_examples([glue.Example("x", None, 0)], tokenizer, "sst2", max_len=16)
  assert tokenizer.to_str() == before


def test_real_glue_files_match_manifest_counts(teacher_dir, shared_data):
  if not (shared_data / "glue").is_dir():
    pytest.skip(f"{shared_data / 'glue'} is not present")
  counts = {("sst2", "train"): 67349, ("sst2", "dev"): 872, ("cola", "train"): 8551,
            ("cola", "dev"): 1043, ("rte", "train"): 2490, ("rte", "dev"): 277,
            ("qnli", "dev"): 5463}
  for (task, split), n in counts.items():
    examples = glue.load_glue(task, shared_data / "glue", split)
    assert len(examples) == n, (task, split)
    labels = {e.label for e in examples}
    assert labels == {0, 1}, (task, split)
  rte = glue.load_glue("rte", shared_data / "glue", "dev")
  features = glue.encode_examples(rte, tokenization.load(teacher_dir), "rte")
  assert features["input_ids"].shape == (277, 128)
  assert (features["attention_mask"].sum(1) == 128).any()  # some pairs really are truncated
  transformers = pytest.importorskip("transformers")
  expected = transformers.AutoTokenizer.from_pretrained(str(teacher_dir))(
      [e.text_a for e in rte], [e.text_b for e in rte], truncation="longest_first",
      max_length=128, padding="max_length", return_tensors="np")
  for key in ("input_ids", "attention_mask", "token_type_ids"):
    np.testing.assert_array_equal(features[key], expected[key])
