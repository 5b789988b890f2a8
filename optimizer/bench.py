"""``python -m optimizer bench``: median step time of every backend and of the peers,
measured side by side in one run, as ratios and as a fraction of the bandwidth
measured in the same run.

An optimizer step reads and writes each element once at best, so its floor is
bytes / bandwidth: fp32 AdamW moves 28 bytes per parameter (read p, g, m, v;
write p, m, v), fp32 Lion 20. The candidates are built first and then timed in
interleaved rounds, so that drift of the machine spreads over all of them.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from . import AdamW, Lion


def gpt2_shapes(layers: int, dim: int, vocab: int, ctx: int = 1024) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = [(vocab, dim), (ctx, dim)]
    for _ in range(layers):
        shapes += [(dim,), (dim,), (3 * dim, dim), (3 * dim,), (dim, dim), (dim,),
                   (dim,), (dim,), (4 * dim, dim), (4 * dim,), (dim, 4 * dim), (dim,)]
    return shapes + [(dim,), (dim,)]


def llama_shapes(layers: int = 22, dim: int = 2048, hidden: int = 5632, kv: int = 256,
                 vocab: int = 32000) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = [(vocab, dim)]
    for _ in range(layers):
        shapes += [(dim,), (dim, dim), (kv, dim), (kv, dim), (dim, dim), (dim,),
                   (hidden, dim), (hidden, dim), (dim, hidden)]
    return shapes + [(dim,), (vocab, dim)]


MODELS: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "gpt2-30m": lambda: gpt2_shapes(6, 512, 16384),  # 28 M params, 76 tensors: sized for a 2-core CPU
    "gpt2-124m": lambda: gpt2_shapes(12, 768, 50257),  # 124 M params, 148 tensors
    "llama-1.1b": llama_shapes,  # 1.10 B params, 201 tensors
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_ms(fn: Callable[[], Any], device: torch.device, reps: int = 10) -> float:
    fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bandwidth(n: int, device: torch.device) -> dict[str, float]:
    """GB/s (bytes read + written) of a copy into other memory and of an in-place ``a += b``:
    a step updates its buffers in place, so the latter is its roofline."""
    a, b = torch.randn(n, device=device), torch.randn(n, device=device)
    dst = torch.empty_like(a)
    copy = 2 * n * 4 / _median_ms(lambda: dst.copy_(a), device) / 1e6
    inplace = 3 * n * 4 / _median_ms(lambda: a.add_(b), device) / 1e6
    return {"copy": copy, "inplace": inplace}


def candidates(device: torch.device) -> list[tuple[str, int, Callable[[list[torch.nn.Parameter]], Any]]]:
    """(name, bytes per parameter, build) for every implementation worth timing here."""
    rows: list[tuple[str, int, Callable[[list[torch.nn.Parameter]], Any]]] = [
        ("torch AdamW fused", 28, lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True)),
        ("torch AdamW foreach", 28, lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True)),
        ("ours AdamW default", 28, lambda ps: AdamW(ps, lr=1e-3)),
        ("ours AdamW correct_bias=False", 28, lambda ps: AdamW(ps, lr=1e-3, correct_bias=False)),
        ("ours AdamW foreach", 28, lambda ps: AdamW(ps, lr=1e-3, foreach=True)),
        ("ours AdamW reference", 28, lambda ps: AdamW(ps, lr=1e-3, foreach=False, fused=False)),
        ("ours Lion default", 20, lambda ps: Lion(ps, lr=1e-4)),
        ("ours Lion foreach", 20, lambda ps: Lion(ps, lr=1e-4, foreach=True)),
        ("ours Lion reference", 20, lambda ps: Lion(ps, lr=1e-4, foreach=False, fused=False)),
    ]
    try:
        import lion_pytorch

        rows.append(("lion-pytorch", 20, lambda ps: lion_pytorch.Lion(ps, lr=1e-4)))
        if device.type == "cuda":
            rows.append(("lion-pytorch triton", 20, lambda ps: lion_pytorch.Lion(ps, lr=1e-4, use_triton=True)))
    except ImportError:
        pass
    try:
        import bitsandbytes as bnb

        if device.type == "cuda":
            rows.append(("bitsandbytes AdamW32bit", 28, lambda ps: bnb.optim.AdamW32bit(ps, lr=1e-3)))
            rows.append(("bitsandbytes Lion32bit", 20, lambda ps: bnb.optim.Lion32bit(ps, lr=1e-4)))
    except ImportError:
        pass
    return rows


def run(model: str, device_name: str, reps: int, only: list[str] | None, json_path: str | None) -> int:
    device = torch.device(device_name)
    shapes = MODELS[model]()
    n = sum(torch.Size(s).numel() for s in shapes)
    gen = torch.Generator().manual_seed(0)
    steps: dict[str, tuple[Callable[[], Any], int]] = {}
    failed: dict[str, str] = {}
    for name, bytes_per_param, build in candidates(device):
        if only and not any(o.lower() in name.lower() for o in only):
            continue
        params = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(device)) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        try:
            opt = build(params)
            opt.step()  # state allocation and any one-time compile happen here, untimed
        except (RuntimeError, TypeError, ValueError) as err:  # e.g. fused unsupported on this device
            failed[name] = str(err).strip().splitlines()[0][:60]
            continue
        steps[name] = (opt.step, bytes_per_param)
    bw = bandwidth(n, device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(reps + 2):
        for name, (step, _) in steps.items():
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            if r >= 2:
                times[name].append((time.perf_counter() - t0) * 1e3)
    medians = {name: statistics.median(t) for name, t in times.items()}
    base = {k: medians.get(f"torch AdamW {k}") for k in ("fused", "foreach")}
    print(f"{model}: {len(shapes)} tensors, {n / 1e6:.1f} M params, fp32, {device}, torch {torch.__version__}; "
          f"measured bandwidth: in-place {bw['inplace']:.1f} GB/s, copy {bw['copy']:.1f} GB/s; median of {reps}")
    head = f"{'implementation':30s} {'ms/step':>9s} {'GB/s':>7s} {'of in-place':>12s} {'/torch fused':>13s} {'/torch foreach':>15s}"
    print(head)
    rows = []
    for name, ms in medians.items():
        gbs = steps[name][1] * n / ms / 1e6
        ratios = [f"{ms / base[k]:.2f}x" if base[k] else "-" for k in ("fused", "foreach")]
        print(f"{name:30s} {ms:9.2f} {gbs:7.1f} {gbs / bw['inplace']:12.0%} {ratios[0]:>13s} {ratios[1]:>15s}")
        rows.append({"name": name, "ms": ms, "gb_per_s": gbs, "fraction_of_inplace_bandwidth": gbs / bw["inplace"],
                     "vs_torch_fused": ms / base["fused"] if base["fused"] else None,
                     "vs_torch_foreach": ms / base["foreach"] if base["foreach"] else None})
    for name, why in failed.items():
        print(f"{name:30s} {'n/a':>9s}  {why}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"model": model, "tensors": len(shapes), "params": n, "device": str(device),
                       "torch": torch.__version__, "bandwidth_gb_per_s": bw, "reps": reps, "rows": rows,
                       "unavailable": failed}, f, indent=1)
        print(f"wrote {json_path}")
    return 0
