"""How long SSE-C takes to build, and how equiangular it comes out.

For each (feature dim, classes) it builds the sparse ETF with fedsim's defaults
(`fedsim.etf.sparse_etf`: 60% zeros, norm 1.0, 2000 cosine-annealed
Adam steps at lr 1e-3) and reports the build time (best of --repeat), the
column norms, and the smallest nearest-neighbour angle against the dense ETF's
(arccos(-1/(K-1)), the best any K vectors can do) and against the sparse
matrix before refinement.

    python scripts/bench_sse_c.py
    python scripts/bench_sse_c.py --shapes 512x100 --norm 0.1
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from fedsim.etf import nearest_cosines, sparse_etf


def nearest_angle(matrix: torch.Tensor) -> float:
    """The smallest angle (degrees) between a column and its nearest neighbour."""
    return math.degrees(torch.arccos(nearest_cosines(matrix.double())).min().item())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["100x10", "512x10", "512x100"])
    parser.add_argument("--norm", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print("| d x K | build s | column norms | nearest angle | unrefined | dense ETF |")
    print("|---|---:|---|---:|---:|---:|")
    for shape in args.shapes:
        d, k = (int(v) for v in shape.split("x"))
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            etf = sparse_etf(d, k, seed=0, norm=args.norm, steps=args.steps)
            times.append(time.perf_counter() - start)
        norms = etf.norm(dim=0)
        raw = sparse_etf(d, k, seed=0, norm=args.norm, steps=0)
        print(f"| {d} x {k} | {min(times):.2f} | {norms.min():.4f}-{norms.max():.4f} | "
              f"{nearest_angle(etf):.2f}° | {nearest_angle(raw):.2f}° | "
              f"{math.degrees(math.acos(-1 / (k - 1))):.2f}° |")


if __name__ == "__main__":
    main()
