"""The benchmark harness: CPU mode end to end, the FLOP formula, the PyTorch reference loss.

Nothing here times anything: rows are checked for fields and sane values only. The FLOP
formula is checked against two direct counts (PyTorch's FlopCounterMode over the
compiled route's eager step, exact; XLA's cost analysis of the JAX step, which also
counts elementwise work, within 10%); the PyTorch loss both routes use against
`minilm_jax.step.distill_loss` on the same weights (float32, dropout off).
"""

import dataclasses
import json
import math

import jax
import numpy as np
import pytest
import torch
from torch.utils import flop_counter

from minilm_jax.benchmark import harness, jax_routes, torch_routes, workloads as wl
from minilm_jax.benchmark import main as bm_main
from minilm_jax import convert, model as model_lib, optimizer as optimizer_lib
from minilm_jax import step as step_lib

STEP_FIELDS = ("device", "mode", "route", "framework", "config", "version", "relation_heads", "teacher",
               "teacher_layer", "student", "batch", "seq", "model_flops", "peak_flops", "step_time_s",
               "step_time_min_s", "step_time_max_s", "first_step_s", "timed_steps", "loss", "tokens_per_s",
               "examples_per_s", "model_tflops_per_s", "mfu", "peak_memory_bytes", "versions", "time")
TEACHER, STUDENT = wl.Bert(3, 64, 4, 256, 128, 64), wl.Bert(2, 32, 4, 128, 128, 64)
WORKLOADS = [wl.Workload("v1", TEACHER, STUDENT, 2, "v1", 4), wl.Workload("v2", TEACHER, STUDENT, 2, "v2", 8)]


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench")
  return bm_main.run(mode="cpu", out_dir=out), out


def test_cpu_mode_writes_one_sane_row_per_measurement(cpu_run):
  rows, out = cpu_run
  mode = wl.MODES["cpu"]
  assert len(rows) == len(wl.ROUTES) * len(mode.workloads) * len(mode.shapes)
  assert {(r["route"], r["config"]) for r in rows} == {(r, w.name) for r in wl.ROUTES for w in mode.workloads}
  for r in rows:
    assert "error" not in r, r.get("error")
    assert set(STEP_FIELDS) <= set(r), set(STEP_FIELDS) - set(r)
    assert r["device"] == "cpu" and r["peak_memory_bytes"] is None and r["timed_steps"] == mode.timed
    assert 0 < r["step_time_min_s"] <= r["step_time_s"] <= r["step_time_max_s"]
    assert r["tokens_per_s"] == pytest.approx(r["batch"] * r["seq"] / r["step_time_s"])
    assert r["examples_per_s"] == pytest.approx(r["batch"] / r["step_time_s"])
    assert r["model_flops"] == wl.step_flops(wl.workload("cpu", r["config"]), r["batch"], r["seq"])["total"]
    assert r["mfu"] == pytest.approx(r["model_flops"] / r["step_time_s"] / r["peak_flops"])
    assert r["peak_flops"] > 0 and r["mfu"] > 0
    assert math.isfinite(r["loss"]) and r["loss"] > 0
  lines = (out / "benchmark-cpu.jsonl").read_text().splitlines()
  assert [json.loads(x) for x in lines] == json.loads(json.dumps(rows))
  table = (out / "benchmark-cpu.md").read_text()
  assert all(f"| {r} |" in table for r in wl.ROUTES) and "error" not in table


def test_largest_batch_search_doubles_then_bisects():
  probes = []
  def fits(b):
    probes.append(b)
    return b <= 100
  assert harness.largest_batch(fits, 8) == (96, 104)  # within 1/8 of the answer
  assert probes == [8, 16, 32, 64, 128, 96, 112, 104]
  assert harness.largest_batch(lambda b: True, 2, limit=8) == (8, None)
  assert harness.largest_batch(lambda b: False, 2) == (0, 1)


