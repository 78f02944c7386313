"""Bad input and faults end in a clear error or a correct recovery, and nothing written is lost.

Each case runs on the smoke config (experiments/configs/demo.py:smoke) over a two-file text corpus,
asserts the message names the fix, and hashes what an earlier run wrote before and after.
One finished run is shared by the cases (copied per case); most cases stop before any step.
"""

import ctypes
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import safetensors
import safetensors.numpy

from minilm_jax import checkpoint, cli, distill, preemption
from minilm_jax import workdir as workdir_lib
from minilm_jax.finetune import heads, train
from minilm_jax.metric_writer import read_metrics
from tiny import digest, fails, smoke_config
from minilm_jax.teachers import resolve_model_dir

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO = ROOT / "experiments" / "configs" / "demo.py"


# ------------------------------------------------------------------ 1. NaN guard before saves


def test_divergence_is_caught_before_a_save_and_the_last_finite_checkpoint_kept(corpus, tmp_path):
  # lr 1e30: step 1 runs at lr 0 (warmup), step 2's update makes the student overflow.
  cfg = smoke_config(corpus=corpus, learning_rate=1e30, max_steps=4, checkpoint_every=2, log_every=4,
                     keep_checkpoints=1, export_hf=False)
  with pytest.raises(FloatingPointError) as e:
    distill.run(cfg, tmp_path)
  message = str(e.value)
  assert "student diverged: rerun with a lower --config.learning_rate" in message
  assert "at step 3 (batch 2 of the data order)" in message or "at step 4 (batch 3" in message
  assert "last checkpoint (step 2) is finite and intact" in message
  ckpt = tmp_path / "checkpoints"
  assert sorted(p.name for p in ckpt.iterdir() if p.name.isdigit()) == ["2"]
  _, params, _, step = checkpoint.restore_params(ckpt)
  assert step == 2 and all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def _teacher_copy(tmp_path, edit):
  out = tmp_path / "teacher"
  shutil.copytree(resolve_model_dir("all-MiniLM-L6-v2"), out)
  tensors = safetensors.numpy.load_file(out / "model.safetensors")
  edit(tensors)
  safetensors.numpy.save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
  return out


