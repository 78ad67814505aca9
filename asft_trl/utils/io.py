"""Writing a file so that nobody ever reads half of it: to a temporary name beside it, then renamed over it."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: str | os.PathLike, write: str | Callable[[Path], object]) -> Path:
    """Write `path` through a temporary file in the same folder, renamed over it once complete (`os.replace`, atomic
    on one file system): a reader, or a run interrupted half-way, sees the old file or the new one, never a partial
    one. `write` is the text to write, or a function that writes the file it is given (`torch.save`, a figure's
    `savefig`); the temporary name keeps the suffix, for writers that choose the format from it. The temporary file
    is removed if writing fails."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        if isinstance(write, str):
            tmp.write_text(write)
        else:
            write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json_atomic(path: str | os.PathLike, data) -> Path:
    return write_atomic(path, json.dumps(data, indent=2))
