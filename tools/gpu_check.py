"""GPU checks of issue 27, items 11-13 (the Triton kernels' launch plans, a CPU-tensor lr, and
gradients off a 16-byte boundary), and of Muon (issue 24), on real hardware. Run from the repository root:

    python tools/gpu_check.py            # about a minute on an H100

Prints one table: each check, ok/FAIL (or "info"), and what it measured. Exit status 1 if any
check failed. Nothing is written anywhere.
"""

from __future__ import annotations

import datetime
import gc
import os
import statistics
import sys
import time
import traceback
import warnings

sys.path.insert(0, os.getcwd())

import torch  # noqa: E402
import triton  # noqa: E402

from optimizer import AdamW, AdamW8bit, Lion, Lion8bit, Muon  # noqa: E402
from optimizer import _fused_triton as FT  # noqa: E402

assert torch.cuda.is_available(), "needs a CUDA GPU"
DEV = "cuda"
EIGHT = (AdamW8bit, Lion8bit)
CLASSES = (AdamW, Lion, AdamW8bit, Lion8bit)
rows: list[tuple[str, str, str]] = []


def record(check: str, ok: bool | None, detail: str = "") -> None:
    rows.append((check, "info" if ok is None else "ok" if ok else "FAIL", detail))


def guarded(check: str):
    def wrap(fn):
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - a check that crashes is a failed check
            traceback.print_exc()
            record(check, False, f"{type(err).__name__}: {str(err).splitlines()[0][:90]}")
        return fn
    return wrap


def kw_of(cls):
    return dict(min_8bit_size=1) if cls in EIGHT else {}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.detach(), b.detach()
    if a.dtype.is_floating_point:
        width = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        a, b = a.view(width), b.view(width)
    return torch.equal(a, b)


class CountTables:
    """Counts FT._tables calls (one per launch of a plan built), their host time, and keeps the
    block tables' identities."""

    def __init__(self):
        self.calls, self.seconds, self.blocks = 0, 0.0, []
        self.original = FT._tables

    def __enter__(self):
        def counting(*args, **kwargs):
            t0 = time.perf_counter()
            out = self.original(*args, **kwargs)
            self.seconds += time.perf_counter() - t0
            self.calls += 1
            self.blocks.append(id(out[1]))
            return out
        FT._tables = counting
        return self

    def __exit__(self, *exc):
        FT._tables = self.original


# ----- item 11: plans kept per group -------------------------------------------------------

def layerwise(cls, n_groups=40, shapes=((1024, 1024), (4, 1024))):  # 2-D: 8-bit states for both
    groups = []
    for i in range(n_groups):
        params = [torch.nn.Parameter(torch.randn(s, device=DEV)) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p)
        groups.append({"params": params, "lr": 1e-3 * 0.9 ** (n_groups - i)})
    return cls(groups, fused=True, **kw_of(cls))


for cls in CLASSES:
    @guarded(f"11 plans, 40 groups: {cls.__name__}")
    def _():
        opt = layerwise(cls)
        with CountTables() as c:
            opt.step()
            first, first_s = c.calls, c.seconds
            later = []
            host = []
            for _ in range(5):
                before = c.calls
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                opt.step()
                host.append(time.perf_counter() - t0)
                later.append(c.calls - before)
            p = opt.param_groups[7]["params"][0]
            held = p.grad
            p.grad = held.clone()
            before = c.calls
            opt.step()
            moved = c.calls - before
            reused = c.blocks[-1] == c.blocks[7]
        torch.cuda.synchronize()
        ok = first == 40 and later == [0] * 5 and moved == 1 and reused
        record(f"11 plans, 40 groups: {cls.__name__}", ok,
               f"builds {first} then {later}; moved grad: {moved} (block table reused: {reused}); "
               f"build {first_s * 1e3:.1f} ms at step 1, step host time {statistics.median(host) * 1e3:.2f} ms")


