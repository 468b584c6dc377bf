"""Phantom generation speed: 100 cases at 64×128×128 (D×H×W), 1 and 2 worker processes, with and without PET.

Target: 100 cases in under a minute on 2 cores. Prints a table and writes benchmarks/results/phantom_generate.json.

    python benchmarks/phantom_generate.py [--n 100]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from rrg3d.data.phantom import PhantomConfig, generate_phantoms


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "phantom_generate.json")
    args = parser.parse_args(argv)
    rows = []
    for pet in (False, True):
        for workers in (1, 2):
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                generate_phantoms(PhantomConfig(n=args.n, seed=0, shape=(64, 128, 128), pet=pet), tmp,
                                  workers=workers, progress=False)
                seconds = time.perf_counter() - start
            rows.append({"pet": pet, "workers": workers, "seconds": round(seconds, 2),
                         "cases_per_second": round(args.n / seconds, 2)})
    print(f"{'PET':<6}{'workers':>8}{'seconds':>10}{'cases/s':>10}")
    for row in rows:
        print(f"{row['pet']!s:<6}{row['workers']:>8}{row['seconds']:>10.1f}{row['cases_per_second']:>10.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"n": args.n, "shape": [64, 128, 128], "runs": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
