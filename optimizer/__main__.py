"""``python -m optimizer demo``: a short example run of AdamW and Lion under warmup + cosine.

It fits a small MLP to a fixed random teacher network (no download, a few
seconds on a laptop CPU) with each optimizer and prints the loss as training
goes and a table at the end.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from . import AdamW, Lion, WarmupCosineScheduler


def _batches(steps: int, batch: int, dim: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.nn.Sequential(torch.nn.Linear(dim, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    for p in teacher.parameters():
        p.requires_grad_(False)
        p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    data = []
    for _ in range(steps):
        x = torch.randn(batch, dim, generator=gen)
        data.append((x, teacher(x)))
    held_out = torch.randn(1024, dim, generator=gen)
    return data, (held_out, teacher(held_out))


def _run(name: str, make_opt, data, held_out, warmup: int, seed: int, every: int) -> dict[str, float]:
    torch.manual_seed(seed)
    dim = data[0][0].shape[1]
    model = torch.nn.Sequential(torch.nn.Linear(dim, 128), torch.nn.GELU(), torch.nn.Linear(128, 1))
    opt = make_opt(model.parameters())
    sched = WarmupCosineScheduler(opt, warmup_steps=warmup, total_steps=len(data))
    start = time.perf_counter()
    first = None
    for step, (x, y) in enumerate(data):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step % every == 0 or step == len(data) - 1:
            print(f"  {name:6s} step {step:4d}  loss {loss.item():8.4f}  lr {opt.param_groups[0]['lr']:.2e}")
        opt.step()
        sched.step()
        first = loss.item() if first is None else first
    with torch.no_grad():
        test = torch.nn.functional.mse_loss(model(held_out[0]), held_out[1]).item()
    return {"first": first, "last": loss.item(), "held_out": test, "seconds": time.perf_counter() - start}


def demo(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m optimizer demo", description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps per run (default 300)")
    ap.add_argument("--warmup-steps", type=int, default=30, help="linear warmup steps (default 30)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = ap.parse_args(argv)
    if args.steps < 1 or not 0 <= args.warmup_steps <= args.steps:
        ap.error(f"need --steps >= 1 and 0 <= --warmup-steps <= --steps (got {args.steps}, {args.warmup_steps})")
    data, held_out = _batches(args.steps, 64, 16, args.seed)
    runs = {
        "AdamW": lambda ps: AdamW(ps, lr=1e-2, weight_decay=0.01),
        "Lion": lambda ps: Lion(ps, lr=1e-3, weight_decay=0.1),
    }
    every = max(1, args.steps // 5)
    results = {}
    for name, make in runs.items():
        print(f"{name}: {args.steps} steps, warmup {args.warmup_steps} + cosine")
        results[name] = _run(name, make, data, held_out, args.warmup_steps, args.seed, every)
    print(f"\n{'optimizer':10s} {'first loss':>11s} {'last loss':>10s} {'held-out':>9s} {'seconds':>8s}")
    for name, r in results.items():
        print(f"{name:10s} {r['first']:11.4f} {r['last']:10.4f} {r['held_out']:9.4f} {r['seconds']:8.2f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"demo": demo}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: python -m optimizer {demo} [--help]\n\n  demo   a short example run of AdamW and Lion")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
