"""Run mypy over the ``enginetime`` package as it is installed, from the source folders.

``pyproject.toml`` maps top-level folders into one import root with setuptools
``package-dir`` (``sidecar/`` -> ``enginetime.sidecar``, ...). An editable install
resolves that with an import hook that mypy cannot follow, so ``enginetime.*``
imports would be unresolved and cross-module types unchecked. This script builds
``build/typecheck/enginetime/`` as a tree of symlinks to the real folders, from the
same ``package-dir`` table, and runs ``mypy -p enginetime`` with that tree as its
search path (``mypy_path`` in pyproject.toml), and names the real files in its report
(``sidecar/server.py``, not the tree's path). Extra arguments go to mypy.
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


def package_dir() -> dict[str, str]:
    """pyproject.toml's ``[tool.setuptools] package-dir``: import name -> folder."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return dict(config["tool"]["setuptools"]["package-dir"])


def build_tree(package_dir: dict[str, str]) -> Path:
    """(Re)build the symlink tree; returns its root (the folder holding ``enginetime/``)."""
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


def source_paths(package_dir: dict[str, str]) -> list[tuple[str, str]]:
    """(path in the tree, path in the repository) prefixes, longest first: reports name the real files."""
    pairs = []
    for package, folder in package_dir.items():
        tree = TREE.relative_to(ROOT).joinpath(*package.split(".")).as_posix() + "/"
        pairs.append((tree, folder.rstrip("/") + "/"))
    return sorted(pairs, key=lambda pair: -len(pair[0]))


def main(argv: list[str]) -> int:
    packages = package_dir()
    build_tree(packages)
    prefixes = source_paths(packages)
    cmd = [sys.executable, "-m", "mypy", "-p", "enginetime", *argv]
    env = os.environ | {"MYPYPATH": str(TREE)}
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            for tree, source in prefixes:
                if line.startswith(tree):
                    line = source + line[len(tree) :]
                    break
            sys.stdout.write(line)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
