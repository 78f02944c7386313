"""Every Python and shell block of README.md, docs/*.md and experiments/**/README.md runs,
so a snippet cannot rot.

Each page's blocks run in order in a fresh directory (`experiments/` linked in), so one
block may use what an earlier one made. Python blocks run as written. A shell line's
commands are each checked the cheapest true way:
- `python -m minilm_jax ...` runs here when it is cheap (a `smoke` config, the demo
  corpus, `--help`, or a model an earlier block made); any other is parsed exactly as the
  command parses it (`cli_flags.parse`: its flags, the `--config file.py:variant` and the
  `--config.key=value` overrides) and its run config checked, but not run;
- `python -m experiments.<kind>.<name> ...` parses its absl flags without running;
- setup (venv, pip, pytest, `python -c`) is checked for the files and code it names;
- a command the test cannot check fails it: teach `_check_command` about it.
Parsing takes well under a second a command. What runs here (README's smoke run, the
one in docs/levers.md and docs/python-api.md, a smoke compile in docs/tpu-compile.md, the
conversions in docs/checkpoints.md) makes the test take about 45 s on 2 idle CPU cores.
"""

import importlib
import pathlib
import re
import runpy
import shlex
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(p.relative_to(ROOT).as_posix()
                             for p in [*ROOT.glob("docs/*.md"), *ROOT.glob("experiments/**/README.md")])]
BLOCK = re.compile(r"^```(bash|python)\n(.*?)^```$", flags=re.M | re.S)
OPERATORS = {"&&", "||", ";", "&", "|"}
RUN_CONFIG = "minilm_jax.config"  # check_config of a parsed DistillConfig


class _Parsed(Exception):
  """Raised where a command has parsed its flags and would start its work."""

  def __init__(self, flag_values):
    super().__init__("parsed")
    self.flag_values = flag_values


def _commands(line: str) -> list[list[str]]:
  """The simple commands of one shell line (words, environment assignments dropped)."""
  lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
  lexer.whitespace_split = True
  commands, words = [], []
  for token in lexer:
    if token in OPERATORS:
      commands.append(words)
      words = []
    else:
      words.append(token)
  commands.append(words)
  out = []
  for words in commands:
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
      words = words[1:]
    if words:
      out.append(words)
  return out


def _value(argv: list[str], flag: str) -> str | None:
  return argv[argv.index(flag) + 1] if flag in argv else None


def _runs_here(argv: list[str]) -> bool:
  """A `minilm_jax` command cheap enough to run in the test: seconds on a CPU."""
  if "--help" in argv:
    return True
  if any(a.startswith(("--distributed", "--coordinator-address", "--num-processes")) for a in argv):
    return False  # processes that wait for each other
  if any("smoke" in a for a in argv):
    return True
  if argv[0] == "data":
    return _value(argv, "--corpus") == "demo"
  if argv[0] == "convert":  # from a workdir an earlier block made, or the packaged teacher
    source = _value(argv, "--from-checkpoint") or _value(argv, "--from-hf")
    return source == "all-MiniLM-L6-v2" or pathlib.Path(source).exists()
  return False


def _exit_ok(e: SystemExit, what: str) -> None:
  if e.code not in (None, 0):
    pytest.fail(f"{what} exited with {e.code}")


def _patch_parse(monkeypatch) -> None:
  """Every command's `cli_flags.parse` raises `_Parsed` with its flags instead of returning."""
  from minilm_jax import cli_flags
  real = cli_flags.parse

  def parse_only(*args, **kwargs):
    raise _Parsed(real(*args, **kwargs))

  for name, module in list(sys.modules.items()):
    if name.startswith(("minilm_jax", "experiments")) and getattr(module, "parse", None) is real:
      monkeypatch.setattr(module, "parse", parse_only)


def _check_run_config(flag_values) -> None:
  """The run config's own check, as a run does before anything is written."""
  if "config" in flag_values and type(flag_values.config).__name__ == "DistillConfig":
    importlib.import_module(RUN_CONFIG).check_config(flag_values.config)


def _minilm_jax(argv: list[str], monkeypatch) -> None:
  from minilm_jax import cli
  what = f"python -m minilm_jax {shlex.join(argv)}"
  if _runs_here(argv):
    try:
      cli.main(argv)
    except SystemExit as e:
      _exit_ok(e, what)
    return
  with monkeypatch.context() as m:
    _patch_parse(m)
    try:
      cli.main(argv)
    except _Parsed as parsed:
      _check_run_config(parsed.flag_values)
      return
    except SystemExit as e:
      pytest.fail(f"{what} does not parse: {e.code}")
  pytest.fail(f"{what} ran instead of stopping at its flags")


