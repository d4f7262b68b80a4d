"""``python -m keel.agent run ...``: the agent without Keel's CLI framework (same options
as ``keel agent run``), for guests where every imported module costs time."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from keel.agent._daemon import HELP, run_agent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m keel.agent", description="The Keel guest agent."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the guest agent on one channel until SIGTERM")
    for name in ("listen", "connect", "instance_id"):
        run.add_argument(f"--{name.replace('_', '-')}", dest=name, help=HELP[name])
    for name in ("config", "cert", "key", "ca"):
        run.add_argument(f"--{name}", dest=name, type=Path, help=HELP[name])
    args = parser.parse_args(argv)
    return run_agent(
        listen=args.listen,
        connect=args.connect,
        config=args.config,
        instance_id=args.instance_id,
        cert=args.cert,
        key=args.key,
        ca=args.ca,
    )


if __name__ == "__main__":
    sys.exit(main())
