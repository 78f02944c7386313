"""Measures how exactly the Flax encoder reproduces PyTorch `transformers` (float32, CPU).

    python -m experiments.scripts.parity    # writes experiments/results/parity.md

The tests assert these bounds (1e-5); this script reports the measured maxima:
  * the packaged teacher on a real padded batch: last hidden state, pooler, every layer's
    attention probabilities (PyTorch with `attn_implementation="eager"`);
  * fresh L3-H384 students (BERT, and RoBERTa-style with the padding_idx + 1 position
    offset) exported with `convert.save_hf` and loaded by `AutoModel`;
  * the round trip HF -> Flax -> HF: tensors bit-identical.
Only real (unpadded) query positions are compared: what a padded position computes is unused.
"""

import pathlib
import platform
import tempfile

import numpy as np
import torch
import transformers

from minilm_jax import attention, convert, model as model_lib
from minilm_jax.teachers import resolve_model_dir

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "results"
SENTENCES = ["MiniLM distils the self-attention of the teacher's last layer into a small student.",
             "A short one.",
             "Padding must not change what real tokens see: the mask removes padded keys.",
             "Relation heads split the queries, keys and values independently of attention heads."]


def torch_outputs(hf_dir, batch):
  pt = transformers.AutoModel.from_pretrained(hf_dir, attn_implementation="eager").eval()
  with torch.no_grad():
    return pt(**{k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}, output_attentions=True)


def max_diff(a, b, mask):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.ndim == 4:  # [B, N, T, S] -> rows of real queries
    a, b = np.moveaxis(a, 1, 2), np.moveaxis(b, 1, 2)
  return float(np.abs(a[mask] - b[mask]).max())


def compare(name, config, params, hf_dir, batch):
  """One row: max |JAX - PyTorch| of hidden states, pooler and attention probabilities."""
  ref = torch_outputs(hf_dir, batch)
  out = model_lib.apply(config, params, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                        capture=tuple(range(config.num_layers)), return_logits=True)
  mask = batch["attention_mask"].astype(bool)
  probs = max(max_diff(attention.attention_probs(out.internals[i].logits, batch["attention_mask"]),
                       ref.attentions[i], mask) for i in range(config.num_layers))
  pooled = (float(np.abs(np.asarray(out.pooled_output) - ref.pooler_output.numpy()).max())
            if out.pooled_output is not None else float("nan"))
  return (f"| {name} | {config.model_type} L{config.num_layers}-H{config.hidden_size} "
          f"| {max_diff(out.last_hidden_state, ref.last_hidden_state, mask):.2e} | {pooled:.2e} | {probs:.2e} |")


def main():
  teacher_dir = resolve_model_dir("all-MiniLM-L6-v2")
  tok = transformers.AutoTokenizer.from_pretrained(teacher_dir)
  batch = {k: v.astype(np.int32) for k, v in tok(SENTENCES, padding=True, return_tensors="np").items()}
  rows = ["| model | architecture | last hidden | pooler | attention probs (all layers) |", "|---|---|---|---|---|"]
  config, params = convert.load_hf(teacher_dir)
  rows.append(compare("packaged teacher all-MiniLM-L6-v2", config, params, teacher_dir, batch))
  with tempfile.TemporaryDirectory() as tmp:
    out = convert.save_hf(pathlib.Path(tmp) / "round", config, params, teacher_dir)
    a, b = convert.read_hf_tensors(teacher_dir)[0], convert.read_hf_tensors(out)[0]
    same = sum(k in a and np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in b)
    round_trip = (f"{same} of {len(b)} written tensors bit-identical after HF -> Flax -> HF; "
                  f"not written: {sorted(set(a) - set(b)) or 'none'} (a constant buffer, not a weight)")
    for model_type in ("bert", "roberta"):
      student = model_lib.ModelConfig(model_type=model_type, num_layers=3, hidden_size=384, num_heads=12,
                                      intermediate_size=1536, vocab_size=config.vocab_size,
                                      max_position_embeddings=514 if model_type == "roberta" else 512,
                                      pad_token_id=1 if model_type == "roberta" else 0)
      s_params = model_lib.init_params(student, seed=7)
      s_dir = convert.save_hf(pathlib.Path(tmp) / model_type, student, s_params, teacher_dir)
      rows.append(compare(f"fresh student ({model_type})", student, s_params, s_dir, batch))
  text = "\n".join([
      "# Flax encoder vs PyTorch transformers", "",
      f"Max absolute difference over real tokens, float32 on CPU ({platform.machine()}), batch of "
      f"{len(SENTENCES)} padded sentences ({int(batch['attention_mask'].sum())} real tokens); "
      f"transformers {transformers.__version__}, torch {torch.__version__}, eager attention. "
      "Produced by `python -m experiments.scripts.parity`; the tests assert <= 1e-5.", "", *rows, "",
      f"Round trip: {round_trip}.", ""])
  RESULTS.mkdir(exist_ok=True)
  (RESULTS / "parity.md").write_text(text)
  print(text)


if __name__ == "__main__":
  main()
