"""The command line: every command parses its flags one way (`cli.parse`, absl flags)."""

import pytest

from minilm_jax import cli

COMMANDS = ("distill", "data", "convert", "finetune", "evaluate", "benchmark", "compile")


def exit_of(argv) -> tuple[object, str]:
  with pytest.raises(SystemExit) as e:
    cli.main(argv)
  return e.value.code, str(e.value.code)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_lists_the_flags_and_exits_0(command, capsys):
  code, _ = exit_of([command, "--help"])
  out = capsys.readouterr().out
  assert code == 0 and out.startswith(f"usage: python -m minilm_jax {command}")
  assert "--" in out.split("\n", 1)[1]  # the flag list follows the usage line


@pytest.mark.parametrize("argv", [
    ["finetune", "--task", "rte", "--model", "m", "--workdir", "w", "stray"],
    ["distill", "--config", "experiments/configs/demo.py:smoke", "--workdir", "w", "stray"],
    ["data", "--corpus", "demo", "stray"],
])
def test_a_stray_argument_is_refused_not_ignored(argv):
  _, message = exit_of(argv)
  assert "unexpected arguments stray" in message and "usage:" in message


def test_missing_and_conflicting_flags_name_the_fix():
  assert "--model is required" in exit_of(["evaluate"])[1]
  assert "--model, --workdir are required" in exit_of(["finetune", "--task", "rte"])[1]
  message = exit_of(["convert", "--from-hf", "a", "--from-checkpoint", "b"])[1]
  assert "exactly one of --from-hf and --from-checkpoint" in message
  assert "--from-hf needs --to CKPT_DIR" in exit_of(["convert", "--from-hf", "a"])[1]
  assert "flag --show=x" in exit_of(["data", "--corpus", "demo", "--show=x"])[1]
  assert "is not BATCHxSEQ" in exit_of(["benchmark", "--shapes", "4x"])[1]
  assert "did you mean --config.epochs?" in exit_of(
      ["finetune", "--task", "rte", "--model", "m", "--workdir", "w", "--config.epoch=2"])[1]


def test_the_compile_command_names_what_is_missing_or_wrong():
  assert "--slice is required" in exit_of(["compile", "--workload", "base-v1"])[1]
  assert "exactly one of --config and --workload" in exit_of(["compile", "--slice", "v5e:2x2"])[1]
  assert "two questions" in exit_of(["compile", "--workload", "base-v1", "--slice", "v5e",
                                     "--smallest", "--max-batch"])[1]
  assert "unknown TPU generation 'v9': use one of v4, v5e, v5p, v6e" in exit_of(
      ["compile", "--workload", "base-v1", "--slice", "v9:2x2"])[1]
  assert "pass --out too" in exit_of(["compile", "--workload", "base-v1", "--slice", "v5e:2x2",
                                      "--markdown", "t.md"])[1]
  assert "unknown config 'base-v3'" in exit_of(["compile", "--workload", "base-v3", "--slice", "v5e:2x2"])[1]
