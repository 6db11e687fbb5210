"""Whether the compiled data plane is used. The request path's modules (listed in COMPILED) are
plain, fully typed Python; ``scripts/native.py`` compiles them with mypyc into ``.native/`` beside
the package, with a digest of the package's sources and the interpreter it was built for. At
import, ``stablenet`` and ``stablenet.proxy`` put that directory first on their ``__path__`` only
when the digest matches the sources as they are now (every module counts: compiled code checks
the types of what the others hand it) and the compiled library loads, so an edited module is
never shadowed by a stale build and a build that cannot load falls back to the sources. Set
``STABLENET_PURE=1`` to run the Python sources regardless."""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import sys
import sysconfig
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
BUILD = PACKAGE.parent / ".native"  # holds stablenet/... mirroring the package, and "digest"
COMPILED = (
    "histogram.py",
    "lifecycle.py",
    "proxy/balance.py",
    "proxy/budget.py",
    "proxy/client.py",
    "proxy/dispatch.py",
    "proxy/exchange.py",
    "proxy/http1.py",
    "proxy/retry.py",
    "proxy/routes.py",
    "proxy/server.py",
    "proxy/upstream.py",
)
GROUP = "stablenet.dataplane"  # mypyc's group: every compiled module lives in its library
LIBRARY = GROUP + "__mypyc"

logger = logging.getLogger(__name__)
_enabled: bool | None = None


def source_digest(package: Path = PACKAGE) -> str:
    """What a build must have been made from: every module of the package, and the
    interpreter (a build for another Python must not count as current)."""
    digest = hashlib.sha256()
    digest.update(f"{sys.version}\0{sysconfig.get_config_var('EXT_SUFFIX')}\0".encode())
    for path in sorted(package.rglob("*.py")):
        name = path.relative_to(package).as_posix()
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _wanted() -> bool:
    return os.environ.get("STABLENET_PURE", "").strip().lower() in ("", "0", "false", "no")


def _load_library() -> bool:
    """Load the compiled library now, so a build that cannot load leaves the sources in use."""
    if LIBRARY in sys.modules:
        return True
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    path = BUILD.joinpath(*LIBRARY.split(".")).with_name(LIBRARY.rsplit(".", 1)[1] + suffix)
    try:
        loader = importlib.machinery.ExtensionFileLoader(LIBRARY, str(path))
        spec = importlib.util.spec_from_file_location(LIBRARY, path, loader=loader)
        if spec is None:
            return False
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
    except (ImportError, OSError) as exc:
        logger.warning(
            "compiled request path in %s does not load (%s): using the sources", BUILD, exc
        )
        return False
    sys.modules[LIBRARY] = module
    return True


def enabled() -> bool:
    """A build exists, matches the sources, loads, and STABLENET_PURE is not set."""
    global _enabled
    if _enabled is None:
        try:
            built = (BUILD / "digest").read_text().strip()
        except OSError:
            built = ""
        _enabled = _wanted() and built == source_digest() and _load_library()
    return _enabled


def extend(package: str, path: list[str]) -> list[str]:
    """A package's ``__path__`` with the compiled modules' directory first, when enabled."""
    if not enabled():
        return path
    compiled = BUILD.joinpath(*package.split("."))
    return [str(compiled), *path]


def describe() -> str:
    """What runs the request path, judged by where its main module was loaded from."""
    module = sys.modules.get("stablenet.proxy.client")
    if module is not None and not str(getattr(module, "__file__", "")).endswith(".py"):
        return "compiled (mypyc)"
    return "pure Python"
