"""Benchmark the blocked PVA score matrix against a per-pair loop and the matmul floor.

For each N the script times three ways to fill the N x N study-by-report matrix:

- ``matmul``: the similarity einsum of every pair's Q x S block, in the same blocks as
  the PVA run and without the matching. This is the floor that any PVA must pay.
- ``pva``: :func:`harness.scoring.pva_score_blocked`.
- ``loop``: a straightforward per-pair Python implementation. It runs on a random
  subsample of pairs and is extrapolated linearly to N * N pairs (printed as an
  estimate).

Memory: torch allocations are invisible to tracemalloc, so the script prints the
process's maximum resident set size (``resource.getrusage``, monotonic over the run)
and the size of one similarity block, which is what bounds the blocked run.

Run on CPU: ``python benchmarks/bench_pva.py`` (defaults Q=32, S<=12, D=256, float32,
N in 500 1000 2000). On a machine shared with other jobs, pass ``--threads 1``: with more
torch threads than free cores, the many small ops of the per-pair loop slowed down
about 15-fold in one measurement on a 2-core machine.
"""

from __future__ import annotations

import argparse
import math
import resource
import time

import torch
import torch.nn.functional as F

from harness.scoring import pva_score_blocked


def make_inputs(n: int, n_views: int, max_sentences: int, dim: int, seed: int):
    """Return unit-norm views ``(n, Q, D)``, padded sentences ``(n, S, D)`` and mask ``(n, S)``."""
    generator = torch.Generator().manual_seed(seed)
    views = F.normalize(torch.randn(n, n_views, dim, generator=generator), dim=-1)
    sentences = F.normalize(torch.randn(n, max_sentences, dim, generator=generator), dim=-1)
    # Reports have between 2/3 of the maximum and the maximum number of sentences.
    lengths = torch.randint(max(1, 2 * max_sentences // 3), max_sentences + 1, (n,), generator=generator)
    mask = torch.arange(max_sentences)[None, :] < lengths[:, None]
    return views, sentences, mask


def per_pair_pva(views: torch.Tensor, sentences: torch.Tensor) -> float:
    """Score one pair, ``views (Q, D)`` against real ``sentences (S, D)``, with a plain loop."""
    similarity = views @ sentences.T
    n_views, n_sentences = similarity.shape
    total = 0.0
    for _ in range(min(n_views, n_sentences)):
        flat_index = int(similarity.argmax())
        row, column = divmod(flat_index, n_sentences)
        total += float(similarity[row, column])
        similarity[row, :] = float("-inf")
        similarity[:, column] = float("-inf")
    return total / min(n_views, n_sentences)


def time_matmul_floor(views, sentences, block_size: int) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for row in range(0, views.shape[0], block_size):
            for column in range(0, sentences.shape[0], block_size):
                block = torch.einsum(
                    "iqd,rsd->irqs",
                    views[row : row + block_size],
                    sentences[column : column + block_size],
                )
                block.contiguous()
    return time.perf_counter() - start


def time_loop(views, sentences, mask, scores, n_pairs: int, seed: int) -> float:
    """Return the per-pair loop's mean seconds per pair, checking it against ``scores``."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, views.shape[0], (n_pairs,), generator=generator)
    reports = torch.randint(0, sentences.shape[0], (n_pairs,), generator=generator)
    start = time.perf_counter()
    results = [
        per_pair_pva(views[i], sentences[r][mask[r]]) for i, r in zip(images.tolist(), reports.tolist(), strict=True)
    ]
    elapsed = time.perf_counter() - start
    expected = scores[images, reports]
    if not torch.allclose(torch.tensor(results), expected, atol=1e-5):
        raise RuntimeError("the per-pair loop and pva_score_blocked disagree, so the benchmark is invalid")
    return elapsed / n_pairs


def max_rss_mib() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    block_mib = args.block_size**2 * args.views * args.max_sentences * 4 / 2**20
    print(
        f"Q={args.views} S<={args.max_sentences} D={args.dim} float32 CPU, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"block {args.block_size}x{args.block_size} pairs = {block_mib:.0f} MiB per similarity block"
    )
    print(f"{'N':>6} {'matmul s':>9} {'pva s':>8} {'pva/matmul':>10} {'loop s (est.)':>14} "
          f"{'loop/pva':>9} {'max RSS MiB':>11}")

    timings = []
    for n in args.sizes:
        views, sentences, mask = make_inputs(n, args.views, args.max_sentences, args.dim, args.seed)
        floor = time_matmul_floor(views, sentences, args.block_size)
        start = time.perf_counter()
        scores = pva_score_blocked(views, sentences, mask, block_size=args.block_size)
        pva = time.perf_counter() - start
        loop = time_loop(views, sentences, mask, scores, args.loop_pairs, args.seed) * n * n
        timings.append((n, pva))
        print(f"{n:>6} {floor:>9.2f} {pva:>8.2f} {pva / floor:>10.2f} {loop:>14.0f} "
              f"{loop / pva:>9.0f} {max_rss_mib():>11.0f}")

    for (n1, t1), (n2, t2) in zip(timings[:-1], timings[1:], strict=True):
        exponent = math.log(t2 / t1) / math.log(n2 / n1)
        print(f"pva time grows as N^{exponent:.2f} from N={n1} to N={n2}")
    print(f"loop column: {args.loop_pairs} random pairs per N, extrapolated to N*N pairs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 1000, 2000],
                        help="numbers of studies N (the matrix is N x N)")
    parser.add_argument("--views", type=int, default=32, help="views per study Q")
    parser.add_argument("--max-sentences", type=int, default=12, help="padded sentences per report S")
    parser.add_argument("--dim", type=int, default=256, help="embedding size D")
    parser.add_argument("--block-size", type=int, default=128, help="studies and reports per block side")
    parser.add_argument("--loop-pairs", type=int, default=300, help="pairs timed with the per-pair loop")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 keeps the default)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the inputs and the pair subsample")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
