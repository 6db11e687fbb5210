"""The allocation file: ``vips.json`` in the state directory, service -> address, written
atomically (a temporary file renamed over the old one, fsynced) so a crash leaves either the
old or the new file, never half of one. Blocking: call it in a thread."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

FILE = "vips.json"
VERSION = 1


class StoreError(Exception):
    """The file cannot be read or written; str() names it and says why."""


def load(state_dir: str) -> dict[str, str]:
    path = Path(state_dir) / FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise StoreError(f"{path}: cannot read the virtual address allocations: {exc}") from None
    services = data.get("services") if isinstance(data, dict) else None
    if not isinstance(services, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in services.items()
    ):
        raise StoreError(f"{path}: not an allocation file (expected {{'services': {{...}}}})")
    return dict(services)


def save(state_dir: str, services: Mapping[str, str]) -> None:
    directory = Path(state_dir)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        body = json.dumps({"version": VERSION, "services": dict(sorted(services.items()))})
        fd, tmp = tempfile.mkstemp(prefix=".vips.", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(body + "\n")
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, directory / FILE)
        except BaseException:
            os.unlink(tmp)
            raise
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise StoreError(f"{directory / FILE}: cannot write the allocations: {exc}") from None