def test_nan_teacher_weight_is_named_before_anything_is_written(corpus, tmp_path):
  def poison(tensors):
    tensors["encoder.layer.5.attention.self.value.weight"][0, 0] = np.nan
  teacher = _teacher_copy(tmp_path, poison)
  with pytest.raises(FloatingPointError, match=r"teacher/model\.safetensors has non-finite weights in 1 "
                     r"tensors, e\.g\. encoder\.layer\.5\.attention\.self\.value\.weight.*corrupt"):
    distill.run(smoke_config(corpus=corpus, teacher=str(teacher)), tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_teacher_overflow_is_told_apart_from_divergence(corpus, tmp_path):
  def overflow(tensors):  # finite weights whose outputs overflow float32
    tensors["encoder.layer.5.attention.self.value.weight"] *= np.float32(3e38)
  teacher = _teacher_copy(tmp_path, overflow)
  with pytest.raises(FloatingPointError, match=r"at step 1 \(batch 0 of the data order\): the "
                     r"teacher's outputs are non-finite.*Nothing non-finite was saved"):
    distill.run(smoke_config(corpus=corpus, teacher=str(teacher), export_hf=False), tmp_path / "run")
  assert not any(p.name.isdigit() for p in (tmp_path / "run" / "checkpoints").iterdir())


# ------------------------------------------------------------------ 2. nothing read is destroyed


def test_convert_refuses_an_output_that_overlaps_its_input(run_copy):
  before = digest(run_copy)
  for out, relation in ((run_copy, "is"), (run_copy / "checkpoints", "is inside"),
                        (run_copy / "checkpoints" / "export", "is inside")):
    message = fails(["convert", "--from-checkpoint", str(run_copy), "--to-hf", str(out), "--overwrite"])
    assert f"output {out} {relation} the input" in message and "outside the input" in message
  message = fails(["convert", "--from-hf", str(run_copy / "hf"), "--to", str(run_copy), "--overwrite"])
  assert f"output {run_copy} contains the input {run_copy / 'hf'}" in message
  assert digest(run_copy) == before


def test_distill_refuses_a_directory_that_is_not_a_run(corpus, tmp_path, finished):
  hf_dir = tmp_path / "model"
  shutil.copytree(finished / "hf", hf_dir)
  before = digest(hf_dir)
  with pytest.raises(ValueError, match=r"holds something other than a distill run \(.*config.json is "
                     r"a Hugging Face model's config\).*new or empty --workdir"):
    distill.run(smoke_config(corpus=corpus), hf_dir)
  assert digest(hf_dir) == before


def _write_rte(glue_dir, split, n):
  rows = ["index\tsentence1\tsentence2\tlabel"]
  for i in range(n):
    word, label = ("yes", "entailment") if i % 2 else ("no", "not_entailment")
    rows.append(f"{i}\tthe answer is {word} .\tit is {word} .\t{label}")
  (glue_dir / "RTE").mkdir(parents=True, exist_ok=True)
  (glue_dir / "RTE" / f"{split}.tsv").write_text("\n".join(rows[:n + 1]) + "\n")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_dir):
  """conftest's tiny random BERT (HF dir), its fine-tuned-shaped RTE export and an RTE folder."""
  root, encoder = tmp_path_factory.mktemp("tiny"), tiny_dir
  module, tok = train.build_model(train.FinetuneConfig(model=str(encoder), task="glue/rte"), 2)
  cls = heads.export_hf(root / "cls", module, tok, labels=("entailment", "not_entailment"))
  _write_rte(root / "glue", "train", 16)
  _write_rte(root / "glue", "dev", 8)
  return encoder, cls, root / "glue"


def test_finetune_keeps_old_metrics_until_a_new_record_replaces_them(tiny, tmp_path):
  encoder, _, glue_dir = tiny
  old = tmp_path / "metrics.jsonl"
  old.write_text('{"step": 2, "epoch": 1, "score": 0.5}\n')
  cfg = train.FinetuneConfig(model=str(encoder), task="rte", data=str(glue_dir), max_seq_len=16,
                                batch_size=8, eval_batch_size=8, epochs=1, learning_rate=1e30)
  with pytest.raises(FloatingPointError, match="training loss is nan in epoch 1"):
    train.run(cfg, tmp_path)
  assert old.read_text() == '{"step": 2, "epoch": 1, "score": 0.5}\n'


# ------------------------------------------------------------------ 3. validate before writing


@pytest.mark.parametrize("override,message", [
    ({"max_steps": 0}, "max_steps=0 must be a positive integer"),
    ({"log_every": 0}, "log_every=0 must be a positive integer"),
    ({"checkpoint_every": 0}, "checkpoint_every=0 must be a positive integer"),
    ({"compute_dtype": "float8"}, "compute_dtype 'float8' is unknown: did you mean 'float32'"),
    ({"seed": -1}, r"seed=-1 must be an integer in \[0, 2\*\*32\)"),
    ({"global_batch_size": 7, "grad_accum_steps": 2}, "global_batch_size 7 is not divisible"),
])
def test_bad_config_is_refused_before_anything_is_written(corpus, run_copy, tmp_path, override,
                                                          message):
  with pytest.raises(ValueError, match=message):
    distill.run(smoke_config(corpus=corpus, **override), tmp_path / "new")
  assert not (tmp_path / "new").exists()
  before = digest(run_copy)
  if "global_batch_size" in override:  # on an existing run, the resume guard speaks first
    message = r"another configuration \(global_batch_size: 8 -> 7; grad_accum_steps: 1 -> 2\)"
  with pytest.raises(ValueError, match=message):
    distill.run(smoke_config(corpus=corpus, **override), run_copy)
  assert digest(run_copy) == before


