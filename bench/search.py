"""Query latency and recall of s2i's gallery search: exact (torch) vs approximate (faiss IVF-flat).

For each gallery size, dimension and kind of data it builds both indexes, times single queries
(one query per call, as the app and the CLI issue them) and reports p50/p95 latency, the build time,
and the approximate index's recall@10 against exact search.

Data (random unit vectors; queries are fresh draws from the same distribution, not gallery items):
  uniform    isotropic Gaussian directions: the worst case for any partitioning index, since a
             point's nearest neighbours are barely closer than the rest of the gallery;
  clustered  N/1000 clusters (unit-norm centres) with Gaussian noise of norm ~sigma around them;
             sigma=2 puts a point at cosine ~0.45 from its centre and ~0.2 from a cluster-mate.
             Real embeddings are clustered like this (classes, scenes, speakers), and tighter.

    python bench/search.py                                # 1k, 10k, 100k; dim 256; both kinds
    python bench/search.py --million --dims 256,1024      # adds 1M (minutes, ~8 GB at dim 1024)
    python bench/search.py --sizes 100000 --nprobe 8,16,32,64,125 --data clustered

Targets (2 cores): p50 <= 5 ms at 10k; <= 100 ms at 1M with recall@10 >= 0.95.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import machine, machine_line, write_json  # noqa: E402  (bench/common.py)
from s2i import search as s2i_search  # noqa: E402
from s2i.search import Index  # noqa: E402


def make_data(kind: str, n: int, dim: int, sigma: float, seed: int, chunk: int = 100_000) -> torch.Tensor:
    """``n`` unit vectors, generated in chunks so a million of them need no temporary copies.
    Gallery and queries made with the same ``seed`` share the cluster centres."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(max(1, n // 1000), dim, generator=g), dim=1)
    g_points = torch.Generator().manual_seed(seed + 1 + n)
    out = torch.empty(n, dim)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x = torch.randn(m, dim, generator=g_points)
        if kind == "clustered":
            x = centres[torch.randint(0, len(centres), (m,), generator=g_points)] + sigma * x / dim ** 0.5
        out[start:start + m] = F.normalize(x, dim=1)
    return out


def queries_for(kind: str, n: int, dim: int, sigma: float, seed: int, count: int) -> torch.Tensor:
    """Fresh points from the gallery's distribution (same centres: the centre draw depends on n only)."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(max(1, n // 1000), dim, generator=g), dim=1)
    g_points = torch.Generator().manual_seed(seed + 7)
    x = torch.randn(count, dim, generator=g_points)
    if kind == "clustered":
        x = centres[torch.randint(0, len(centres), (count,), generator=g_points)] + sigma * x / dim ** 0.5
    return F.normalize(x, dim=1)


def time_queries(index: Index, queries: torch.Tensor, k: int) -> tuple[float, float]:
    for q in queries[:5]:  # warm-up
        index.search(q[None], k)
    times = []
    for q in queries:
        start = time.perf_counter()
        index.search(q[None], k)
        times.append(time.perf_counter() - start)
    return float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 95) * 1e3)


def recall(found: torch.Tensor, truth: torch.Tensor) -> float:
    hits = (found[:, :, None] == truth[:, None, :]).any(2).float().sum(1)
    return float((hits / truth.shape[1]).mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000", help="comma-separated gallery sizes")
    parser.add_argument("--million", action="store_true", help="add a 1,000,000-vector gallery (minutes)")
    parser.add_argument("--dims", default="256", help="comma-separated dimensions, e.g. 256,1024")
    parser.add_argument("--data", default="clustered,uniform", help="clustered, uniform or both")
    parser.add_argument("--sigma", type=float, default=2.0, help="spread of the clustered data (see above)")
    parser.add_argument("--queries", type=int, default=200, help="timed single queries per setting")
    parser.add_argument("--exact-queries", type=int, default=50,
                        help="timed single queries for exact search (slow at 1M: ~0.2-1 s each)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--nprobe", default="", help="comma-separated nprobe values to sweep (default: the index's own)")
    parser.add_argument("--threads", type=int, default=2, help="torch and faiss threads (the targets assume 2)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args(argv)

    import faiss

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",") if s] + ([1_000_000] if args.million else [])
    dims = [int(d) for d in args.dims.split(",")]
    kinds = [k.strip() for k in args.data.split(",")]
    if any(k not in ("clustered", "uniform") for k in kinds):
        parser.error("--data takes clustered and/or uniform")
    info = machine() | {"faiss": faiss.__version__}
    print(f"machine: {machine_line(info)}, faiss {info['faiss']}")
    print(f"data: {kinds} (clustered sigma={args.sigma}), {args.queries} single queries "
          f"({min(args.exact_queries, args.queries)} for exact), k={args.k}, "
          f"auto switches to approximate at {s2i_search.APPROX_THRESHOLD:,} vectors")
    header = f"{'data':<10} {'dim':>5} {'N':>9} {'method':<17} {'build_s':>8} {'p50_ms':>8} {'p95_ms':>8} {'recall@10':>9}"
    print(header)
    print("-" * len(header))
    rows = []

    def emit(**row):
        rows.append(row)
        print(f"{row['data']:<10} {row['dim']:>5} {row['n']:>9,} {row['method']:<17} {row['build_s']:>8.2f} "
              f"{row['p50_ms']:>8.2f} {row['p95_ms']:>8.2f} {row['recall_at_k']:>9.3f}", flush=True)

    for kind in kinds:
        for dim in dims:
            for n in sizes:
                gallery = make_data(kind, n, dim, args.sigma, seed=0)
                queries = queries_for(kind, n, dim, args.sigma, seed=0, count=args.queries)
                start = time.perf_counter()
                exact = Index(gallery, method="exact")
                build = time.perf_counter() - start
                truth = exact.search(queries, args.k)[1]
                p50, p95 = time_queries(exact, queries[:args.exact_queries], args.k)
                emit(data=kind, dim=dim, n=n, method="exact", build_s=build, p50_ms=p50, p95_ms=p95, recall_at_k=1.0)
                start = time.perf_counter()
                approx = Index(gallery, method="ivf")
                build = time.perf_counter() - start
                for nprobe in [int(p) for p in args.nprobe.split(",") if p] or [approx.nprobe]:
                    approx.nprobe = min(nprobe, approx.nlist)
                    found = approx.search(queries, args.k)[1]
                    p50, p95 = time_queries(approx, queries, args.k)
                    emit(data=kind, dim=dim, n=n, method=f"ivf {approx.nprobe}/{approx.nlist}", build_s=build,
                         p50_ms=p50, p95_ms=p95, recall_at_k=recall(found, truth))
                del gallery, exact, approx
    print("method 'ivf P/L': faiss IVF-flat scanning P of L k-means cells; build_s includes k-means")
    print(f"load average at the end: {[round(x, 2) for x in os.getloadavg()]}")
    if args.json:
        write_json(args.json, {"machine": info, "args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
