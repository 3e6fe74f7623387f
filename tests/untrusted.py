"""Helpers for tests that feed the merger hostile files: raw safetensors header surgery (what a
stranger's Hub repo can hold), and a merge run that reports how it ended."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def read_raw(path: Path) -> tuple[dict[str, Any], bytes]:
    """A safetensors file as (header dict, data bytes), without validating anything."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_raw(path: Path, header: Any, data: bytes, *, header_bytes: bytes | None = None) -> None:
    """Write a header (any JSON value, or exact bytes) and data as a safetensors-shaped file."""
    hb = header_bytes if header_bytes is not None else json.dumps(header).encode()
    path.write_bytes(len(hb).to_bytes(8, "little") + hb + data)


def edit_header(path: Path, fn: Callable[[dict[str, Any], bytes], Any]) -> None:
    """Rewrite a safetensors header in place: ``fn(header, data)`` edits the header (and may
    return new data bytes)."""
    header, data = read_raw(path)
    new = fn(header, data)
    write_raw(path, header, data if new is None else new)


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def run_cli(
    args: list[str], *, env: dict[str, str] | None = None, timeout: float = 120, prefix: list[str] = ()
) -> subprocess.CompletedProcess:
    """``scripts/merge_from_hub.py`` in a fresh process (a crash shows as a signal, a hang as a timeout)."""
    return subprocess.run(
        [*prefix, sys.executable, str(REPO / "scripts" / "merge_from_hub.py"), *args, "--quiet"],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, PYTHONPATH=str(REPO), **(env or {})),
    )


def leftovers(folder: Path, out_name: str = "out") -> list[str]:
    """Entries of ``folder`` a merge into ``folder/out_name`` may have left: the output itself,
    its temporary, replaced, kept or lock files."""
    return sorted(
        p.name
        for p in folder.iterdir()
        if p.name == out_name or p.name.startswith((f".{out_name}.", f"{out_name}.merged-"))
    )
