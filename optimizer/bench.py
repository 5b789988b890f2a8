"""``python -m optimizer bench``: median step time of every backend and of the peers,
measured side by side in one run, as ratios and as a fraction of the bandwidth
measured in the same run.

An optimizer step reads and writes each element once at best, so its floor is
bytes / bandwidth: AdamW moves 3 P + 4 S bytes per parameter (read p, g, m, v;
write p, m, v; P and S the bytes of a parameter and of a state value: 28 in
fp32), Lion 3 P + 2 S (20 in fp32). Each implementation is credited with the
bytes of its own state dtype. All candidates share one list of parameters and
gradients. Where their states fit in memory together (the CPU models) they are
timed in interleaved rounds, so that drift of the machine spreads over all of
them; otherwise one after the other, each freed before the next is built.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import platform
import statistics
import time
import types
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
    # many small tensors: the host work of a step (checks, plans, launches) against the bytes
    "small-400x64x64": lambda: [(64, 64)] * 400,  # 1.6 M params
    "small-2000x256": lambda: [(256,)] * 2000,  # 0.5 M params
}
SUITES = {"many-small": ["small-400x64x64", "small-2000x256"]}  # --model names that run several lists


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
    """GB/s (bytes read + written) of a copy into other memory and of an in-place ``a += b``
    (a step updates its buffers in place, so on a CPU the latter is its roofline)."""
    a, b = torch.randn(n, device=device), torch.randn(n, device=device)
    dst = torch.empty_like(a)
    copy = 2 * n * 4 / _median_ms(lambda: dst.copy_(a), device) / 1e6
    inplace = 3 * n * 4 / _median_ms(lambda: a.add_(b), device) / 1e6
    return {"copy": copy, "inplace": inplace}


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (name, algorithm, state dtype: "param" = the parameter's own, build(params) -> optimizer)
Row = tuple[str, str, Any, Callable[[list[torch.nn.Parameter]], Any]]


def _compiled(make: Callable[[list[torch.nn.Parameter]], Any]) -> Callable[[list[torch.nn.Parameter]], Any]:
    """``make``'s optimizer with its step compiled (``torch.compile(opt.step)``)."""
    def build(ps: list[torch.nn.Parameter]) -> Any:
        opt = make(ps)
        return types.SimpleNamespace(step=torch.compile(opt.step), optimizer=opt)

    return build


def candidates(device: torch.device, state_dtype: torch.dtype | None, compile: bool = False) -> list[Row]:
    """Every implementation worth timing here. ``state_dtype`` is passed to ours. With
    ``compile``, also each of ours and torch's AdamW with ``torch.compile(opt.step)``."""
    ours = torch.float32 if state_dtype is None else state_dtype  # our default: fp32 state for any param dtype
    kw = {} if state_dtype is None else {"state_dtype": state_dtype}
    rows: list[Row] = [
        ("torch AdamW fused", "adamw", "param", lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True)),
        ("torch AdamW foreach", "adamw", "param", lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True)),
        ("ours AdamW default", "adamw", ours, lambda ps: AdamW(ps, lr=1e-3, **kw)),
        ("ours AdamW correct_bias=False", "adamw", ours, lambda ps: AdamW(ps, lr=1e-3, correct_bias=False, **kw)),
        ("ours AdamW foreach", "adamw", ours, lambda ps: AdamW(ps, lr=1e-3, foreach=True, **kw)),
        ("ours Lion default", "lion", ours, lambda ps: Lion(ps, lr=1e-4, **kw)),
        ("ours Lion foreach", "lion", ours, lambda ps: Lion(ps, lr=1e-4, foreach=True, **kw)),
    ]
    if device.type == "cpu" or compile:
        rows += [
            ("ours AdamW reference", "adamw", ours, lambda ps: AdamW(ps, lr=1e-3, foreach=False, fused=False, **kw)),
            ("ours Lion reference", "lion", ours, lambda ps: Lion(ps, lr=1e-4, foreach=False, fused=False, **kw)),
        ]
    if compile:
        rows.append(("torch AdamW for-loop", "adamw", "param", lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=False)))
        rows += [(f"{name} compiled", algorithm, sdt, _compiled(make)) for name, algorithm, sdt, make in rows
                 if name.startswith(("ours", "torch AdamW"))]
    try:
        import lion_pytorch

        rows.append(("lion-pytorch", "lion", "param", lambda ps: lion_pytorch.Lion(ps, lr=1e-4)))
        if device.type == "cuda":
            rows.append(("lion-pytorch triton", "lion", "param",
                         lambda ps: lion_pytorch.Lion(ps, lr=1e-4, use_triton=True)))
    except ImportError:
        pass
    try:
        import bitsandbytes as bnb

        if device.type == "cuda":
            rows.append(("bitsandbytes AdamW32bit", "adamw", torch.float32, lambda ps: bnb.optim.AdamW32bit(ps, lr=1e-3)))
            rows.append(("bitsandbytes Lion32bit", "lion", torch.float32, lambda ps: bnb.optim.Lion32bit(ps, lr=1e-4)))
    except ImportError:
        pass
    return rows


