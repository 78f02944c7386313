"""Atomic writes: a reader sees a file or directory whole, old or new, never half-written.

Exports, checkpoint directories and a run's config files are written through a
temporary sibling that is renamed into place (`os.replace` for a file, a directory
rename for a directory), so a crash or a host polling a shared file system never finds
a torn one. What a killed writer leaves (those siblings, Orbax's `*.orbax-checkpoint-tmp*`
step directories) is hidden from readers and removed by `clean_leftovers`.
"""

import logging
import os
import pathlib
import re
import shutil

# What writers killed mid-write leave: this module's siblings, Orbax's unfinished steps
# and `checkpoint.save_state`'s write probe.
LEFTOVERS = (".*.tmp-*", ".*.old-*", "*.orbax-checkpoint-tmp*", ".write-probe-*")


def check_not_overlapping(sources, out_dir: str | os.PathLike) -> None:
  """Refuses an output directory that is a source, lies inside one, or contains one."""
  out = pathlib.Path(out_dir).expanduser().resolve()
  for src in sources:
    src = pathlib.Path(src).expanduser().resolve()
    if out == src or src in out.parents or out in src.parents:
      relation = ("is" if out == src else "is inside" if src in out.parents else "contains")
      raise ValueError(f"output {out_dir} {relation} the input {src}: writing it would replace "
                       "what is being read; choose an output directory outside the input")


def write_file(path: pathlib.Path, data: str | bytes) -> None:
  """Writes `path` through a temporary sibling and `os.replace`.

  A reader (another host polling a shared file system) sees the old file or the new one,
  never a torn one.
  """
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  tmp.write_bytes(data.encode() if isinstance(data, str) else data)
  os.replace(tmp, path)


def write_dir(out_dir: pathlib.Path, write, *, overwrite: bool, sources=()) -> pathlib.Path:
  """Runs `write(tmp)` into a temporary sibling, then renames it to `out_dir`.

  A failure leaves `out_dir` as it was; with `overwrite`, the old directory is removed
  only after the new one is complete. An `out_dir` overlapping one of `sources` (the
  directories read) is refused before anything is written.
  """
  out_dir = pathlib.Path(out_dir)
  check_not_overlapping(sources, out_dir)
  if out_dir.exists() and not overwrite:
    raise FileExistsError(f"{out_dir} already exists: choose another output directory or pass "
                          "--overwrite to replace it")
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir()
  try:
    write(tmp)
  except BaseException as e:
    shutil.rmtree(tmp, ignore_errors=True)
    code = write_errno(e)
    if code is None:
      raise
    kept = "the old one is kept" if out_dir.exists() else "nothing of it is left"
    raise OSError(code, f"{out_dir} could not be written ({os.strerror(code)}): {kept}; free disk "
                  "space or restore write permission, then rerun the same command") from e
  old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
  if out_dir.exists():
    out_dir.rename(old)
  tmp.rename(out_dir)
  shutil.rmtree(old, ignore_errors=True)
  return out_dir


def write_errno(error: BaseException) -> int | None:
  """The errno of a failed write in `error` or its causes, else None: an OSError's, or the OS
  code that tensorstore (Orbax) or safetensors writes into its own error's message."""
  while error is not None:
    if isinstance(error, OSError) and error.errno:
      return error.errno
    found = re.search(r"os_error_code='(\d+)'|Os \{ code: (\d+)", str(error))
    if found:
      return int(found[1] or found[2])
    error = error.__cause__ or error.__context__
  return None


def clean_leftovers(directory: pathlib.Path) -> None:
  """Removes what writers killed mid-write left under `directory`, saying so.

  Only the one writer of `directory` may call it (`workdir.lock`): another's temporary
  files would go too. A `.NAME.old-PID` directory whose replacement never arrived (killed
  between `write_dir`'s two renames) is the last complete NAME: it is put back, not removed.
  """
  found = sorted({p for pattern in LEFTOVERS for p in pathlib.Path(directory).rglob(pattern)},
                 key=lambda p: len(p.parts))
  removed = []
  for path in found:
    if not path.exists():  # inside one removed before
      continue
    old = re.fullmatch(r"\.(.+)\.old-\d+", path.name)
    if old and not (path.parent / old[1]).exists():
      path.rename(path.parent / old[1])
      logging.warning("put back %s as %s: a run was killed while replacing it", path, old[1])
      continue
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    removed.append(str(path.relative_to(directory)))
  if removed:
    logging.warning("removed %d unfinished writes a killed run left in %s: %s", len(removed),
                    directory, ", ".join(removed))