# ------------------------------------------------------------------ 4. resume guard


@pytest.mark.parametrize("field,value", [("clip_grad_norm", 0.5), ("two_segments", True),
                                         ("doc_per_line", True), ("data_dir", "/data/tfds"),
                                         ("text_feature", "content")])
def test_resume_refuses_changed_data_or_optimizer_fields(corpus, run_copy, field, value):
  before = digest(run_copy)
  old = getattr(smoke_config(corpus=corpus), field)
  with pytest.raises(ValueError, match=rf"another configuration \({field}: {old!r} -> {value!r}\)"):
    distill.run(smoke_config(corpus=corpus, **{field: value}, max_steps=6), run_copy)
  assert digest(run_copy) == before


def test_resume_refuses_a_changed_corpus_saying_what_changed(corpus, finished, tmp_path):
  changed = tmp_path / "corpus"
  shutil.copytree(corpus, changed)
  workdir = tmp_path / "run"
  shutil.copytree(finished, workdir)
  config = json.loads((workdir / "config.json").read_text()) | {"corpus": str(changed)}
  (workdir / "config.json").write_text(json.dumps(config))  # the same run, its corpus moved
  record = json.loads((workdir / "corpus.json").read_text())
  record["files"] = {str(changed / pathlib.Path(f).name): n for f, n in record["files"].items()}
  (workdir / "corpus.json").write_text(json.dumps(record))
  distill.run(smoke_config(corpus=changed, max_steps=4), workdir)  # unchanged corpus: resumes (done)
  size = (changed / "b.txt").stat().st_size
  with (changed / "b.txt").open("a") as f:
    f.write("\nA paragraph added after the run started.\n")
  before = digest(workdir)
  with pytest.raises(ValueError, match=rf"corpus changed .*b\.txt: {size} -> {size + 42} bytes; "
                     r"examples: \d+ -> \d+.*Restore the corpus, or use a new --workdir"):
    distill.run(smoke_config(corpus=changed, max_steps=6), workdir)
  assert digest(workdir) == before


# ------------------------------------------------------------------ 5. clear errors


def test_misspelt_config_key_and_variant_name_the_closest(corpus, tmp_path):
  message = fails(["distill", f"--config={DEMO}:smoke", f"--workdir={tmp_path / 'w'}",
                   "--config.max_stpes=3"])
  assert "DistillConfig has no field 'max_stpes'; did you mean --config.max_steps?" in message
  message = fails(["distill", f"--config={DEMO}:smok", f"--workdir={tmp_path / 'w'}"])
  assert "demo.py variant 'smok' is unknown: did you mean 'smoke'?" in message
  message = fails(["finetune", "--task", "rte", "--model", "m", f"--workdir={tmp_path / 'w'}",
                   "--config.epoch=2"])
  assert "FinetuneConfig has no field 'epoch'; did you mean --config.epochs?" in message
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("text,message", [
    ("", r"config.json is empty .*restore it, or use a new --workdir"),
    ("[1, 2]", r"config.json is not a distill config \(a JSON list"),
    ('{"teacher": "all-MiniLM-L6-v2", "student_layers": "one", "max_steps": 4}',
     r"config.json: student_layers is 'one', a str, but the run's student_layers is a int"),
])
def test_damaged_run_config_is_named(corpus, run_copy, text, message):
  (run_copy / "config.json").write_text(text)
  before = digest(run_copy)
  with pytest.raises(ValueError, match=message):
    distill.run(smoke_config(corpus=corpus), run_copy)
  assert digest(run_copy) == before


