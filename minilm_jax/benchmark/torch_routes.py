"""The PyTorch reference routes: `transformers.BertModel`s trained on the same workload.

Routes (one builder each, `(Workload, batch, seq) -> Built`, the step ready to time):
  torch-eager     what a user writes first: full `BertModel`s, eager attention, fp32
                  weights under bf16 autocast, q/k/v of the distilled layers captured by
                  forward hooks on their `query`/`key`/`value` Linears (the attention
                  probabilities `output_attentions` returns in training are after dropout,
                  so relations are built from pre-dropout q, k, v), stock AdamW.
  torch-compiled  the best PyTorch route found: SDPA attention, the teacher cut after the
                  q/k/v projections of its distilled layer (bf16 weights) and the student
                  after those of its last layer, `torch.compile` of forward + loss (its
                  backward compiled by AOTAutograd), bf16 autocast, fused AdamW.
Both share one loss, `torch_minilm_loss`. The only module of the benchmark that imports torch.
"""

import math

from minilm_jax.benchmark.workloads import ADAMW, DROPOUT, Bert, Built, Workload, make_batch

try:
  import torch
except ImportError:  # only the PyTorch routes need it; the JAX route runs without
  torch = None


def torch_relation_loss(a_t, b_t, a_s, b_s, mask, relation_heads: int):
  """MiniLM relation KL (Wang et al. 2020, eq. 5-7; MiniLMv2 eq. 2-4) in PyTorch.

  Each [B, T, D] tensor is split into R = `relation_heads` heads of size D/R (teacher and
  student each by their own D); relation = softmax(a b^T / sqrt(D/R)) over unpadded keys.
  Returns KL(teacher || student), float32, averaged over (example, head, real query).
  """
  keys = mask.bool()[:, None, None, :]

  def log_relation(a, b):
    bsz, t, d = a.shape
    a = a.view(bsz, t, relation_heads, d // relation_heads).transpose(1, 2)
    b = b.view(bsz, t, relation_heads, d // relation_heads).transpose(1, 2)
    logits = torch.matmul(a, b.transpose(-1, -2)).float() / math.sqrt(d // relation_heads)
    # A finite fill keeps p (log p - log q) at exactly 0, and its gradient finite, on padding.
    return torch.log_softmax(logits.masked_fill(~keys, -1e9), dim=-1)

  log_p, log_q = log_relation(a_t, b_t), log_relation(a_s, b_s)
  kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # [B, R, T]
  queries = mask.float()[:, None, :]
  return (kl * queries).sum() / (queries.sum() * relation_heads)


def torch_minilm_loss(teacher_qkv, student_qkv, mask, version: str, relation_heads: int):
  """v1: attention transfer (q-k) + value relation (v-v); v2: q-q + k-k + v-v relations."""
  (qt, kt, vt), (qs, ks, vs) = teacher_qkv, student_qkv
  pairs = ([(qt, kt, qs, ks), (vt, vt, vs, vs)] if version == "v1"
           else [(x, x, y, y) for x, y in zip(teacher_qkv, student_qkv)])
  return sum(torch_relation_loss(*p, mask, relation_heads) for p in pairs)


def torch_bert(b: Bert, attn: str, device, dropout: float = DROPOUT, attention_dropout: float = DROPOUT):
  """A randomly initialised `transformers.BertModel` of shape `b`, made on `device`."""
  import transformers
  config = transformers.BertConfig(
      vocab_size=b.vocab, hidden_size=b.hidden, num_hidden_layers=b.layers, num_attention_heads=b.heads,
      intermediate_size=b.intermediate, max_position_embeddings=b.max_positions,
      hidden_dropout_prob=dropout, attention_probs_dropout_prob=attention_dropout, attn_implementation=attn)
  with torch.device(device):
    return transformers.BertModel(config, add_pooling_layer=False)


def _hook_qkv(layer, store: dict) -> None:
  """Keeps the outputs of a BertLayer's query/key/value Linears (pre-dropout) in `store`."""
  for name in ("query", "key", "value"):
    getattr(layer.attention.self, name).register_forward_hook(
        lambda module, args, out, name=name: store.__setitem__(name, out))


def _qkv_up_to(model, layer: int):
  """`model` cut after the q, k, v projections of its 1-based `layer`: a module returning
  (q, k, v) [B, T, D], pre-dropout, that never runs the rest of that layer or above."""
  class QKVUpTo(torch.nn.Module):
    def __init__(self):
      super().__init__()
      attention = model.encoder.layer[layer - 1].attention.self
      model.encoder.layer = torch.nn.ModuleList(model.encoder.layer[:layer - 1])
      self.body, self.query, self.key, self.value = model, attention.query, attention.key, attention.value

    def forward(self, input_ids, attention_mask):
      h = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
      return self.query(h), self.key(h), self.value(h)
  return QKVUpTo()


def _torch_built(step, device) -> Built:
  cuda = device.type == "cuda"
  def sync(loss):
    if cuda:
      torch.cuda.synchronize(device)
    return float(loss)
  peak = (lambda: torch.cuda.max_memory_allocated(device)) if cuda else (lambda: None)
  return Built(step, sync, peak)


def _torch_setup(w: Workload, batch: int, seq: int):
  if torch is None:
    raise ImportError("the PyTorch routes need torch: pip install torch (or pass --routes jax)")
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  if device.type == "cuda":
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
  torch.manual_seed(0)
  data = make_batch(w.teacher.vocab, batch, seq)
  ids, mask = (torch.tensor(data[k], dtype=torch.long, device=device) for k in ("input_ids", "attention_mask"))
  return device, ids, mask


def _adamw(params, fused: bool):
  return torch.optim.AdamW(params, lr=ADAMW["lr"], betas=(ADAMW["b1"], ADAMW["b2"]), eps=ADAMW["eps"],
                           weight_decay=ADAMW["weight_decay"], fused=fused or None)


def torch_eager_route(w: Workload, batch: int, seq: int) -> Built:
  """Full models, eager attention, fp32 weights + bf16 autocast, q/k/v by forward hooks."""
  device, ids, mask = _torch_setup(w, batch, seq)
  teacher = torch_bert(w.teacher, "eager", device).eval().requires_grad_(False)
  student = torch_bert(w.student, "eager", device, attention_dropout=w.attention_dropout).train()
  t_qkv, s_qkv = {}, {}
  _hook_qkv(teacher.encoder.layer[w.teacher_layer - 1], t_qkv)
  _hook_qkv(student.encoder.layer[-1], s_qkv)
  opt = _adamw(student.parameters(), fused=False)
  qkv = lambda d: (d["query"], d["key"], d["value"])

  def step():
    with torch.autocast(device.type, torch.bfloat16):
      with torch.no_grad():
        teacher(input_ids=ids, attention_mask=mask)
      student(input_ids=ids, attention_mask=mask)
      loss = torch_minilm_loss(qkv(t_qkv), qkv(s_qkv), mask, w.version, w.relation_heads)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()
  return _torch_built(step, device)


def torch_compiled_route(w: Workload, batch: int, seq: int, *, compile: bool = True) -> Built:
  """SDPA, both models cut after the distilled q/k/v, bf16 teacher, torch.compile, fused AdamW."""
  device, ids, mask = _torch_setup(w, batch, seq)
  teacher = _qkv_up_to(torch_bert(w.teacher, "sdpa", device), w.teacher_layer)
  teacher = teacher.to(torch.bfloat16).eval().requires_grad_(False)
  student = _qkv_up_to(torch_bert(w.student, "sdpa", device, attention_dropout=w.attention_dropout),
                       w.student.layers).train()
  opt = _adamw(student.parameters(), fused=True)

  def loss_fn(ids, mask):
    with torch.autocast(device.type, torch.bfloat16):
      with torch.no_grad():
        t = teacher(ids, mask)
      return torch_minilm_loss(t, student(ids, mask), mask, w.version, w.relation_heads)
  if compile:
    torch._dynamo.reset()
    loss_fn = torch.compile(loss_fn)

  def step():
    loss = loss_fn(ids, mask)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()
  return _torch_built(step, device)