@guarded("11 graph: plan rebuilt during capture")
def _():
    """The plan is rebuilt during capture (new gradient addresses), rebuilt again outside it, memory
    churned; replays must still match eager steps bit for bit."""
    def build():
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, device=DEV)) for s in ((4097,), (3, 5), (2048, 3))]
        for p in params:
            p.grad = torch.zeros_like(p)
        return params, AdamW(params, lr=torch.tensor(1e-2, device=DEV), weight_decay=0.1, fused=True)

    eager, opt_e = build()
    graphed, opt_g = build()
    gen = torch.Generator(device=DEV).manual_seed(1)
    grads = [[torch.randn(p.shape, device=DEV, generator=gen) for p in eager] for _ in range(9)]
    for p, q, g in zip(eager, graphed, grads[0]):
        p.grad.copy_(g)
        q.grad.copy_(g)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        opt_g.step()
    torch.cuda.current_stream().wait_stream(s)
    opt_e.step()
    static = [torch.zeros_like(p) for p in graphed]  # new addresses: the plan is rebuilt in capture
    for q, g in zip(graphed, static):
        q.grad = g
    graph = torch.cuda.CUDAGraph()
    with CountTables() as c:
        with torch.cuda.graph(graph):
            opt_g.step()
    built_in_capture = c.calls
    for gs in grads[1:4]:
        for p, g, st in zip(eager, gs, static):
            p.grad.copy_(g)
            st.copy_(g)
        opt_e.step()
        graph.replay()
    # an eager step of the graphed optimizer with gradients elsewhere: its plan is rebuilt outside capture
    for p, q, g in zip(eager, graphed, grads[4]):
        p.grad.copy_(g)
        q.grad = g.clone()
    opt_e.step()
    opt_g.step()
    gc.collect()
    churn = [torch.full((n,), -1, dtype=torch.int64, device=DEV) for n in (12, 18, 64, 4096, 1 << 16)]
    churn += [torch.full((n,), -1, dtype=torch.int64).pin_memory() for n in (12, 18, 64, 4096)]
    for gs in grads[5:]:
        for p, g, st in zip(eager, gs, static):
            p.grad.copy_(g)
            st.copy_(g)
        opt_e.step()
        graph.replay()
    torch.cuda.synchronize()
    ok = all(same_bits(p, q) for p, q in zip(eager, graphed))
    record("11 graph: plan rebuilt during capture", ok and built_in_capture >= 1,
           f"tables built in capture: {built_in_capture}; 7 replays around a rebuild and memory churn match eager")
    del churn


# ----- item 12: a CPU-tensor lr -------------------------------------------------------------

def twins(cls, lr, seed=2):
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, device=DEV)) for s in ((64, 256), (3000,), (7, 48))]
    return params, cls(params, lr=lr, weight_decay=0.1, fused=True, **kw_of(cls))


for cls in CLASSES:
    @guarded(f"12 CPU lr, no sync: {cls.__name__}")
    def _():
        params, opt = twins(cls, torch.tensor(1e-3))
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()  # builds the tables
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
            ok, detail = True, "a step with lr=torch.tensor(1e-3) under set_sync_debug_mode('error')"
        except RuntimeError as err:
            ok, detail = False, str(err).splitlines()[0][:90]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        # the control: the copy the launches made before (lr.to(device)) is caught by the same mode
        original = FT._host_lr
        FT._host_lr = lambda lr, device: None if isinstance(lr, torch.Tensor) else float(lr)
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
            caught = False
        except RuntimeError:
            caught = True
        finally:
            torch.cuda.set_sync_debug_mode("default")
            FT._host_lr = original
        record(f"12 CPU lr, no sync: {cls.__name__}", ok and caught,
               detail + f"; control (the old copy) caught: {caught}")

    @guarded(f"12 CPU lr, same bits: {cls.__name__}")
    def _():
        value = torch.tensor(1e-3)
        runs = {name: twins(cls, lr) for name, lr in
                (("float", float(value)), ("cpu tensor", value.clone()), ("cuda tensor", value.to(DEV)))}
        gen = torch.Generator(device=DEV).manual_seed(3)
        for _ in range(4):
            gs = [torch.randn(p.shape, device=DEV, generator=gen) for p in runs["float"][0]]
            for params, opt in runs.values():
                for p, g in zip(params, gs):
                    p.grad = g.clone()
                opt.step()
        ref_params, ref_opt = runs["float"]
        same = {}
        for name, (params, opt) in runs.items():
            same[name] = all(same_bits(p, q) for p, q in zip(params, ref_params)) and all(
                same_bits(opt.state[p][k], v) for p, q in zip(params, ref_params) for k, v in ref_opt.state[q].items())
        record(f"12 CPU lr, same bits: {cls.__name__}", same["cpu tensor"],
               "bit-identical to a float lr after 4 steps: " + ", ".join(f"{k} {v}" for k, v in same.items()))


# ----- item 13: gradients off a 16-byte boundary ----------------------------------------------

def old_rule():
    """The rule before: a tensor whose streams are not all aligned loads and stores no vectors."""
    saved = FT._aligned, FT._aligned_8bit
    FT._aligned = lambda a: (1 << len(a)) - 1 if all(x % 16 == 0 for x in a) else 0
    FT._aligned_8bit = lambda cols, a: (1 << len(a)) - 1 if cols % 16 == 0 and all(x % 16 == 0 for x in a) else 0
    return saved


def bench(cls, offset, rule_before=False, n=8, shape=(4096, 4096), steps=20):
    saved = old_rule() if rule_before else None
    try:
        torch.manual_seed(4)
        params = [torch.nn.Parameter(torch.randn(shape, device=DEV)) for _ in range(n)]
        numel = params[0].numel()
        values = torch.randn(n * numel, device=DEV, generator=torch.Generator(device=DEV).manual_seed(5))
        flat = torch.zeros(offset + n * numel + 8, device=DEV)
        flat[offset:offset + n * numel].copy_(values)  # the same gradients at every offset
        del values
        for i, p in enumerate(params):  # views of one bucket, as DDP's gradient_as_bucket_view makes
            p.grad = flat[offset + i * numel: offset + (i + 1) * numel].view(shape)
        opt = cls(params, lr=1e-4, weight_decay=0.1, fused=True, **kw_of(cls))
        for _ in range(3):
            opt.step()
        times = []
        for _ in range(steps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            opt.step()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e-3)
        misaligned = params[0].grad.data_ptr() % 16 != 0
        return statistics.median(times), n * numel, params, misaligned
    finally:
        if saved is not None:
            FT._aligned, FT._aligned_8bit = saved


