"""Whether the compiled data plane is used. The request path's modules (listed in COMPILED) are
plain, fully typed Python; ``scripts/native.py`` compiles them with mypyc into ``.native/`` beside
the package, with a digest of the sources it compiled. At import, ``stablenet`` and
``stablenet.proxy`` put that directory first on their ``__path__`` only when the digest matches
the sources as they are now, so an edited module is never shadowed by a stale build. Set
``STABLENET_PURE=1`` to run the Python sources regardless."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
BUILD = PACKAGE.parent / ".native"  # holds stablenet/... mirroring the package, and "digest"
COMPILED = (
    "histogram.py",
    "lifecycle.py",
    "proxy/balance.py",
    "proxy/http.py",
    "proxy/http1.py",
    "proxy/routes.py",
    "proxy/server.py",
)

_enabled: bool | None = None


def source_digest() -> str:
    """What the compiled build must have been made from."""
    digest = hashlib.sha256()
    for name in COMPILED:
        digest.update(name.encode() + b"\0" + (PACKAGE / name).read_bytes() + b"\0")
    return digest.hexdigest()


def enabled() -> bool:
    """A build exists, matches the sources, and STABLENET_PURE is not set."""
    global _enabled
    if _enabled is None:
        try:
            built = (BUILD / "digest").read_text().strip()
            _enabled = not os.environ.get("STABLENET_PURE") and built == source_digest()
        except OSError:
            _enabled = False
    return _enabled


def extend(package: str, path: list[str]) -> list[str]:
    """A package's ``__path__`` with the compiled modules' directory first, when enabled."""
    if not enabled():
        return path
    compiled = BUILD.joinpath(*package.split("."))
    return [str(compiled), *path]


def describe() -> str:
    return "compiled (mypyc)" if enabled() else "pure Python"
