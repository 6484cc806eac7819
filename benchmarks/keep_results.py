"""Copy a finished study's small results into the repository (:func:`metagrad.keep.keep_study`).

For a study still running, ``metagrad study NAME --keep results/NAME`` keeps each cell as it finishes instead.

    python benchmarks/keep_results.py runs/issue21-regression results/issue21-regression
"""

from __future__ import annotations

import argparse
from pathlib import Path

from metagrad.keep import keep_study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path)
    parser.add_argument("dest", type=Path)
    args = parser.parse_args()
    print(f"kept {keep_study(args.study, args.dest)} runs in {args.dest}")


if __name__ == "__main__":
    main()
