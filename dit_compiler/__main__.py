"""`python -m dit_compiler show DUMP_DIR`: print the report of a vsparse dump."""
from __future__ import annotations

import argparse
import sys

from dit_compiler.dump import show


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dit_compiler", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    show_parser = sub.add_parser("show", help="print report.md of a dump directory")
    show_parser.add_argument("dump_dir")
    args = parser.parse_args(argv)
    try:
        print(show(args.dump_dir), end="")
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
