"""Several processes give the one-process result (issue 14), each checked against 1 process.

The real smoke distillation (dropout 0.1) runs as 2 CPU processes x 1 device, spawned here
with a free localhost port and `--coordinator-address/--num-processes/--process-id`, and
as 1 process x 2 devices; SIGTERM goes to one of the 2 processes; checkpoints written by 2
processes are exported, fine-tuned from and resumed on 1 process. Runs are shared by the
tests through module fixtures; a deadlock becomes a failure through timeouts.
"""

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import types

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from minilm_jax import atomic, checkpoint, cli, cluster, convert, digests, preemption
from minilm_jax.config import DistillConfig
from minilm_jax import workdir as workdir_lib
from minilm_jax.finetune import train as finetune_train
from minilm_jax.metric_writer import read_metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO = ROOT / "experiments" / "configs" / "demo.py"
MAX_STEPS = 12
ARGS = [f"--config={DEMO}:smoke", f"--config.max_steps={MAX_STEPS}", "--config.checkpoint_every=4",
        "--config.log_every=1", "--config.student_dropout=0.1"]
RUN_SECONDS = 400  # a whole run, compile included, on 2 busy cores
STOP_SECONDS = 60  # SIGTERM to exit of every process: longer is a deadlock


def _env(devices: int, cache: pathlib.Path) -> dict:
  drop = {"XLA_FLAGS", *cli.CLUSTER_FLAGS.values()}
  env = {k: v for k, v in os.environ.items() if k not in drop}
  env |= {"JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
          # Runs of one topology compile the same programs: compile them once.
          "JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  if devices > 1:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start(workdir: pathlib.Path, processes: int, devices: int = 1) -> list:
  """`distill` as `processes` processes of `devices` CPU devices each; logs beside the workdir."""
  cmd = [sys.executable, "-m", "minilm_jax", "distill", *ARGS, f"--workdir={workdir}"]
  cluster = lambda i: []
  if processes > 1:
    port = _free_port()
    cluster = lambda i: ["--coordinator-address", f"localhost:{port}", "--num-processes",
                         str(processes), "--process-id", str(i)]
  env = _env(devices, workdir.parent / "jax-cache")
  procs, run = [], len(list(workdir.parent.glob(f"{workdir.name}.*.log"))) // processes
  for i in range(processes):
    log = workdir.parent / f"{workdir.name}.{run}-{i}.log"  # a file: a full pipe would block
    with log.open("w") as out:
      procs.append(subprocess.Popen(cmd + cluster(i), env=env, stdout=out, stderr=subprocess.STDOUT,
                                    text=True, cwd=ROOT))
    procs[-1].log = log
  return procs


def _kill(procs: list) -> None:
  for p in procs:
    p.kill()
    p.wait()


def _finish(procs: list, timeout: float) -> list[tuple[int, str]]:
  """(exit code, output) of each process; all are killed, and the test fails, past `timeout`."""
  deadline = time.monotonic() + timeout
  try:
    for p in procs:
      p.wait(timeout=max(deadline - time.monotonic(), 0.1))
  except subprocess.TimeoutExpired:
    _kill(procs)
    pytest.fail(f"processes still running {timeout} s on (a deadlock); output:\n" +
                "\n".join(p.log.read_text()[-3000:] for p in procs))
  return [(p.returncode, p.log.read_text()) for p in procs]


def _run(workdir: pathlib.Path, processes: int, devices: int = 1) -> list[str]:
  """Runs `distill` to the end; the output of each process."""
  outcomes = _finish(_start(workdir, processes, devices), RUN_SECONDS)
  for code, out in outcomes:
    assert code == 0, out[-3000:]
  return [out for _, out in outcomes]


def _losses(workdir) -> list[dict]:
  """Per-step loss terms and gradient norm (not timings) of a run's metrics.jsonl."""
  return [{k: v for k, v in r.items() if k == "step" or k.startswith("loss/") or k == "grad_norm"}
          for r in read_metrics(workdir)]


def _assert_close(a: list[dict], b: list[dict], atol: float):
  assert [r["step"] for r in a] == [r["step"] for r in b] and a[0].keys() == b[0].keys()
  for x, y in zip(a, b):
    np.testing.assert_allclose([x[k] for k in x], [y[k] for k in x], rtol=0, atol=atol,
                               err_msg=f"step {x['step']}")


def _tensors(hf_dir) -> dict[str, np.ndarray]:
  return load_file(pathlib.Path(hf_dir) / "model.safetensors")


def _assert_tensors(a: dict, b: dict, atol: float):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=0, atol=atol, err_msg=k)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return tmp_path_factory.mktemp("multihost")


@pytest.fixture(scope="module")
def one_process(root):
  """The reference: 1 process x 2 devices."""
  _run(root / "one-process", 1, devices=2)
  return root / "one-process"