@pytest.mark.parametrize("edit,message", [
    (lambda hf: "", "config.json is empty"),
    (lambda hf: "[]", "config.json holds a JSON list, not an object"),
    (lambda hf: json.dumps(hf | {"num_hidden_layers": 0}), "num_layers is 0: it must be a positive"),
    (lambda hf: json.dumps(hf | {"hidden_size": "384"}), "hidden_size is '384': it must be a positive"),
])
def test_damaged_model_config_is_named(tiny, tmp_path, edit, message):
  model = tmp_path / "model"
  shutil.copytree(tiny[0], model)
  (model / "config.json").write_text(edit(json.loads((model / "config.json").read_text())))
  assert message in fails(["convert", "--from-hf", str(model), "--to", str(tmp_path / "ckpt")])
  assert not (tmp_path / "ckpt").exists()


def test_torn_metrics_line_is_named(run_copy):
  path = run_copy / "metrics.jsonl"
  first, second = path.read_text().splitlines()
  path.write_text(f'{first}\n{{"step": 3, "ti\n{second}\n')
  with pytest.raises(ValueError, match=rf"{path}:2 is not a JSON record .* remove that line"):
    read_metrics(run_copy)


def test_evaluate_errors_name_the_fix(tiny, tmp_path):
  _, cls, glue_dir = tiny
  base = ["evaluate", "--model", str(cls), "--task", "glue/rte", "--data"]
  assert "flag --batch-size=0: 0 is not a positive integer" in fails([*base, str(glue_dir), "--batch-size", "0"])
  header_only = tmp_path / "glue"
  _write_rte(header_only, "dev", 0)
  assert "RTE/dev.tsv has a header but no examples" in fails([*base, str(header_only)])
  headless = tmp_path / "cls"
  shutil.copytree(cls, headless)
  tensors = safetensors.numpy.load_file(headless / "model.safetensors")
  del tensors["classifier.bias"]
  safetensors.numpy.save_file(tensors, headless / "model.safetensors", metadata={"format": "pt"})
  message = fails(["evaluate", "--model", str(headless), "--task", "glue/rte", "--data", str(glue_dir)])
  assert "lacks the task head's classifier.bias" in message


def test_build_tfds_keeps_a_built_dataset_and_leaves_nothing_for_empty_text(corpus, tmp_path, capsys):
  built = tmp_path / "tfds"
  cli.main(["data", "--build-tfds", str(corpus / "a.txt"), "--data-dir", str(built)])
  capsys.readouterr()
  before = digest(built)
  cli.main(["data", "--build-tfds", str(corpus / "b.txt"), "--data-dir", str(built)])
  out = capsys.readouterr().out
  assert "already built in" in out and "kept the old data; pass --overwrite to rebuild it" in out
  assert digest(built) == before
  (tmp_path / "empty.txt").write_text("\n\n")
  message = fails(["data", "--build-tfds", str(tmp_path / "empty.txt"), "--data-dir",
                   str(tmp_path / "none")])
  assert "holds no text" in message and "nothing was built" in message
  assert not (tmp_path / "none").exists()


# ------------------------------------------------------------------ 7. unwritable checkpoints


def _without_root_override():
  """Child processes of root lose CAP_DAC_OVERRIDE / READ_SEARCH / FOWNER (chmod then binds)."""
  libc = ctypes.CDLL(None, use_errno=True)
  for cap in (1, 2, 3):  # PR_CAPBSET_DROP = 24; exec recomputes root's caps from the bounding set
    if libc.prctl(24, cap, 0, 0, 0) != 0:
      raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # the child only calls prctl, then exec
def _losing_permissions(tmp_path: pathlib.Path):
  """A `preexec_fn` under which a child process honours a read-only directory; else skips."""
  preexec = _without_root_override if os.geteuid() == 0 else None
  probe = tmp_path / "probe"
  probe.mkdir()
  probe.chmod(0o555)
  check = subprocess.run([sys.executable, "-c", f"open({str(probe / 'x')!r}, 'w')"],
                         preexec_fn=preexec, capture_output=True)
  if check.returncode == 0:
    pytest.skip("this user writes into a read-only directory (root without a droppable "
                "CAP_DAC_OVERRIDE): a lost permission cannot be simulated")
  return preexec


