"""The ``enginetime`` command: one entry point, one subcommand per tool.

Each subcommand lives beside the code it drives and exposes
``register(subparsers)``; its module is imported only when needed, so
``enginetime --help`` stays fast and a missing extra names itself clearly.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: subcommand module -> one-line help. Each module has register(subparsers).
SUBCOMMANDS: tuple[str, ...] = (
    "enginetime.sidecar.cli",
    "enginetime.testbed.cli",
    "enginetime.clients.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="enginetime",
        description="Per-request engine time for LLM inference engines.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:  # an extra is not installed
            missing = getattr(exc, "name", None) or str(exc)
            stub = sub.add_parser(name.rsplit(".", 2)[-2], help=f"(unavailable: needs {missing})")
            stub.set_defaults(func=_unavailable(name, missing))
            continue
        module.register(sub)
    return parser


def _unavailable(name: str, missing: str):
    def run(_args: argparse.Namespace) -> int:
        print(
            f"enginetime: {name} needs the module {missing!r}; install the extra, "
            "e.g. pip install 'enginetime[sidecar]' or 'enginetime[testbed]'",
            file=sys.stderr,
        )
        return 2

    return run


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
