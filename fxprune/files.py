"""Atomic file writes: a temporary file beside the target, renamed over it, so a reader (or a
run that is interrupted or fails its check) never sees half a file, and an older file at the
target stays as it was until the new one is complete."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def write_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A path to write ``path``'s content to (and files beside it, such as ONNX external data):
    it has the same name, in a private folder next to the target. When the block ends normally
    every file written there is renamed into the target's folder; when it raises, nothing is."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        yield tmp_dir / path.name
        for written in tmp_dir.iterdir():
            os.chmod(written, 0o644)  # a temporary file is private; a result file is not
            os.replace(written, path.parent / written.name)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