def test_max_batch_rows(tmp_path):
  rows = bm_main.run(mode="cpu", routes=["torch-eager"], configs=["tiny-v2"], shapes=[], out_dir=tmp_path,
                max_batch=True)
  assert len(rows) == 1 and rows[0]["kind"] == "max_batch" and rows[0]["route"] == "torch-eager"
  # A CPU does not run out of memory below the mode's limit.
  assert (rows[0]["max_batch"], rows[0]["fails_at"], rows[0]["probes"]) == (8, None, [2, 4, 8])
  assert "| largest batch |" in (tmp_path / "benchmark-cpu.md").read_text()


def test_is_oom():
  assert harness.is_oom(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
  assert harness.is_oom(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate"))
  assert not harness.is_oom(ValueError("shapes do not match"))


@pytest.mark.parametrize("w", WORKLOADS, ids=lambda w: w.name)
def test_step_flops_equal_torch_flop_counter(w):
  # PyTorch counts every matmul of the step (autograd included) but has no formula for the
  # CPU flash-attention kernel the eval-mode teacher uses: count it as SDPA.
  sdpa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
  def sdpa_flops(q, k, v, *args, **kwargs):
    return flop_counter.sdpa_flop_count(q, k, v)  # (FlopCounterMode passes shapes)
  for batch, seq in ((2, 16), (3, 32)):
    built = torch_routes.torch_compiled_route(w, batch, seq, compile=False)
    with flop_counter.FlopCounterMode(display=False, custom_mapping={sdpa: sdpa_flops}) as counter:
      built.sync(built.step())
    assert counter.get_total_flops() == wl.step_flops(w, batch, seq)["total"]


@pytest.mark.parametrize("version,heads", [("v1", 4), ("v2", 8)])
def test_step_flops_near_xla_cost_analysis(version, heads):
  # Wide enough that matmuls dominate the elementwise work XLA counts too.
  w = wl.Workload(version, wl.Bert(3, 256, 4, 1024, 512, 128), wl.Bert(2, 256, 4, 1024, 512, 128), 2,
                  version, heads)
  step, args = jax_routes.jax_step(w, 2, 128)
  cost = step.lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  assert cost["flops"] == pytest.approx(wl.step_flops(w, 2, 128)["total"], rel=0.10)


def _torch_model(bert, config, params, attn):
  tensors = {k: torch.tensor(v) for k, v in convert.params_to_hf(config, params).items()
             if not k.startswith("pooler.")}
  model = torch_routes.torch_bert(bert, attn, "cpu", dropout=0.0).eval()
  missing, unexpected = model.load_state_dict(tensors, strict=False)
  assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
  return model


@pytest.mark.parametrize("w", WORKLOADS, ids=lambda w: w.name)
def test_torch_reference_loss_equals_jax_loss(w):
  cfg, setup, teacher_full = jax_routes.jax_setup(w, 4, 32, dtype="float32")
  # Larger weights than BERT's init make the relations peaked, so the loss is far from 0.
  scale = lambda p: jax.tree.map(lambda x: 4 * x, p)
  t_params = scale(model_lib.init_params(teacher_full, seed=1))
  s_params = scale(model_lib.init_params(setup.student, seed=2))
  batch = wl.make_batch(w.teacher.vocab, 4, 32)
  assert (batch["attention_mask"] == 0).any()
  batch["token_type_ids"] = np.zeros_like(batch["input_ids"])
  expected, _ = step_lib.distill_loss(s_params, step_lib.truncate_teacher(setup, t_params), batch, None, setup)
  ids, mask = (torch.tensor(batch[k], dtype=torch.long) for k in ("input_ids", "attention_mask"))
  losses = {}
  with torch.no_grad():
    # torch-eager: full models, eager attention, q/k/v from forward hooks.
    t, s = _torch_model(w.teacher, teacher_full, t_params, "eager"), _torch_model(w.student, setup.student, s_params, "eager")
    t_qkv, s_qkv = {}, {}
    torch_routes._hook_qkv(t.encoder.layer[w.teacher_layer - 1], t_qkv)
    torch_routes._hook_qkv(s.encoder.layer[-1], s_qkv)
    t(input_ids=ids, attention_mask=mask), s(input_ids=ids, attention_mask=mask)
    qkv = lambda d: (d["query"], d["key"], d["value"])
    losses["hooks"] = torch_routes.torch_minilm_loss(qkv(t_qkv), qkv(s_qkv), mask, w.version, w.relation_heads)
    # torch-compiled: SDPA models cut after the distilled q/k/v.
    t = torch_routes._qkv_up_to(_torch_model(w.teacher, teacher_full, t_params, "sdpa"), w.teacher_layer)
    s = torch_routes._qkv_up_to(_torch_model(w.student, setup.student, s_params, "sdpa"), w.student.layers)
    losses["truncated"] = torch_routes.torch_minilm_loss(t(ids, mask), s(ids, mask), mask, w.version, w.relation_heads)
  assert float(expected) > 0.05
  for name, loss in losses.items():
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-5, err_msg=name)


def test_measurement_order(tmp_path, monkeypatch):
  """Isolated (GPU) runs go workload by workload, JAX first, so a run cut short by its time
  limit keeps whole comparisons; in-process runs keep JAX last (its XLA threads would slow
  the PyTorch routes that follow). The table compares each route with torch-compiled."""
  calls = []
  def fake_work(spec, isolate, timeout=None):
    calls.append((spec.get("config"), spec.get("route"), isolate))
    if spec["kind"] == "peak":
      return {"device": "cpu", "peak_flops": 1e12}
    return {"step_time_s": {"jax": 1.0, "torch-compiled": 2.0, "torch-eager": 4.0}[spec["route"]],
            "loss": 0.5, "peak_memory_bytes": None}
  monkeypatch.setattr(harness, "run_work", fake_work)
  configs = ["tiny-v1", "tiny-v2"]
  bm_main.run(mode="cpu", configs=configs, out_dir=tmp_path / "a", isolate=True)
  assert calls[1:] == [(c, r, True) for c in configs for r in ("jax", "torch-compiled", "torch-eager")]
  calls.clear()
  bm_main.run(mode="cpu", configs=configs, out_dir=tmp_path / "b", isolate=False)
  assert calls[1:] == [(c, r, False) for r in ("torch-compiled", "torch-eager", "jax") for c in configs]
  table = (tmp_path / "b" / "benchmark-cpu.md").read_text()
  assert "| jax | 1000.00 |" in table and "| 2.00x |" in table and "| 0.50x |" in table


def test_table_from_rows_alone(tmp_path):
  """`--table` rebuilds the markdown from the .jsonl (what a run cut short leaves)."""
  rows = bm_main.run(mode="cpu", routes=["jax"], configs=["tiny-v1"], out_dir=tmp_path)
  md = tmp_path / "benchmark-cpu.md"
  first = md.read_text()
  md.unlink()
  bm_main.main(["--mode", "cpu", "--table", str(tmp_path / "benchmark-cpu.jsonl")])
  assert md.read_text() == first and f"{rows[0]['step_time_s'] * 1e3:.2f}" in first
  with pytest.raises(ValueError, match="no rows of --mode gpu"):
    bm_main.main(["--mode", "gpu", "--table", str(tmp_path / "benchmark-cpu.jsonl")])


def test_jax_route_adamw_is_torch_adamw_at_a_constant_rate():
  """The JAX route's optimizer against torch.optim.AdamW (lr 1e-4 constant, weight decay on
  matrices and embeddings only, no clipping) over 3 steps: parameter changes to 1e-4
  relative. A decaying schedule (1e-4 -> 0 over max_steps) is off by 1e-3 at step 3."""
  w = WORKLOADS[0]
  cfg, setup, _ = jax_routes.jax_setup(w, 4, 32, dtype="float32")
  params = model_lib.init_params(setup.student, seed=0)
  rng = np.random.default_rng(0)
  grads = [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params) for _ in range(3)]
  optimizer = jax_routes.jax_optimizer(cfg)
  state, jax_params = optimizer.init(params), params
  for g in grads:
    updates, state = optimizer.update(g, state, jax_params)
    jax_params = jax.tree.map(lambda p, u: p + u, jax_params, updates)
  leaves, decay = jax.tree.leaves(params), jax.tree.leaves(optimizer_lib.decay_mask(params))
  tensors = [torch.tensor(np.asarray(p), requires_grad=True) for p in leaves]
  torch_opt = torch.optim.AdamW(
      [{"params": [t for t, d in zip(tensors, decay) if d], "weight_decay": wl.ADAMW["weight_decay"]},
       {"params": [t for t, d in zip(tensors, decay) if not d], "weight_decay": 0.0}],
      lr=wl.ADAMW["lr"], betas=(wl.ADAMW["b1"], wl.ADAMW["b2"]), eps=wl.ADAMW["eps"])
  # Parameters no loss reaches (optimizer_lib.untrained_mask) get no gradient in either route: JAX
  # zeroes their updates, torch skips a parameter whose .grad is None (no decay either).
  untrained = jax.tree.leaves(optimizer_lib.untrained_mask(cfg, params))
  for g in grads:
    for t, x, u in zip(tensors, jax.tree.leaves(g), untrained):
      t.grad = None if u else torch.tensor(x)
    torch_opt.step()
  for p0, got, want in zip(leaves, jax.tree.leaves(jax_params), tensors):
    p0 = np.asarray(p0)
    change, want_change = np.asarray(got) - p0, want.detach().numpy() - p0
    # 1e-4 relative, plus 4 float32 ulp of |p| (each side rounds p) and 1e-5 of the largest
    # change (for changes that nearly cancel over the 3 steps).
    bound = 1e-4 * np.abs(want_change) + 4 * 1.2e-7 * np.abs(p0) + 1e-5 * np.abs(want_change).max()
    assert np.all(np.abs(change - want_change) <= bound)