BYTES = {AdamW: 28, AdamW8bit: 16, Lion: 20}  # per fp32 parameter (Note [fused GPU], the README's 8-bit figure)
for cls in (AdamW, Lion, AdamW8bit):
    @guarded(f"13 alignment: {cls.__name__}")
    def _():
        results = {}
        variants = (("aligned", 0, False), ("grad +4 B", 1, False), ("grad +4 B, rule before", 1, True))
        for name, offset, before in variants:
            seconds, count, params, misaligned = bench(cls, offset, before)
            results[name] = (seconds, params, misaligned)
            gbps = BYTES[cls] * count / seconds / 1e9
            record(f"13 {cls.__name__}: {name}", None, f"{seconds * 1e3:.3f} ms/step, {gbps:.0f} GB/s")
        base = results["aligned"][1]
        same = all(same_bits(p, q) for r in results.values() for p, q in zip(r[1], base))
        t = {k: v[0] for k, v in results.items()}
        record(f"13 alignment: {cls.__name__}", same and results["grad +4 B"][2],
               f"same bits in all three; time vs aligned: {t['grad +4 B'] / t['aligned']:.2f}x now, "
               f"{t['grad +4 B, rule before'] / t['aligned']:.2f}x before")
        del results
        gc.collect()
        torch.cuda.empty_cache()


@guarded("12 CPU lr under graph capture")
def _():
    params, opt = twins(AdamW, torch.tensor(1e-3))
    for p in params:
        p.grad = torch.randn_like(p)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        opt.step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            opt.step()
        record("12 CPU lr under graph capture", False, "captured without a word")
    except RuntimeError as err:
        msg = str(err).splitlines()[0]
        record("12 CPU lr under graph capture", msg.startswith("lr is a CPU tensor"), msg[:90])


@guarded("13b non-contiguous bf16 + SR")
def _():
    p = torch.nn.Parameter(torch.randn(512, 256, device=DEV).to(torch.bfloat16).t())
    opt = AdamW([p], lr=1e-3, fused=True, stochastic_rounding=True)
    p.grad = torch.randn_like(p)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        opt.step()
    told = [str(w.message) for w in said if "run the reference" in str(w.message)]
    record("13b warned once", len(told) == 1, told[0][:90] if told else "no warning")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
        synced = False
    except RuntimeError:
        synced = True
    finally:
        torch.cuda.set_sync_debug_mode("default")
    record("13b non-contiguous bf16 + SR", None,
           "syncs (the reference path; a warning is _dispatch.route's to give)" if synced else "no sync")


# ----- Muon on a GPU (issue 24): the batched bf16 iteration against torch.optim.Muon ---------

@guarded("Muon vs torch.optim.Muon")
def _():
    shapes = [(1536, 512), (1536, 512), (512, 512), (2048, 512), (512, 2048)]
    ours = [torch.nn.Parameter(torch.randn(s, device=DEV) * 0.02) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    a, b = Muon(ours, lr=0.02), torch.optim.Muon(theirs, lr=0.02)
    gen = torch.Generator(device=DEV).manual_seed(0)
    for _ in range(3):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn(p.shape, device=DEV, generator=gen)
            q.grad = p.grad.clone()
        a.step()
        b.step()
    same = all(same_bits(p, q) for p, q in zip(ours, theirs))
    # in units of one step's update (lr times O's RMS, about 1 / sqrt(cols) for a wide matrix)
    worst = max(((p - q).abs().max() / (0.02 / max(p.shape) ** 0.5)).item() for p, q in zip(ours, theirs))
    record("Muon vs torch.optim.Muon", same or worst < 0.05,
           f"bit for bit: {same}; largest difference {worst:.3g} of one step's update")


@guarded("Muon 8-bit momentum")
def _():
    p = torch.nn.Parameter(torch.randn(1024, 1024, device=DEV) * 0.02)
    q = torch.nn.Parameter(p.detach().clone())
    a, b = Muon([p], lr=0.02, state_dtype=torch.uint8), Muon([q], lr=0.02)
    for _ in range(3):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
        a.step()
        b.step()
    rel = ((p - q).norm() / q.norm()).item()
    record("Muon 8-bit momentum", a.state[p]["momentum_buffer"].dtype == torch.uint8,
           f"runs (the batched path); parameters vs float momentum: relative difference {rel:.2e}")


print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
      f"{datetime.date.today()}")
width = max(len(r[0]) for r in rows)
print(f"{'check'.ljust(width)}  result  detail")
for check, result, detail in rows:
    print(f"{check.ljust(width)}  {result.ljust(6)}  {detail}")
sys.exit(1 if any(r[1] == "FAIL" for r in rows) else 0)