def bytes_per_param(algorithm: str, param_dtype: torch.dtype, state: torch.dtype) -> int:
    p, s = param_dtype.itemsize, state.itemsize
    return 3 * p + (4 if algorithm == "adamw" else 2) * s


def model_shapes(model: str) -> list[tuple[int, ...]]:
    """A named list, or ``module:function`` returning an nn.Module (or a list of shapes)."""
    if model in MODELS:
        return MODELS[model]()
    module_name, _, attr = model.partition(":")
    try:
        built = getattr(importlib.import_module(module_name), attr)()
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"Invalid --model: {model!r} is neither one of {sorted(MODELS)} nor an importable "
                         f"module:function ({err})") from None
    if isinstance(built, torch.nn.Module):
        return [tuple(p.shape) for p in built.parameters() if p.requires_grad]
    return [tuple(s) for s in built]


def run(model: str, device_name: str, reps: int, only: list[str] | None, json_path: str | None,
        dtype: str = "fp32", state_dtype: str | None = None, compile: bool = False, readme: str | None = None,
        command: str = "python -m optimizer bench") -> int:
    """Time every candidate on ``model``'s list (each list of a suite such as ``many-small``) and
    print the table; optionally write the JSON (a list for a suite) and the README's table."""
    results = []
    for name in SUITES.get(model, [model]):
        results.append({**run_one(name, device_name, reps, only, dtype, state_dtype, compile), "command": command})
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results[0] if len(results) == 1 else results, f, indent=1)
        print(f"wrote {json_path}")
    if readme:
        update_readme("README.md", readme, markdown(results))
    return 0


def readme_from_json(path: str, name: str) -> int:
    """Rewrite the README's table ``name`` from a JSON file that ``--json`` wrote."""
    with open(path) as f:
        data = json.load(f)
    update_readme("README.md", name, markdown(data if isinstance(data, list) else [data]))
    return 0