@pytest.fixture(scope="module")
def two_processes(root):
  _run(root / "two-processes", 2)
  return root / "two-processes"


@pytest.fixture(scope="module")
def preempted(root):
  """2 processes, SIGTERM to process 1 alone once step 2 is logged; a copy of the stopped run."""
  workdir = root / "preempted"
  procs = _start(workdir, 2)
  metrics, deadline = workdir / "metrics.jsonl", time.monotonic() + RUN_SECONDS
  while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
    if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
      _kill(procs)
      pytest.fail("the run ended or hung before step 2:\n" + procs[0].log.read_text()[-3000:])
    time.sleep(0.02)
  procs[1].send_signal(signal.SIGTERM)
  signalled = time.monotonic()
  outcomes = _finish(procs, STOP_SECONDS)
  seconds = time.monotonic() - signalled
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  shutil.copytree(workdir, root / "preempted-copy")
  return types.SimpleNamespace(workdir=workdir, copy=root / "preempted-copy", outcomes=outcomes,
                               seconds=seconds, steps=steps)


def test_two_processes_give_the_one_process_result(one_process, two_processes):
  assert json.loads((two_processes / "config.json").read_text())["student_dropout"] == 0.1
  losses = _losses(two_processes)
  assert [r["step"] for r in losses] == list(range(1, MAX_STEPS + 1))
  _assert_close(losses, _losses(one_process), atol=1e-6)
  _assert_tensors(_tensors(two_processes / "hf"), _tensors(one_process / "hf"), atol=1e-6)


def test_sigterm_to_one_process_stops_both_at_the_same_step(preempted):
  saved = [re.findall(r"every process saved step (\d+)", out) for _, out in preempted.outcomes]
  assert [code for code, _ in preempted.outcomes] == [preemption.PREEMPTED_EXIT_CODE] * 2, saved
  assert saved[0] == saved[1] and len(saved[0]) == 1, saved
  stopped = int(saved[0][0])
  assert 2 < stopped < MAX_STEPS and preempted.steps[-1] == stopped
  assert preempted.seconds < STOP_SECONDS
  assert not (preempted.workdir / "hf").exists()  # exported only when the run completes
  assert [r["step"] for r in read_metrics(preempted.workdir)] == list(range(1, stopped + 1))


def test_resumed_run_equals_the_uninterrupted_one_bit_for_bit(preempted, two_processes):
  _run(preempted.workdir, 2)
  resumed = preempted.workdir
  assert _losses(resumed) == _losses(two_processes)
  _assert_tensors(_tensors(resumed / "hf"), _tensors(two_processes / "hf"), atol=0)
  _, params, _, step = checkpoint.restore_params(resumed)
  _, expected, _, _ = checkpoint.restore_params(two_processes)
  assert step == MAX_STEPS
  jax.tree.map(np.testing.assert_array_equal, params.to_pure_dict(), expected.to_pure_dict())


def test_two_process_run_resumes_as_one_process_with_two_devices(preempted, one_process):
  [out] = _run(preempted.copy, 1, devices=2)
  resumed = preempted.copy
  assert f"resuming at step {preempted.steps[-1]}" in out
  _assert_close(_losses(resumed), _losses(one_process), atol=1e-6)
  _assert_tensors(_tensors(resumed / "hf"), _tensors(one_process / "hf"), atol=1e-6)


def _write_rte(glue_dir: pathlib.Path, split: str, n: int):
  rows = ["index\tsentence1\tsentence2\tlabel"]
  for i in range(n):
    word, label = (("yes", "entailment"), ("no", "not_entailment"))[i % 2]
    rows.append(f"{i}\tthe answer is {word} .\tit is {word} .\t{label}")
  (glue_dir / "RTE").mkdir(parents=True, exist_ok=True)
  (glue_dir / "RTE" / f"{split}.tsv").write_text("\n".join(rows) + "\n")


def test_two_process_checkpoint_converts_and_finetunes_on_one_device(two_processes, tmp_path):
  assert jax.device_count() == 1
  cli.main(["convert", "--from-checkpoint", str(two_processes), "--to-hf", str(tmp_path / "hf")])
  exported = _tensors(tmp_path / "hf")
  _assert_tensors(exported, _tensors(two_processes / "hf"), atol=0)  # the run's own export
  module, _ = finetune_train.build_model(finetune_train.FinetuneConfig(model=str(two_processes)), 2)
  _, params = convert.load_hf(tmp_path / "hf")
  encoder = jax.tree.map(np.asarray, nnx.state(module.encoder, nnx.Param).to_pure_dict())
  jax.tree.map(np.testing.assert_array_equal, encoder["layers"], params.to_pure_dict()["layers"])
  _write_rte(tmp_path / "glue", "train", 16)
  _write_rte(tmp_path / "glue", "dev", 8)
  cfg = finetune_train.FinetuneConfig(model=str(tmp_path / "hf"), task="rte", data=str(tmp_path / "glue"),
                                max_seq_len=16, batch_size=8, eval_batch_size=8, epochs=1)
  summary = finetune_train.run(cfg, tmp_path / "ft")
  assert np.isfinite(summary["history"][0]["train_loss"]) and (tmp_path / "ft" / "best").is_dir()


