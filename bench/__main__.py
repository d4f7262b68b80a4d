"""``python -m bench NAME [args]``: run ``bench.NAME.main(args)``."""

from __future__ import annotations

import importlib
import sys


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m bench NAME [args]   (e.g. python -m bench locks)")
        return 2
    module = importlib.import_module(f"bench.{argv[0]}")
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
