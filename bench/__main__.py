"""`python -m bench NAME [args]`: run bench/NAME.py's main(args).

A flag may route a benchmark to a sibling module of its own (`FLAGS`), so a variant lives
in its own file: ``python -m bench rpc --poison`` runs bench/rpc_poison.py.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path

# (benchmark, flag) -> the module that runs it, given the other arguments
FLAGS = {("rpc", "--poison"): "rpc_poison"}


def _names() -> list[str]:
    here = str(Path(__file__).parent)
    return sorted(m.name for m in pkgutil.iter_modules([here]) if not m.name.startswith("_"))


def run() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(f"usage: python -m bench NAME [args]   (NAME: {', '.join(_names())})")
        sys.exit(0 if len(sys.argv) >= 2 else 2)
    name = sys.argv[1]
    if name not in _names():
        print(f"no benchmark {name!r}; have: {', '.join(_names())}", file=sys.stderr)
        sys.exit(2)
    args = sys.argv[2:]
    for (bench, flag), module in FLAGS.items():
        if name == bench and flag in args:
            name, args = module, [a for a in args if a != flag]
    importlib.import_module(f"bench.{name}").main(args)


run()