def _experiment(module: str, args: list[str], monkeypatch) -> None:
  """`python -m experiments.<kind>.<name>`: its absl flags parsed (`cli_flags.parse`, or
  `app.run`), its work not run."""
  from absl import app, flags
  assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), f"no module {module} in the repository"
  before = set(flags.FLAGS)

  def parse_only(main, argv=None, **_):
    raise _Parsed(flags.FLAGS(argv or sys.argv))

  with monkeypatch.context() as m:
    _patch_parse(m)
    m.setattr(app, "run", parse_only)
    m.setattr(sys, "argv", [module, *args])
    try:
      runpy.run_module(module, run_name="__main__")
    except _Parsed:
      return
    except SystemExit as e:
      pytest.fail(f"python -m {module} {shlex.join(args)} does not parse: {e.code}")
    finally:
      for name in set(flags.FLAGS) - before:
        delattr(flags.FLAGS, name)
      flags.FLAGS.unparse_flags()
  pytest.fail(f"python -m {module} {shlex.join(args)} ran instead of stopping at its flags")


def _pip(args: list[str]) -> None:
  """`pip install -r FILE ... -e ".[EXTRA]"`: the files and the extras exist."""
  assert args[0] == "install", args
  for flag, value in zip(args, args[1:]):
    if flag == "-r":
      assert (ROOT / value).is_file(), f"pip -r {value}: no such file"
    if flag == "-e":
      path, _, extras = value.partition("[")
      assert path == "." and (ROOT / "pyproject.toml").is_file(), value
      declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
      for extra in filter(None, extras.rstrip("]").split(",")):
        assert extra in declared, f"pip -e {value}: pyproject.toml has no extra {extra!r}"


def _python(args: list[str], monkeypatch) -> None:
  if args[:2] == ["-m", "minilm_jax"]:
    _minilm_jax(args[2:], monkeypatch)
  elif args[:2] == ["-m", "venv"]:
    pass
  elif args[:2] == ["-m", "pytest"]:
    assert all((ROOT / a).exists() for a in args[2:] if not a.startswith("-") and not a.isdigit())
  elif args[0] == "-c":
    compile(args[1], "python -c", "exec")
  elif args[0] == "-m" and args[1].startswith("experiments."):
    _experiment(args[1], args[2:], monkeypatch)
  else:
    pytest.fail(f"docs_test cannot check python {shlex.join(args)}")


def _check_command(words: list[str], monkeypatch) -> None:
  name = pathlib.PurePath(words[0]).name
  if name in ("python", "python3"):
    _python(words[1:], monkeypatch)
  elif name == "pip":
    _pip(words[1:])
  elif name == "gcloud":  # a command run on every TPU VM: `--command="..."`
    command = next(w.partition("=")[2] for w in words if w.startswith("--command="))
    for inner in _commands(command):
      _check_command(inner, monkeypatch)
  elif name == "srun":  # SLURM options, then the command
    start = next(i for i, w in enumerate(words) if pathlib.PurePath(w).name == "python")
    _check_command(words[start:], monkeypatch)
  elif name.endswith(".sh") or name == "bash":
    script = words[1] if name == "bash" else words[0]
    assert (ROOT / script).is_file(), f"{script} is not a file of the repository"
  elif name in ("cd", "wait"):
    pass
  else:
    pytest.fail(f"docs_test cannot check the command {shlex.join(words)}")


def _blocks(page: str) -> list[tuple[str, str]]:
  return BLOCK.findall((ROOT / page).read_text())


@pytest.mark.parametrize("page", PAGES)
def test_every_block_runs(page, tmp_path, monkeypatch):
  """Python blocks run as written; shell blocks run here or parse (see the module docstring)."""
  (tmp_path / "experiments").symlink_to(ROOT / "experiments")
  monkeypatch.chdir(tmp_path)
  namespace = {"__name__": page}
  for language, text in _blocks(page):
    if language == "python":
      exec(compile(text, page, "exec"), namespace)  # noqa: S102 - our own docs
      continue
    for line in text.replace("\\\n", " ").splitlines():
      for words in _commands(line):
        _check_command(words, monkeypatch)


def test_ci_runs_the_readmes_test_command():
  """.ci/run extracts the README's test command: the last line of its first shell block."""
  extract = re.search(r"^test_command=\$\((.*)\)$", (ROOT / ".ci" / "run").read_text(), flags=re.M)
  got = subprocess.run(["bash", "-c", extract[1]], cwd=ROOT, capture_output=True, text=True,
                       check=True).stdout.strip()
  first_block = next(text for language, text in _blocks("README.md") if language == "bash")
  assert got == first_block.strip().splitlines()[-1]
  assert got.startswith(".venv/bin/python -m pytest"), got
