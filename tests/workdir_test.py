"""A workdir's saved config against the run that would reuse it."""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

import pytest

from minilm_jax import cli, distill, workdir
from minilm_jax.config import DistillConfig
from minilm_jax.finetune import train
from tiny import digest, smoke_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO = ROOT / "experiments" / "configs" / "demo.py"


def test_a_run_saved_under_a_field_s_earlier_name_keeps_that_field_frozen(tmp_path):
  """`num_relation_heads` is `relation_heads` now: a v2 run saved with 12 must not resume with 48."""
  saved = json.loads(json.dumps(vars(DistillConfig(version="v2", relation_heads=12))))
  saved["num_relation_heads"] = saved.pop("relation_heads")
  (tmp_path / workdir.CONFIG_FILE).write_text(json.dumps(saved))
  old = workdir.read_config(tmp_path)
  assert old["relation_heads"] == 12 and "num_relation_heads" not in old
  workdir.check_resumable(tmp_path, old, DistillConfig(version="v2", relation_heads=12))
  with pytest.raises(ValueError, match="another configuration .relation_heads: 12 -> 48"):
    workdir.check_resumable(tmp_path, old, DistillConfig(version="v2", relation_heads=48))


# ------------------------------------------------------------------ one writer per workdir

_HOLD = """
import sys, time
from minilm_jax import workdir
with workdir.lock(sys.argv[1]):
  print("held", flush=True)
  time.sleep(600)
"""


def _holder(path) -> subprocess.Popen:
  """A process holding `workdir.lock(path)` (the lock a running distill or finetune holds)."""
  proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(path)], stdout=subprocess.PIPE,
                          text=True, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.stdout.readline() == "held\n"
  return proc


def test_a_second_run_on_a_held_workdir_fails_at_once_naming_the_holder(tmp_path):
  """Two runs on one workdir both resumed, both wrote checkpoints and metrics.jsonl twice over."""
  held = tmp_path / "run"
  proc = _holder(held)
  try:
    holder = rf"pid {proc.pid} on host {socket.gethostname()}"
    started = time.perf_counter()
    with pytest.raises(BlockingIOError, match=rf"{held} is in use by {holder} .*one run writes a "
                       r"workdir at a time"):
      distill.run(smoke_config(), held)
    with pytest.raises(BlockingIOError, match=holder):
      train.run_seeds(train.FinetuneConfig(), held, [0])
    assert time.perf_counter() - started < 5  # before the teacher or any data is read
    assert sorted(p.name for p in held.iterdir()) == [workdir.LOCK_FILE]
  finally:
    proc.kill()
    proc.wait()


def test_a_lock_left_by_a_killed_run_is_taken_over_saying_so(tmp_path, caplog):
  held = tmp_path / "run"
  proc = _holder(held)
  proc.kill()  # kill -9: the lock file and its record stay, the flock goes with the process
  proc.wait()
  with workdir.lock(held):
    record = json.loads((held / workdir.LOCK_FILE).read_text())
    assert (record["pid"], record["host"]) == (os.getpid(), socket.gethostname())
  assert f"took over the lock on {held} left by pid {proc.pid} on host" in caplog.text
  assert list(held.iterdir()) == []  # released: the record goes


def test_what_a_killed_writer_left_is_removed_and_a_replaced_directory_put_back(tmp_path, caplog):
  (tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp" / "params").mkdir(parents=True)
  (tmp_path / "checkpoints" / "4").mkdir()
  (tmp_path / ".config.json.tmp-123").write_text("{")
  (tmp_path / ".hf.tmp-77").mkdir()
  (tmp_path / ".hf.old-77").mkdir()  # killed between write_dir's two renames: the only hf/
  (tmp_path / ".hf.old-77" / "config.json").write_text("{}")
  with workdir.lock(tmp_path):
    pass
  assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
      "checkpoints", "checkpoints/4", "hf", "hf/config.json"]
  assert "removed 3 unfinished writes" in caplog.text and "put back" in caplog.text


def test_a_workdir_that_is_a_file_is_named(tmp_path):
  (tmp_path / "run").write_text("")
  with pytest.raises(NotADirectoryError, match=r"--workdir .*run is a file: pass a directory"):
    distill.run(smoke_config(), tmp_path / "run")


def test_a_folder_that_holds_no_run_is_not_a_workdir_not_even_the_current_one(tmp_path):
  """`--workdir ''` is the current directory: a source checkout there once got a run's files."""
  (tmp_path / "notes.txt").write_text("mine")
  (tmp_path / "src").mkdir()
  with pytest.raises(ValueError, match=r"is not empty \(notes.txt, src\) and holds no distill run"):
    distill.run(smoke_config(), tmp_path)
  done = subprocess.run([sys.executable, "-m", "minilm_jax", "distill", "--config",
                         str(pathlib.Path(__file__).parents[1] / "experiments/configs/demo.py") + ":smoke",
                         "--workdir", ""], cwd=tmp_path, capture_output=True, text=True,
                        env=os.environ | {"PYTHONPATH": str(pathlib.Path(__file__).parents[1])})
  assert done.returncode == 1 and "is not empty (notes.txt, src) and holds no distill run" in done.stderr
  assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "src"]


def test_a_finished_run_without_its_checkpoints_is_not_trained_again(run_copy, corpus):
  """Rerunning would start at step 0 and replace the exported student."""
  shutil.rmtree(run_copy / "checkpoints")
  before = digest(run_copy)
  with pytest.raises(ValueError, match=r"holds a finished run's student \(hf/\) but no checkpoint"):
    distill.run(smoke_config(corpus=corpus), run_copy)
  assert digest(run_copy) == before


def test_every_process_of_a_pod_run_on_a_held_workdir_fails_at_once(tmp_path):
  """Process 0 holds the lock for the pod: the others learn of its refusal, not at a barrier."""
  held = tmp_path / "run"
  holder = _holder(held)
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  cmd = [sys.executable, "-m", "minilm_jax", "distill", f"--config={DEMO}:smoke", f"--workdir={held}",
         "--coordinator-address", f"localhost:{port}", "--num-processes", "2", "--process-id"]
  env = {k: v for k, v in os.environ.items() if k not in {"XLA_FLAGS", *cli.CLUSTER_FLAGS.values()}}
  env |= {"JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
  procs = [subprocess.Popen([*cmd, str(i)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  try:
    errors = [p.communicate(timeout=120)[1] for p in procs]
  finally:
    for p in (*procs, holder):
      p.kill()
      p.wait()
  assert [p.returncode for p in procs] == [1, 1], errors
  assert f"is in use by pid {holder.pid} on host {socket.gethostname()}" in errors[0].splitlines()[-1]
  assert "process 0 could not take the lock on" in errors[1].splitlines()[-1], errors[1][-2000:]
