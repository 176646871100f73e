"""Command line: `python -m ropekv [info|check|bench] ...`.

With no command: the self-check of every backend, then the benchmark.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m ropekv", description=__doc__)
    parser.add_argument("command", nargs="?", choices=["info", "check", "bench"],
                        help="info: version and backends; check: self-check; bench: benchmark "
                             "(default: check, then bench)")
    args, rest = parser.parse_known_args(argv)
    import ropekv

    if args.command == "info":
        for key, value in ropekv.info().items():
            print(f"{key:20s} {value}")
        return 0
    from . import _selfcheck

    if args.command in (None, "check"):
        ok = _selfcheck.run()
        if not ok:
            print("self-check FAILED", file=sys.stderr)
            return 1
        if args.command == "check":
            return 0
    from . import bench

    return bench.main(rest)


if __name__ == "__main__":
    sys.exit(main())
