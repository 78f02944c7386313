"""README.md's Python blocks run as written (the packaged teacher, a tiny random student)."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_every_python_block_of_the_readme_runs(capsys):
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
  assert blocks, "README.md has no Python block"
  for block in blocks:
    exec(compile(block, str(README), "exec"), {"__name__": "readme"})  # noqa: S102 - our own docs
  assert capsys.readouterr().out.strip()  # the snippet prints its loss
