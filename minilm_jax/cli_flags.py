"""How every command reads its flags: absl flags, as the Flax examples do.

`--name value` or `--name=value`, booleans as `--name` / `--noname`, `--help` for the
list; an ml_collections `--config` (a config file, or the fields of a dataclass) with
`--config.key=value` overrides. Every error exits with one line that names the fix and
the command's usage: an unknown or malformed flag, a stray argument, a missing flag, a
`--config.key` that names no field (with the closest one).
"""

import dataclasses
import sys
from typing import Callable

from absl import flags


def _flag_error(e: Exception) -> str:
  """A flag error without the config file's traceback that ml_collections pastes into it."""
  text = str(e)
  if "Traceback (most recent call last)" not in text:
    return text
  lines = [line for line in text.splitlines() if line.strip()]
  return f"{lines[0].removesuffix('Error whilst parsing config file:').rstrip()} {lines[-1]}"


def _unknown_override(argv: list[str], config) -> str | None:
  """The first `--config.key` naming no field of `config`, with the closest field (difflib)."""
  import difflib
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    key = arg.removeprefix("--config.").split("=", 1)[0]
    node, path = config, []
    for part in key.split("."):
      names = [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []
      if part not in names:
        close = difflib.get_close_matches(part, names, n=1)
        where = ".".join(["config", *path])
        hint = f"did you mean --{where}.{close[0]}?" if close else f"fields: {', '.join(names)}"
        return f"--config.{key}: {type(node).__name__} has no field {part!r}; {hint}"
      node, path = getattr(node, part), [*path, part]
  return None


CONFIG_FILE = "file"  # `parse(config=CONFIG_FILE)`: --config names an experiments/configs/*.py file


def _define_config(fv: flags.FlagValues, argv: list[str], config) -> None:
  """`--config`: an experiments/configs/*.py file (`CONFIG_FILE`) or overrides of the dataclass
  instance `config`; `sys_argv` makes ml_collections read the overrides from `argv`, not
  sys.argv (in-process calls)."""
  from ml_collections import config_flags
  if config == CONFIG_FILE:
    config_flags.DEFINE_config_file("config", None, "experiments/configs/*.py config file", flag_values=fv,
                                    lock_config=False, sys_argv=argv)
  else:
    config_flags.DEFINE_config_dataclass("config", config, f"{type(config).__name__} fields",
                                         flag_values=fv, sys_argv=argv)


def parse(command: str, argv: list[str], define: Callable[[flags.FlagValues], None], usage: str,
          required: tuple[str, ...] = (), config=None) -> flags.FlagValues:
  """The flags `define` declares, and `--config` when `config` is given (`CONFIG_FILE`, or a
  dataclass instance whose fields `--config.key=value` overrides), parsed from `argv`;
  `--help` prints them and exits.

  Every error exits with "error: ..." and the usage line: an unknown or malformed flag,
  a missing `required` one, a `--config.key` that names no field (with the closest).
  """
  argv = [f"minilm_jax {command}", *argv]
  fv = flags.FlagValues()
  if config is not None:
    if dataclasses.is_dataclass(config) and (unknown := _unknown_override(argv, config)):
      sys.exit(f"error: {unknown}\n{usage}")  # ml_collections fails on it while defining the flag
    _define_config(fv, argv, config)
  define(fv)
  if "--help" in argv or "-h" in argv:
    print(f"{usage}\n\n{fv.get_help()}")
    sys.exit(0)
  try:
    rest = fv(argv)[1:]
  except flags.Error as e:
    sys.exit(f"error: {_flag_error(e)}\n{usage}")
  except (KeyError, AttributeError) as e:  # ml_collections: an override naming no field
    bare, plain = flags.FlagValues(), [a for a in argv if not a.startswith("--config.")]
    _define_config(bare, plain, CONFIG_FILE)  # the config file's dataclass, without the overrides
    bare(plain, known_only=True)
    sys.exit(f"error: {_unknown_override(argv, bare.config) or e}\n{usage}")
  if rest:
    sys.exit(f"error: unexpected arguments {' '.join(rest)}: flags are --name value\n{usage}")
  if missing := [f"--{name}" for name in required if fv[name].value is None]:
    sys.exit(f"error: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required\n{usage}")
  return fv


def one_of(fv: flags.FlagValues, names: tuple[str, str], usage: str) -> str:
  """The one of two mutually exclusive flags that was given."""
  given = [name for name in names if fv[name].value is not None]
  if len(given) != 1:
    sys.exit(f"error: pass exactly one of --{names[0]} and --{names[1]}\n{usage}")
  return given[0]
