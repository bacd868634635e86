"""Run mypy over the ``enginetime`` package as it is installed, from the source folders.

``pyproject.toml`` maps top-level folders into one import root with setuptools
``package-dir`` (``sidecar/`` -> ``enginetime.sidecar``, ...). An editable install
resolves that with an import hook that mypy cannot follow, so ``enginetime.*``
imports would be unresolved and cross-module types unchecked. This script builds
``build/typecheck/enginetime/`` as a tree of symlinks to the real folders, from the
same ``package-dir`` table, and runs ``mypy -p enginetime`` with that tree as its
search path (``mypy_path`` in pyproject.toml). Extra arguments go to mypy.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / "build" / "typecheck"


def build_tree() -> Path:
    """(Re)build the symlink tree; returns its root (the folder holding ``enginetime/``)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_dir: dict[str, str] = config["tool"]["setuptools"]["package-dir"]
    if TREE.exists():
        shutil.rmtree(TREE)
    # Parents before children: "enginetime" is a real folder holding links to the mapped ones.
    for package, folder in sorted(package_dir.items(), key=lambda item: item[0].count(".")):
        source = ROOT / folder
        target = TREE.joinpath(*package.split("."))
        if package.count(".") == 0:
            target.mkdir(parents=True)
            for entry in source.iterdir():
                if entry.suffix in (".py", ".pyi") or (entry / "__init__.py").exists():
                    (target / entry.name).symlink_to(entry)
        else:
            if target.is_symlink():
                target.unlink()
            target.symlink_to(source, target_is_directory=True)
    return TREE


def main(argv: list[str]) -> int:
    build_tree()
    cmd = [sys.executable, "-m", "mypy", "-p", "enginetime", *argv]
    return subprocess.call(cmd, cwd=ROOT, env=os.environ | {"MYPYPATH": str(TREE)})


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
