"""`python -m dit_compiler show DUMP_DIR`: print the report of a vsparse dump and draw each graph's timeline.png."""
from __future__ import annotations

import argparse
import sys

from dit_compiler.dump import graph_folders, show


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dit_compiler", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    show_parser = sub.add_parser("show", help="print report.md of a dump directory and draw timeline.png per graph "
                                              "(per call: density per site, block stack computed or reused, dense "
                                              "phase; needs matplotlib)")
    show_parser.add_argument("dump_dir")
    args = parser.parse_args(argv)
    try:
        print(show(args.dump_dir), end="")
        folders = graph_folders(args.dump_dir)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from dit_compiler.timeline import MissingPlotting, render_timeline

    for folder in folders:
        try:
            drawn = render_timeline(folder)
        except MissingPlotting as e:
            print(f"no timeline: {e}", file=sys.stderr)
            break
        if drawn:
            print(f"timeline: {drawn}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
