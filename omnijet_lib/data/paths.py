"""Input paths as users give them: a file, a glob, or a list of both.

An argument that names an existing file is taken literally, even when its name holds ``[``,
``*`` or ``?`` (``a[1].root`` is that file, never ``a1.root``); anything else with those
characters is a glob and must match. Every result must be a regular file: a folder, a FIFO (which
would block the reader forever), a device, a socket, a dangling link or a link loop is refused
with one line before anything is opened, and so is a file given twice.
"""

from __future__ import annotations

import errno
import glob
import os
import stat
from pathlib import Path
from typing import Iterable

from ..io import OmnijetError

__all__ = ["input_files"]

_GLOB_CHARS = "*?["


def input_files(items: str | os.PathLike | Iterable, suffix: str = ".root") -> list[Path]:
    """The files named by ``items`` (a path, a glob or a list of them), in order, globs sorted.
    ``suffix`` only shapes the hint given for a folder (``pass a glob like 'DIR/*.root'``)."""
    if isinstance(items, (str, os.PathLike)):
        items = [items]
    out: list[Path] = []
    for item in items:
        s = os.fspath(item)
        if os.path.lexists(s) or not any(c in s for c in _GLOB_CHARS):
            out.append(Path(s))
            continue
        matches = sorted(glob.glob(s))
        if not matches:
            raise OmnijetError(f"{s}: no files match this pattern")
        out += [Path(m) for m in matches]
    if not out:
        raise OmnijetError("no input files given")
    seen: dict[tuple[int, int], Path] = {}
    for p in out:
        st = _stat(p, suffix)
        first = seen.setdefault((st.st_dev, st.st_ino), p)
        if first is not p:
            same = "" if str(first) == str(p) else f" (the same file as {first})"
            raise OmnijetError(f"{p}: given twice{same}; each input file may appear only once")
    return out


def _stat(p: Path, suffix: str) -> os.stat_result:
    """``os.stat`` of a regular file; anything else is one line saying what it is."""
    try:
        st = os.stat(p)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise OmnijetError(f"{p}: symbolic link loop, it never reaches a file") from None
        if err.errno == errno.ENOENT:
            why = "dangling symbolic link (its target does not exist)" if os.path.islink(p) else "file not found"
            raise OmnijetError(f"{p}: {why}") from None
        raise OmnijetError(f"{p}: cannot read ({err.strerror})") from None
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return st
    if stat.S_ISDIR(mode):
        raise OmnijetError(f"{p}: is a directory; pass a file or a glob like '{p}/*{suffix}'")
    what = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else
            "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else
            "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
    raise OmnijetError(f"{p}: is {what}, not a regular file; pass the file itself")
