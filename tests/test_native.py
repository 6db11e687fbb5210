"""The compiled request path is used only when its build matches the sources, and then it is
what runs (the suite exercises the compiled modules whenever scripts/native.py built them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from stablenet import native


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setattr(native, "BUILD", tmp_path)
    monkeypatch.setattr(native, "_enabled", None)
    monkeypatch.delenv("STABLENET_PURE", raising=False)
    return tmp_path


def test_no_build_means_the_sources(fresh: Path) -> None:
    assert not native.enabled()
    assert native.extend("stablenet.proxy", ["/src"]) == ["/src"]


def test_a_stale_build_is_never_used(fresh: Path) -> None:
    (fresh / "digest").write_text("0" * 64 + "\n")
    assert not native.enabled()
    assert native.extend("stablenet", ["/src"]) == ["/src"]


def test_a_matching_build_goes_first(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (fresh / "digest").write_text(native.source_digest() + "\n")
    monkeypatch.setattr(native, "_load_library", lambda: True)
    assert native.enabled()
    compiled = str(fresh / "stablenet" / "proxy")
    assert native.extend("stablenet.proxy", ["/src"]) == [compiled, "/src"]


def test_a_build_that_does_not_load_leaves_the_sources(tmp_path: Path) -> None:
    """A matching digest beside a library that cannot load: the sources run, with a warning.
    In a fresh interpreter, so the real library is not loaded already."""
    suffix = str(sysconfig.get_config_var("EXT_SUFFIX"))
    (tmp_path / "stablenet").mkdir()
    (tmp_path / "stablenet" / f"dataplane__mypyc{suffix}").write_bytes(b"not a library")
    code = (
        "import os, sys; from pathlib import Path; from stablenet import native; "
        "del os.environ['STABLENET_PURE']; native._enabled = None; "
        f"native.BUILD = Path({str(tmp_path)!r}); "
        "(native.BUILD / 'digest').write_text(native.source_digest()); "
        "print(native.enabled(), native.LIBRARY in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "STABLENET_PURE": "1"},  # the real build stays unloaded at import
    )
    assert result.stdout.split() == ["False", "False"]
    assert "does not load" in result.stderr


def test_pure_wins_over_a_matching_build(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (fresh / "digest").write_text(native.source_digest() + "\n")
    monkeypatch.setenv("STABLENET_PURE", "1")
    assert not native.enabled()


def test_the_digest_follows_every_compiled_source() -> None:
    before = native.source_digest()
    for name in native.COMPILED:
        assert (native.PACKAGE / name).is_file(), name
    assert before == native.source_digest()
    assert len(before) == 64


def test_modules_load_from_where_the_loader_says() -> None:
    """In a fresh interpreter: every compiled module comes from the build when one matches,
    and from the sources otherwise; never a mix."""
    code = (
        "import importlib, json; from stablenet import native; "
        "mods = [n.removesuffix('.py').replace('/', '.') for n in native.COMPILED]; "
        "files = [importlib.import_module('stablenet.' + m).__file__ for m in mods]; "
        "print(json.dumps([native.enabled(), native.describe()] + files))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    enabled, described, *files = json.loads(out)
    built = str(native.BUILD)
    if enabled:
        assert described == "compiled (mypyc)"
        assert all(f.startswith(built) and f.endswith(".so") for f in files), files
    else:
        assert described == "pure Python"
        assert all(f.endswith(".py") and not f.startswith(built) for f in files), files
