"""What zoo.py (the parent) and zoo_child.py share; imports nothing heavy, so that the parent
runs (and records a child's failure) even when fxprune itself does not import."""
from __future__ import annotations

from pathlib import Path

PHASES = ("trace", "analyze", "insert_gates", "finalize")
NEEDS_224 = ("vit_", "swin_", "maxvit_")


def input_size(name: str, requested: int) -> int:
    if name.startswith(NEEDS_224):
        return 224
    if name == "inception_v3":
        return max(requested, 75)
    return requested


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """The ``Vm*`` lines of /proc/<pid>/status in bytes ({} where there is no such file)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.startswith("Vm"):
            out[key] = int(value.split()[0]) * 1024
    return out