def test_unwritable_checkpoint_dir_fails_in_seconds_naming_it(corpus, tmp_path):
  preexec = _losing_permissions(tmp_path)
  workdir = tmp_path / "run"
  proc = subprocess.Popen(
      [sys.executable, "-m", "minilm_jax", "distill", f"--config={DEMO}:smoke", f"--workdir={workdir}",
       f"--config.corpus={corpus}", "--config.max_steps=2000", "--config.checkpoint_every=2",
       "--config.log_every=1", "--config.keep_checkpoints=100"],
      preexec_fn=preexec, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  ckpt = workdir / "checkpoints"
  deadline = time.time() + 240
  while not (ckpt / "2").is_dir() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  ckpt.chmod(0o555)
  lost_at = time.time()
  try:
    _, err = proc.communicate(timeout=60)
  finally:
    proc.kill()
    ckpt.chmod(0o755)
  assert proc.returncode != 0 and time.time() - lost_at < 60
  assert f"checkpoint directory {ckpt} is not writable" in err
  assert "rerun to resume from the last checkpoint" in err
  _, params, _, step = checkpoint.restore_params(ckpt)  # the last complete one reads back
  assert step >= 2 and all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


_LOST_AFTER_THE_PROBE = """
import dataclasses, pathlib, sys
import grain, jax.numpy as jnp
from minilm_jax import checkpoint, step
directory, elsewhere = pathlib.Path(sys.argv[1]), sys.argv[2]
mngr = checkpoint.manager(directory)
state = step.TrainState(step=jnp.int32(2), params={"w": jnp.ones(3)}, opt_state={"m": jnp.ones(3)},
                        rng=jnp.zeros(2, jnp.uint32))
iterator = iter(grain.MapDataset.range(4).to_iter_dataset())
checkpoint.save_state(mngr, state, iterator)
mngr.wait_until_finished()
directory.chmod(0o555)
probe = checkpoint.tempfile.NamedTemporaryFile  # the write probe passes: it writes elsewhere
checkpoint.tempfile.NamedTemporaryFile = lambda dir, **kw: probe(dir=elsewhere, **kw)
checkpoint.save_state(mngr, dataclasses.replace(state, step=jnp.int32(4)), iterator)
"""


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # the child only calls prctl, then exec
def test_permission_lost_after_the_write_probe_still_fails_in_seconds(tmp_path):
  """Orbax made a step's directory on its writer thread, and `save` waited minutes for it."""
  preexec = _losing_permissions(tmp_path)
  directory = tmp_path / "checkpoints"
  directory.mkdir()
  started = time.time()
  try:
    proc = subprocess.run([sys.executable, "-c", _LOST_AFTER_THE_PROBE, str(directory), str(tmp_path)],
                          preexec_fn=preexec, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  finally:
    directory.chmod(0o755)
  assert proc.returncode != 0 and time.time() - started < 60, proc.stderr[-2000:]
  assert (f"checkpoint directory {directory} is not writable (Permission denied)" in proc.stderr
          and "resume from the last checkpoint (step 2)" in proc.stderr), proc.stderr[-2000:]


# ------------------------------------------------------------------ 8. corrupt latest checkpoint


def test_corrupt_latest_checkpoint_offers_and_takes_resume_from_step(corpus, finished, run_copy):
  """As a kill -9 mid-write leaves it: step 4 damaged and a torn metrics record."""
  for f in (run_copy / "checkpoints" / "4" / "opt_state").rglob("*"):
    if f.is_file() and f.stat().st_size > 200:
      f.write_bytes(b"\0" * 8)
  with (run_copy / "metrics.jsonl").open("a") as f:
    f.write('{"step": 5, "ti')
  corrupt, before = digest(run_copy / "checkpoints" / "4"), digest(run_copy)
  argv = ["distill", f"--config={DEMO}:smoke", f"--workdir={run_copy}", f"--config.corpus={corpus}"]
  message = fails(argv)
  assert "checkpoints/4 could not be restored" in message
  assert "resume from step 2 with --resume-from-step 2 (later steps are moved aside" in message
  assert digest(run_copy) == before
  cli.main([*argv, "--resume-from-step=2"])
  (moved,) = (run_copy / "discarded-checkpoints").iterdir()
  assert moved.name.startswith("4-") and digest(moved) == corrupt  # moved, not deleted
  _, redone, _, step = checkpoint.restore_params(run_copy)
  _, straight, _, _ = checkpoint.restore_params(finished)
  assert step == 4 and [r["step"] for r in read_metrics(run_copy)] == [2, 4]  # torn tail dropped
  for a, b in zip(jax.tree.leaves(redone), jax.tree.leaves(straight)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # exact resume from step 2


def test_resume_from_a_missing_step_names_the_steps_there(corpus, run_copy):
  before = digest(run_copy)
  with pytest.raises(ValueError, match=r"--resume-from-step 3: .*checkpoints has steps \[2, 4\]"):
    distill.run(smoke_config(corpus=corpus), run_copy, resume_from_step=3)
  assert digest(run_copy) == before


# ------------------------------------------------------------------ 9. interruptions


def _distill_until_logged(workdir: pathlib.Path, corpus, records: int) -> subprocess.Popen:
  """A long smoke `distill` in its own session (as a terminal's job), once `records` are logged."""
  proc = subprocess.Popen(
      [sys.executable, "-m", "minilm_jax", "distill", f"--config={DEMO}:smoke", f"--workdir={workdir}",
       f"--config.corpus={corpus}", "--config.max_steps=2000", "--config.checkpoint_every=1000",
       "--config.log_every=1"],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  deadline, metrics = time.time() + 240, workdir / "metrics.jsonl"
  while proc.poll() is None and time.time() < deadline and not (
      metrics.is_file() and len(metrics.read_text().splitlines()) >= records):
    time.sleep(0.05)
  return proc


def test_ctrl_c_saves_the_step_and_exits_130_without_a_traceback(corpus, tmp_path):
  """Ctrl-C gave a KeyboardInterrupt traceback and saved nothing; SIGTERM saved and exited 75."""
  workdir = tmp_path / "run"
  proc = _distill_until_logged(workdir, corpus, 2)
  os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends: the whole job
  try:
    out, err = proc.communicate(timeout=120)
  finally:
    proc.kill()
  assert proc.returncode == preemption.INTERRUPTED_EXIT_CODE == 130, err[-3000:]
  assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
  (stopped,) = map(int, re.findall(r"SIGINT: every process saved step (\d+); exiting with code 130",
                                   err))
  assert json.loads(out)["preempted"] == "SIGINT" and stopped >= 2
  _, params, _, step = checkpoint.restore_params(workdir)
  assert step == stopped and not (workdir / workdir_lib.LOCK_FILE).exists()


def test_ctrl_c_before_the_steps_or_in_another_command_exits_130_in_one_line(monkeypatch, capsys):
  def interrupted(argv):
    raise KeyboardInterrupt
  monkeypatch.setitem(cli.COMMANDS, "finetune", interrupted)
  with pytest.raises(SystemExit) as e:
    cli.main(["finetune"])
  assert e.value.code == 130
  assert capsys.readouterr().err == ("interrupted (Ctrl-C): rerun the same command to go on "
                                     "(distill resumes from its last checkpoint)\n")

# ------------------------------------------------------------------ 10. a full disk

_FULL_DISK = """
import shutil, sys
from minilm_jax import cli
if sys.argv[1] == "mid-write":  # the room check passes: the disk fills while Orbax writes
  usage = shutil.disk_usage
  shutil.disk_usage = lambda path: usage(path)._replace(free=1 << 40)
cli.main(sys.argv[2:])
"""


def _distill_on_a_small_disk(tmp_path, corpus, mode: str, mebibytes: int):
  """The smoke `distill` with its workdir on a `mebibytes` tmpfs of its own (a private mount
  namespace); (exit code, stderr, a copy of the workdir). Skips where mounting is not allowed."""
  disk, out = tmp_path / "disk", tmp_path / "out"
  disk.mkdir()
  probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {disk}"],
                         capture_output=True, text=True)
  if probe.returncode != 0:
    pytest.skip(f"a small tmpfs cannot be mounted here ({probe.stderr.strip()}): needs "
                "CAP_SYS_ADMIN in a user or mount namespace")
  argv = ["distill", f"--config={DEMO}:smoke", f"--workdir={disk / 'run'}", f"--config.corpus={corpus}"]
  script = (f"mount -t tmpfs -o size={mebibytes}m tmpfs {disk} && "
            f"{sys.executable} -c '{_FULL_DISK}' {mode} {' '.join(argv)}; code=$?; "
            f"cp -a {disk / 'run'} {out}; exit $code")
  proc = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True,
                        cwd=ROOT, timeout=400, env={**os.environ, "JAX_PLATFORMS": "cpu",
                                                    "PYTHONPATH": str(ROOT)})
  return proc.returncode, proc.stderr, out


@pytest.mark.parametrize("mode", ["room", "mid-write"])
def test_a_full_disk_names_the_intact_step_and_leaves_no_half_written_one(corpus, tmp_path, mode):
  """An 80 MiB disk holds step 2 (53 MiB), not step 4: a 328-line Orbax traceback said neither
  which step was intact nor that a rerun resumes, and left 4.orbax-checkpoint-tmp behind."""
  code, err, run = _distill_on_a_small_disk(tmp_path, corpus, mode, 80)
  last = err.strip().splitlines()[-1]
  assert code == 1 and last.startswith("error: [Errno 28] checkpoint directory "), err[-3000:]
  assert ("checkpoints is not writable (No space left on device" in last and "step 4 was not "
          "saved, nothing of it is left" in last and "rerun to resume from the last checkpoint "
          "(step 2), which is intact" in last), last
  if mode == "room":  # found before anything was written: one line, no traceback
    assert "Traceback" not in err and "a step takes at least 53 MiB" in last, err[-3000:]
  assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
      "2", "digests.json", "model.json", "tokenizer"]
  if mode == "mid-write":  # on a disk with room, the same command resumes from step 2
    cli.main(["distill", f"--config={DEMO}:smoke", f"--workdir={run}", f"--config.corpus={corpus}"])
    assert [r["step"] for r in read_metrics(run)] == [2, 4] and (run / "hf").is_dir()


def test_a_full_disk_during_the_export_leaves_no_half_written_export(run_copy, corpus, monkeypatch):
  """It ended in an uncaught SafetensorError."""
  shutil.rmtree(run_copy / "hf")

  def full(tensors, path, metadata=None):
    pathlib.Path(path).write_bytes(b"\0" * 1000)  # what a disk took before it filled
    raise safetensors.SafetensorError('Error while serializing: IoError(Os { code: 28, kind: '
                                      'StorageFull, message: "No space left on device" })')
  monkeypatch.setattr(safetensors.numpy, "save_file", full)
  message = fails(["distill", f"--config={DEMO}:smoke", f"--workdir={run_copy}",
                   f"--config.corpus={corpus}"])
  assert (f"{run_copy / 'hf'} could not be written (No space left on device): nothing of it is "
          "left; free disk space or restore write permission, then rerun the same command (the "
          "run's step 4 is saved and intact: the rerun resumes there and writes it again)" in message)
  assert not (run_copy / "hf").exists() and not list(run_copy.glob(".hf*"))