def test_cluster_flags_come_together_or_from_the_environment(monkeypatch, tmp_path):
  argv = ["distill", f"--config={DEMO}:smoke", f"--workdir={tmp_path}"]
  with pytest.raises(SystemExit, match="missing --num-processes .*--process-id"):
    cli.main(argv + ["--coordinator-address", "localhost:1234"])
  with pytest.raises(SystemExit, match="--process-id 2 must be below --num-processes 2"):
    cli.main(argv + ["--coordinator-address=localhost:1", "--num-processes=2", "--process-id=2"])
  monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
  with pytest.raises(SystemExit, match="JAX_NUM_PROCESSES='two'"):
    cli.main(argv)
  assert not tmp_path.joinpath("config.json").exists()


def test_a_process_whose_peers_never_join_fails_in_time_naming_them(tmp_path):
  """Process 0 of 2 started alone, and process 1 of 2 started alone (no coordinator), each end
  after --join-timeout with one line naming the coordinator, the count and who is missing,
  not with JAX's 5 minutes of silence and a C++ abort; nothing is written."""
  timeout, env, procs = 5, _env(1, tmp_path / "jax-cache"), []
  for i in (0, 1):
    address = f"localhost:{_free_port()}"
    cmd = [sys.executable, "-m", "minilm_jax", "distill", *ARGS, f"--workdir={tmp_path / str(i)}",
           "--coordinator-address", address, "--num-processes", "2", "--process-id", str(i),
           "--join-timeout", str(timeout)]
    procs.append((address, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT, text=True, cwd=ROOT)))
  outs = [(address, p.communicate(timeout=STOP_SECONDS + timeout)[0], p.returncode)
          for address, p in procs]
  for address, out, code in outs:
    assert code == cluster.JOIN_FAILED_EXIT_CODE and "Check failure" not in out, out[-3000:]
  (a0, out0, _), (a1, out1, _) = outs
  assert (f"error: process 0 waited {timeout} s at the coordinator {a0}, but the run's 2 processes "
          "did not all join: process 1 never joined; start every process") in out0
  assert f"error: process 1 waited {timeout} s at the coordinator {a1}, " in out1
  assert f"process 0, the coordinator, is not reachable at {a1}" in out1
  assert not any(tmp_path.glob("[01]"))
  assert "one or more of processes 1, 2, 3 never joined" in cluster.not_joined("h:1", 4, 0, 9, None)
  assert "one or more of processes 2, 3 never joined" in cluster.not_joined("h:1", 4, 1, 9, True)


def _torn_reads(path: pathlib.Path, write, rewrites: int = 300) -> int:
  """Reads of `path` that were not whole JSON while another thread rewrote it `rewrites` times."""
  texts = [json.dumps({"fill": "x" * 200_000, "n": n}) for n in range(2)]
  write(path, texts[0])
  done, torn = threading.Event(), 0

  def rewrite():
    for n in range(rewrites):
      write(path, texts[n % 2])
    done.set()

  threading.Thread(target=rewrite).start()
  while not done.is_set():
    try:
      json.loads(path.read_text())
    except json.JSONDecodeError:
      torn += 1
  return torn


def test_shared_files_are_replaced_whole_and_written_by_process_zero(tmp_path, monkeypatch):
  assert _torn_reads(tmp_path / "config.json", atomic.write_file) == 0
  assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # no temporary file left
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  workdir_lib.write(tmp_path / "run", DistillConfig(), {"sha256": "0"})
  assert list((tmp_path / "run").iterdir()) == []  # process 0 writes config.json, the others wait


def test_data_state_of_another_process_count_is_shared_or_refused_clearly(tmp_path):
  (tmp_path / "data").mkdir()
  with pytest.raises(digests.DamagedStep, match="holds no data iterator state"):
    checkpoint.data_state(tmp_path)
  for i, index in enumerate((8, 8)):
    (tmp_path / "data" / f"process_{i}-of-2.json").write_text(json.dumps({"next_index": index}))
  assert checkpoint.data_state(tmp_path) == {"next_index": 8}  # this is 1 process of 1
  (tmp_path / "data" / "process_1-of-2.json").write_text(json.dumps({"next_index": 9}))
  with pytest.raises(ValueError, match="different data iterator states .*--num-processes 2"):
    checkpoint.data_state(tmp_path)