def run_one(model: str, device_name: str, reps: int, only: list[str] | None,
            dtype: str = "fp32", state_dtype: str | None = None, compile: bool = False) -> dict[str, Any]:
    """One parameter list: the table printed, the results returned."""
    device = torch.device(device_name)
    shapes = model_shapes(model)
    param_dtype = DTYPES[dtype]
    ours_state = DTYPES[state_dtype] if state_dtype else None
    n = sum(torch.Size(s).numel() for s in shapes)
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(device=device, dtype=param_dtype))
              for s in shapes]
    for p in params:
        p.grad = (torch.randn_like(p) * 1e-3)
    rows = [r for r in candidates(device, ours_state, compile)
            if not only or any(o.lower() in r[0].lower() for o in only)]
    bw = bandwidth(n, device)
    # interleave where every candidate's state fits at once (the CPU lists), else one at a time
    state_bytes = sum(n * (4 if r[1] == "lion" else 8) for r in rows)
    interleave = device.type == "cpu" or state_bytes < 0.5 * torch.cuda.get_device_properties(device).total_memory
    times: dict[str, list[float]] = {}
    failed: dict[str, str] = {}
    moved: dict[str, int] = {}

    def build(row: Row) -> Callable[[], Any] | None:
        name, algorithm, sdt, make = row
        try:
            opt = make(params)
            opt.step()  # state allocation and any one-time compile happen here, untimed
        except (RuntimeError, TypeError, ValueError) as err:  # e.g. an implementation unsupported here
            failed[name] = str(err).strip().splitlines()[0][:60]
            return None
        moved[name] = bytes_per_param(algorithm, param_dtype, param_dtype if sdt == "param" else sdt)
        times[name] = []
        return opt.step

    def timed(name: str, step: Callable[[], Any]) -> None:
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times[name].append((time.perf_counter() - t0) * 1e3)

    if interleave:
        steps = {r[0]: s for r in rows if (s := build(r)) is not None}
        for _ in range(2):
            for s in steps.values():
                s()
        for _ in range(reps):
            for name, s in steps.items():
                timed(name, s)
    else:
        for r in rows:
            s = build(r)
            if s is not None:
                for _ in range(2):
                    s()
                for _ in range(reps):
                    timed(r[0], s)
            s = None
            torch.cuda.empty_cache()
    after = bandwidth(n, device)  # measured again: a machine busy at the start would inflate the fractions
    bw = {k: max(bw[k], after[k]) for k in bw}
    medians = {name: statistics.median(t) for name, t in times.items()}
    base = {k: medians.get(f"torch AdamW {k}") for k in ("fused", "foreach")}
    base["lion-pytorch"] = medians.get("lion-pytorch triton", medians.get("lion-pytorch"))
    print(f"{model}: {len(shapes)} tensors, {n / 1e6:.1f} M params, {dtype} params, state {state_dtype or 'default'}, "
          f"{device}, torch {torch.__version__}; measured bandwidth: copy {bw['copy']:.1f} GB/s, in-place "
          f"{bw['inplace']:.1f} GB/s; median of {reps}{', interleaved' if interleave else ''}")
    width = max([30, *map(len, medians)])
    best = max(bw.values())  # a CPU copy also reads the destination (write-allocate): in-place is its roofline
    head = (f"{'implementation':{width}s} {'ms/step':>9s} {'B/param':>8s} {'GB/s':>7s} {'of bw':>6s} "
            f"{'/torch fused':>13s} {'/torch foreach':>15s} {'/lion-pytorch':>14s}")
    print(head + (f" {'/eager':>7s}" if compile else ""))
    out = []
    for name, ms in medians.items():
        gbs = moved[name] * n / ms / 1e6
        ratios = [f"{ms / base[k]:.2f}x" if base[k] else "-" for k in ("fused", "foreach", "lion-pytorch")]
        eager = medians.get(name.removesuffix(" compiled")) if name.endswith(" compiled") else None
        print(f"{name:{width}s} {ms:9.2f} {moved[name]:8d} {gbs:7.1f} {gbs / best:6.0%} "
              f"{ratios[0]:>13s} {ratios[1]:>15s} {ratios[2]:>14s}"
              + (f" {f'{ms / eager:.2f}x' if eager else '-':>7s}" if compile else ""))
        out.append({"name": name, "ms": ms, "bytes_per_param": moved[name], "gb_per_s": gbs,
                    "fraction_of_bandwidth": gbs / best,
                    "fraction_of_copy_bandwidth": gbs / bw["copy"],
                    "fraction_of_inplace_bandwidth": gbs / bw["inplace"],
                    "vs_torch_fused": ms / base["fused"] if base["fused"] else None,
                    "vs_torch_foreach": ms / base["foreach"] if base["foreach"] else None,
                    "vs_lion_pytorch": ms / base["lion-pytorch"] if base["lion-pytorch"] else None,
                    "vs_eager": ms / eager if eager else None})
    for name, why in failed.items():
        print(f"{name:{max(30, len(name))}s} {'n/a':>9s}  {why}")
    result = {"model": model, "tensors": len(shapes), "params": n, "dtype": dtype, "state_dtype": state_dtype,
              "device": str(device), "machine": machine(device), "date": datetime.date.today().isoformat(),
              "torch": torch.__version__, "bandwidth_gb_per_s": bw, "reps": reps, "interleaved": interleave,
              "rows": out, "unavailable": failed}
    return result


def machine(device: torch.device) -> str:
    """The hardware in words: the GPU's name, or the CPU's model and the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def markdown(results: list[dict[str, Any]]) -> str:
    """The README's table of one or more runs (``run``'s results, or its JSON), with date, machine
    and the command that measured them."""
    lines = []
    for r in results:
        lines += [f"`{r['model']}` ({r['tensors']} tensors, {r['params'] / 1e6:.1f} M params, {r['dtype']}):", "",
                  "| implementation | ms/step | B/param | of bandwidth | / torch fused |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {row['name']} | {row['ms']:.2f} | {row['bytes_per_param']} | {row['fraction_of_bandwidth']:.0%} "
                  f"| {_ratio(row['vs_torch_fused'])} |"
                  for row in r["rows"]]
        lines.append("")
    first = results[0]
    lines.append(f"Measured {first['date']} on {first['machine']} ({first['device']}, torch {first['torch']}) with "
                 f"`{first.get('command', 'python -m optimizer bench')}`; medians of {first['reps']} steps{', interleaved' if first['interleaved'] else ''}.")
    return "\n".join(lines)


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def check_markers(path: str, name: str) -> str:
    """``path``'s text, which must hold one ``<!-- bench:NAME -->`` ... ``<!-- /bench:NAME -->`` pair."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    with open(path) as f:
        text = f.read()
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise ValueError(f"Invalid --readme: {path} has no single {start} ... {end} pair")
    return text


def update_readme(path: str, name: str, table: str) -> None:
    """Put ``table`` between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` in ``path``."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    text = check_markers(path, name)
    head, rest = text.split(start)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(head + start + "\n" + table + "\n" + end + rest.split(end, 1)[1])
    os.replace(tmp, path)
    print(f"updated {path} ({name})")