def test_gpu_mode_measures_what_the_targets_need_first(tmp_path, monkeypatch):
  """base-v1 256x128, base-v1 64x512, base-v2 64x512 (each JAX first), then the rest,
  among them base-v1 with attention dropout 0, whose PyTorch students drop nothing either."""
  calls = []
  def fake_work(spec, isolate, timeout=None):
    calls.append((spec.get("config"), (spec.get("batch"), spec.get("seq")), spec.get("route")))
    if spec["kind"] == "peak":
      return {"device": "cpu", "peak_flops": 1e12}
    return {"step_time_s": 1.0, "loss": 0.5, "peak_memory_bytes": None}
  monkeypatch.setattr(harness, "run_work", fake_work)
  rows = bm_main.run(mode="gpu", out_dir=tmp_path)
  first = [("base-v1", (256, 128)), ("base-v1", (64, 512)), ("base-v2", (64, 512))]
  assert calls[1:10] == [(c, s, r) for c, s in first for r in ("jax", "torch-compiled", "torch-eager")]
  assert len(rows) == 4 * 2 * 3
  assert {r["attention_dropout"] for r in rows if r["config"] == "base-v1-attn0"} == {0.0}


def test_torch_students_drop_attention_as_the_workload_says(monkeypatch):
  made, real = [], torch_routes.torch_bert
  monkeypatch.setattr(torch_routes, "torch_bert", lambda *a, **k: made.append(k.get("attention_dropout", wl.DROPOUT))
                      or real(*a, **k))
  w = dataclasses.replace(WORKLOADS[0], attention_dropout=0.0)
  torch_routes.torch_eager_route(w, 2, 16), torch_routes.torch_compiled_route(w, 2, 16)  # built, not run
  assert made == [wl.DROPOUT, 0.0] * 2  # the teacher (eval mode, no dropout runs), the student
