"""Where the CPU time of Muon's batched Newton-Schulz goes, on the bench's gpt2-30m hidden matrices.

Times, side by side in one run, each against a 2048 x 2048 product in the iteration's dtype:
our iteration as it runs (``muon._batched_newton_schulz``), its input pass alone (cast,
normalise), and after that same input pass: the products with preallocated buffers and
in-place ``baddbmm_``, the products with no addends (``bmm`` only: the ceiling, not the
iteration), and the iteration rewritten as ``X <- (aI + bA + cA^2) X`` (no addend), with each
result's error against a float64 iteration.
docs/benchmarks.md ("Muon") says what the figures mean.

    python tools/ns_variants.py [--threads 2] [--reps 7]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from optimizer import bench, muon


def interleaved_ms(calls: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median ms of each call, the calls run in turn ``reps`` times (a slower spell of the host
    slows them all alike)."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for fn in calls.values():
        fn()
    for _ in range(reps):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def prepared(u: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The iteration's input pass, as ours runs it: cast, the short side first, normalised."""
    x = u.to(dtype)
    x = x.mT if u.size(-2) > u.size(-1) else x
    return x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=1e-7)


def buffers_reused(x: torch.Tensor) -> torch.Tensor:
    a, b, c = muon.NS_COEFFICIENTS
    outs = [x.new_empty(x.shape), x.new_empty(x.shape)]  # (contiguous: torch copies strided results)
    A = x.new_empty(*x.shape[:-1], x.shape[-2])
    B = torch.empty_like(A)
    for i in range(5):
        torch.bmm(x, x.mT, out=A)
        B.copy_(A).baddbmm_(A, A, beta=b, alpha=c)
        x = outs[i % 2].copy_(x).baddbmm_(B, x, beta=a)
    return x


def products_only(x: torch.Tensor) -> torch.Tensor:
    for _ in range(5):
        A = torch.bmm(x, x.mT)
        x = torch.bmm(torch.bmm(A, A), x)
    return x


def polynomial_first(x: torch.Tensor) -> torch.Tensor:
    a, b, c = muon.NS_COEFFICIENTS
    for _ in range(5):
        A = torch.bmm(x, x.mT)
        P = torch.baddbmm(A, A, A, beta=b, alpha=c)
        P.diagonal(dim1=-2, dim2=-1).add_(a)
        x = torch.bmm(P, x)
    return x


def float64_iteration(u: torch.Tensor) -> torch.Tensor:
    a, b, c = muon.NS_COEFFICIENTS
    x = prepared(u, torch.float64)
    for _ in range(5):
        A = x @ x.mT
        x = a * x + (b * A + c * A @ A) @ x
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes = bench.MODELS["gpt2-30m"]()
    skip = bench.NOT_HIDDEN["gpt2-30m"](len(shapes))
    by_shape: dict[tuple[int, ...], int] = {}
    for i, s in enumerate(shapes):
        if len(s) == 2 and i not in skip:
            by_shape[s] = by_shape.get(s, 0) + 1
    stacks = [torch.randn(n, *s) for s, n in by_shape.items()]
    dtype = muon.ns_dtype_of(None, stacks[0])
    gflop = sum(n * muon.ns_flops(s) for s, n in by_shape.items()) / 1e9
    side = bench.MATMUL_SIZE["cpu"]
    p, q = (torch.randn(side, side).to(dtype) for _ in range(2))
    variants = {
        "ours (_batched_newton_schulz)": lambda u: muon._batched_newton_schulz(u, muon.NS_COEFFICIENTS, 5, 1e-7,
                                                                               dtype),
        "its input pass alone": lambda u: prepared(u, dtype),
        "buffers reused, baddbmm_": lambda u: buffers_reused(prepared(u, dtype)),
        "bmm only (ceiling, no addends)": lambda u: products_only(prepared(u, dtype)),
        "(aI + bA + cA^2) X": lambda u: polynomial_first(prepared(u, dtype)),
    }
    exact = [float64_iteration(u) for u in stacks]
    calls = {name: (lambda run=run: [run(u) for u in stacks]) for name, run in variants.items()}
    ms = interleaved_ms({"matmul": lambda: p @ q, **calls}, args.reps)
    peak = 2 * side**3 / ms.pop("matmul") / 1e6
    print(f"{sum(by_shape.values())} matrices, {gflop:.1f} GFLOP a step, {dtype}, {args.threads} threads; "
          f"a {side} x {side} product: {peak:.0f} GFLOP/s (medians of {args.reps}, interleaved)")
    print(f"{'variant':32s} {'ms':>8s} {'GFLOP/s':>8s} {'of matmul':>10s} {'error vs f64':>13s}")
    for name, run in variants.items():
        error, rate, share = "-", "-", "-"
        if "alone" not in name:  # (the input pass has no flops of its own, and no result to compare)
            rate_ = gflop / ms[name] * 1e3
            rate, share = f"{rate_:.0f}", f"{rate_ / peak:.0%}"
        if "alone" not in name and "ceiling" not in name:
            outs = [run(u) for u in stacks]
            outs = [o.mT if o.shape != e.shape else o for o, e in zip(outs, exact)]  # (ours: tall ones back)
            error = f"{max(((o.double() - e).norm() / e.norm()).item() for o, e in zip(outs, exact)):.2e}"
        print(f"{name:32s} {ms[name]:8.1f} {rate:>8s} {share:>10s} {error:>13s}")


if __name__ == "__main__":
    main()
