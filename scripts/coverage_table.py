"""Print (or write with --out) the README's model coverage table: every builder of tests/coverage_models.py measured
on the cheap compile path, the same code the coverage test runs (`VSPARSE_COVERAGE_TABLE=path pytest
tests/test_model_coverage.py` writes the same table)."""
import argparse
import os
import sys
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import coverage_models  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", help="write the table here instead of printing it")
    parser.add_argument("models", nargs="*", help="builders to measure (default: all)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        rows = [coverage_models.measure(name, os.path.join(workdir, name)) for name in
                args.models or coverage_models.BUILDERS]
    text = coverage_models.table(rows)
    if args.out:
        with open(args.out, "w") as out:
            out.write(text)
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
