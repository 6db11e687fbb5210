"""Compile the data plane (stablenet.native.COMPILED) with mypyc into .native/, all or nothing.

    .venv/bin/python scripts/native.py          # build when the sources changed since the last
    .venv/bin/python scripts/native.py --force  # build anyway

The sources are copied to a scratch directory and compiled there, so the source tree never holds
a compiled module; .native/ is replaced only after every module built, and its digest names the
sources it came from (stablenet.native uses it only while they match). When compiling is not
possible the daemon runs the same modules as Python: this says so and exits 0.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from stablenet import native

MYPY_INI = """
[mypy]
python_version = 3.11
[mypy-dnslib.*,uvloop.*,httptools.*]
ignore_missing_imports = True
"""

SETUP = """
from mypyc.build import mypycify
from setuptools import setup

setup(
    name="stablenet-dataplane",
    ext_modules=mypycify({paths!r}, group_name={group!r}, opt_level="3"),
    script_args=["build_ext", "--inplace"],
)
"""


def build(force: bool) -> int:
    digest = native.source_digest()
    stamp = native.BUILD / "digest"
    if not force and stamp.exists() and stamp.read_text().strip() == digest:
        print("native: compiled data plane is up to date")
        return 0
    with tempfile.TemporaryDirectory(prefix="stablenet-native-") as scratch:
        work = Path(scratch)
        shutil.copytree(
            native.PACKAGE, work / "stablenet", ignore=shutil.ignore_patterns("__pycache__")
        )
        digest = native.source_digest(work / "stablenet")  # what is compiled, even if edited now
        (work / "mypy.ini").write_text(MYPY_INI)
        paths = [f"stablenet/{name}" for name in native.COMPILED]
        (work / "setup.py").write_text(SETUP.format(paths=paths, group=native.GROUP))
        result = subprocess.run(
            [sys.executable, "setup.py"],
            cwd=work,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": ""},
        )
        if result.returncode != 0:
            tail = textwrap.indent("\n".join(result.stdout.splitlines()[-15:]), "    ")
            print(
                f"native: compiling failed, the data plane runs as Python:\n{tail}\n"
                f"{textwrap.indent(result.stderr[-2000:], '    ')}",
                file=sys.stderr,
            )
            return 0
        built = sorted(work.glob("stablenet/**/*.so"))
        expected = {name.removesuffix(".py") for name in native.COMPILED}
        found = {str(p.relative_to(work / "stablenet")).split(".")[0] for p in built}
        if not expected <= found:
            print(f"native: modules missing from the build: {sorted(expected - found)}")
            return 0
        fresh = native.BUILD.with_name(".native.new")
        shutil.rmtree(fresh, ignore_errors=True)
        for so in built:
            target = fresh / so.relative_to(work)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(so, target)
        (fresh / "digest").write_text(digest + "\n")
        # Swap by renames: a process starting meanwhile sees the old build, none, or the new.
        old = native.BUILD.with_name(".native.old")
        shutil.rmtree(old, ignore_errors=True)
        if native.BUILD.exists():
            native.BUILD.rename(old)
        fresh.rename(native.BUILD)
        shutil.rmtree(old, ignore_errors=True)
    print(f"native: compiled {len(native.COMPILED)} modules into {native.BUILD}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="build even when up to date")
    return build(parser.parse_args().force)


if __name__ == "__main__":
    raise SystemExit(main())
