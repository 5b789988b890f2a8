"""Median optimizer step time of our backends and the peers, side by side in one run.

    python benchmarks/step_time.py [--device cpu|cuda] [--layers 12 --width 768 --vocab 50257]

Prints ms per step, effective GB/s (the bytes the algorithm must move: AdamW
28 B/param, Lion 20 B/param in fp32), the fraction of the in-place streaming
bandwidth measured in the same run, and the ratio to torch.optim.AdamW(fused=True).
The issue for a `python -m optimizer bench` command will replace this script.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import optimizer


def gpt2_shapes(n_layer=12, d=768, vocab=50257, ctx=1024):
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(n_layer):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return shapes + [(d,), (d,)]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device, warmup=3, reps=15):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bandwidths(n, device):
    """(copy, in-place) GB/s, bytes read + written: ``dst.copy_(src)`` and ``a.add_(b)``.

    An optimizer step updates its buffers in place, so the in-place stream is its roofline."""
    a, b = torch.randn(n, device=device), torch.randn(n, device=device)
    dst = torch.empty_like(a)
    copy_ms = median_ms(lambda: dst.copy_(a), device)
    inplace_ms = median_ms(lambda: a.add_(b), device)
    return 2 * n * 4 / copy_ms / 1e6, 3 * n * 4 / inplace_ms / 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=12, help="GPT-2 blocks (12 = 124M)")
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    shapes = gpt2_shapes(args.layers, args.width, args.vocab)
    n = sum(torch.Size(s).numel() for s in shapes)

    def make(cls, **kw):
        params = [torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        opt = cls(params, **kw)
        return lambda: opt.step()

    candidates = [
        ("torch AdamW fused", 28, lambda: make(torch.optim.AdamW, lr=1e-3, fused=True)),
        ("torch AdamW foreach", 28, lambda: make(torch.optim.AdamW, lr=1e-3, foreach=True)),
        ("torch AdamW for-loop", 28, lambda: make(torch.optim.AdamW, lr=1e-3, foreach=False)),
        ("ours AdamW default", 28, lambda: make(optimizer.AdamW)),
        ("ours AdamW foreach", 28, lambda: make(optimizer.AdamW, foreach=True)),
        ("ours AdamW reference", 28, lambda: make(optimizer.AdamW, foreach=False)),
        ("ours Lion default", 20, lambda: make(optimizer.Lion)),
        ("ours Lion foreach", 20, lambda: make(optimizer.Lion, foreach=True)),
        ("ours Lion reference", 20, lambda: make(optimizer.Lion, foreach=False)),
    ]
    try:
        import lion_pytorch

        candidates.append(("lion-pytorch", 20, lambda: make(lion_pytorch.Lion, lr=1e-4)))
    except ImportError:
        pass

    copy_bw, bw = bandwidths(n, device)
    # Build every candidate first, then time them in interleaved rounds, so that drift of the
    # machine (other load, memory state) spreads over all of them instead of favouring one.
    steps, rows = {}, {}
    for name, bytes_per_param, build in candidates:
        try:
            steps[name] = (build(), bytes_per_param)
        except (RuntimeError, TypeError) as err:  # e.g. fused unsupported on this device
            rows[name] = (None, str(err).splitlines()[0][:40])
    times = {name: [] for name in steps}
    for r in range(args.reps + 3):
        for name, (step, _) in steps.items():
            sync(device)
            t0 = time.perf_counter()
            step()
            sync(device)
            if r >= 3:  # the first rounds warm up (state allocation, caches)
                times[name].append((time.perf_counter() - t0) * 1e3)
    for name, (_, bytes_per_param) in steps.items():
        ms = statistics.median(times[name])
        rows[name] = (ms, bytes_per_param * n / ms / 1e6)
    rows = [(name, *rows[name]) for name, _, _ in candidates]
    base = next(ms for name, ms, _ in rows if name == "torch AdamW fused" and ms)
    print(f"device {device}, {len(shapes)} tensors, {n / 1e6:.1f} M params, torch {torch.__version__}; "
          f"bandwidth: copy {copy_bw:.1f} GB/s, in-place {bw:.1f} GB/s")
    print(f"{'implementation':24s} {'ms/step':>9s} {'GB/s':>7s} {'of in-place':>11s} {'vs torch fused':>15s}")
    for name, ms, gbs in rows:
        if ms is None:
            print(f"{name:24s} {'n/a':>9s}  {gbs}")
            continue
        print(f"{name:24s} {ms:9.2f} {gbs:7.1f} {gbs / bw:11.0%} {ms / base:14.2f}x")


if __name__ == "__main__":
    main()
