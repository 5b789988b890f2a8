"""The fused GPU kernels (Note [fused GPU]) against the reference at every step.

Without a GPU they run in Triton's interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1 and the fixture triton_on_this_device sends CPU parameters to them); on a GPU
the same tests run on CUDA tensors."""

from __future__ import annotations

import io

import pytest
import torch
from optim_table import OPTIMIZERS, ids

triton = pytest.importorskip("triton")

from optimizer import _fused_triton as FT  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = [(1,), (4097,), (3, 5), (FT.BLOCK,), (2 * FT.BLOCK + 1,), ()]
PAIRS = [(torch.float32, None), (torch.bfloat16, None), (torch.float16, None),
         (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)]


pytestmark = pytest.mark.usefixtures("triton_on_this_device")  # (conftest.py)


def make(shapes, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)) for s in shapes]


def grads_for(params, gen, p_missing=0.2):
    out = []
    for p in params:
        missing = torch.rand((), generator=gen).item() < p_missing
        out.append(None if missing else torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype).to(DEVICE))
    return out


def groups(params, lr, tensor_lr):
    first = torch.tensor(lr, device=DEVICE) if tensor_lr else lr
    return [{"params": params[:3], "lr": first}, {"params": params[3:], "lr": lr / 3, "weight_decay": 0.0}]


def assert_close_to_reference(a, b, step, dtype):
    if dtype in (torch.float16, torch.bfloat16):
        # float32 math that rounds differently by an ulp can cross a rounding boundary of the
        # parameter's dtype: at most one ulp of that dtype per step
        s = torch.maximum(a.detach().abs(), b.detach().abs()).float()
        ulp = torch.nextafter(s.to(dtype), torch.tensor(float("inf"), dtype=dtype, device=DEVICE)).float() - s
        assert ((a.float() - b.float()).abs() <= step * ulp.abs() + 1e-12).all()
    else:
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype,state_dtype", PAIRS, ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids(OPTIMIZERS))
def test_kernel_matches_reference_every_step(info, dtype, state_dtype):
    for k, cfg in enumerate(info.configs):
        tensor_lr = isinstance(cfg.get("lr"), torch.Tensor)
        lr = float(cfg.get("lr", info.step_lr))
        rest = {key: v for key, v in cfg.items() if key != "lr"}
        ref_params = make(SIZES, dtype, seed=k)
        new_params = [torch.nn.Parameter(p.detach().clone()) for p in ref_params]
        ref = info.cls(groups(ref_params, lr, tensor_lr), foreach=False, fused=False, state_dtype=state_dtype, **rest)
        new = info.cls(groups(new_params, lr, tensor_lr), fused=True, state_dtype=state_dtype, **rest)
        gen = torch.Generator().manual_seed(k)
        for step in range(1, 4):
            for a, b, g in zip(ref_params, new_params, grads_for(ref_params, gen)):
                a.grad, b.grad = g, None if g is None else g.clone()
            ref.step()
            new.step()
            for a, b in zip(ref_params, new_params):
                assert_close_to_reference(b, a, step, dtype)
                for key, v in ref.state[a].items():
                    w = new.state[b][key]
                    assert w.dtype == v.dtype and w.device == v.device
                    if key == "step" or state_dtype is None:
                        torch.testing.assert_close(w, v, rtol=1e-5, atol=1e-6)
                    else:  # bf16 state: one bf16 ulp per step
                        torch.testing.assert_close(w.float(), v.float(), rtol=step * 2**-7, atol=1e-6)


@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids(OPTIMIZERS))
def test_one_launch_per_group_and_dtype_and_the_tables_are_reused(info, monkeypatch):
    launches = []
    name = info.triton_kernel
    kernel = getattr(FT, name)

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(FT, name, Counting())
    params = make([(n,) for n in range(1, 41)] + [(FT.BLOCK + 7,)], torch.float32, seed=0)
    opt = info.cls(params, fused=True)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert len(launches) == 1  # 41 tensors, one launch
    cached = len(FT._PLANS)
    opt.step()
    assert len(launches) == 2 and len(FT._PLANS) == cached  # same addresses: the same plan and tables


@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids(OPTIMIZERS))
def test_gradscaler_skip_changes_nothing_and_scale_divides(info):
    """found_inf != 0: nothing changes (not even the step count); grad_scale: the gradient is
    divided by it in the kernel, as GradScaler's own unscale would."""
    params = make(SIZES, torch.float32, seed=1)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt, ref = info.cls(params, fused=True), info.cls(twins, foreach=False, fused=False)
    for p, q in zip(params, twins):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    opt.step()
    ref.step()
    before = [p.detach().clone() for p in params]
    state_before = {i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(params)}
    opt.grad_scale = torch.tensor(1024.0, device=DEVICE)
    opt.found_inf = torch.tensor(1.0, device=DEVICE)
    for p in params:
        p.grad = torch.full_like(p, float("inf"))
    opt.step()
    for i, p in enumerate(params):
        assert torch.equal(p.detach(), before[i])
        for k, v in opt.state[p].items():
            assert torch.equal(v, state_before[i][k]), k
    opt.found_inf = torch.tensor(0.0, device=DEVICE)
    for p, q in zip(params, twins):
        q.grad = torch.randn_like(q)
        p.grad = q.grad * 1024.0
    opt.step()
    ref.step()
    del opt.grad_scale, opt.found_inf
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q)
        for k, v in ref.state[q].items():
            torch.testing.assert_close(opt.state[p][k], v)


@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids(OPTIMIZERS))
def test_state_dict_round_trip_and_non_contiguous_parameters(info):
    """A checkpoint taken mid-run continues bit-identically; a non-contiguous parameter (not
    for the kernel) is updated by foreach in the same step."""
    def build(params):
        return info.cls(params, fused=True, state_dtype=torch.bfloat16, weight_decay=0.1)

    base = make([(4097,), (5,)], torch.bfloat16, seed=2)
    base.append(torch.nn.Parameter(torch.randn(6, 4, device=DEVICE).t()))  # non-contiguous
    opt = build(base)
    gen = torch.Generator().manual_seed(3)
    grads = [[torch.randn(p.shape, generator=gen).to(p.dtype).to(DEVICE) for p in base] for _ in range(6)]
    for gs in grads[:3]:
        for p, g in zip(base, gs):
            p.grad = g
        opt.step()
    buf = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in base], "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    twins = [torch.nn.Parameter(t) for t in saved["params"]]
    opt2 = build(twins)
    opt2.load_state_dict(saved["opt"])
    assert opt2.state[twins[0]]["exp_avg"].dtype == torch.bfloat16
    ref = [torch.nn.Parameter(t.clone()) for t in saved["params"]]
    opt_ref = info.cls(ref, foreach=False, fused=False, state_dtype=torch.bfloat16, weight_decay=0.1)
    opt_ref.load_state_dict(saved["opt"])
    for gs in grads[3:]:
        for p, q, r, g in zip(base, twins, ref, gs):
            p.grad, q.grad, r.grad = g, g.clone(), g.clone()
        opt.step()
        opt2.step()
        opt_ref.step()
    for p, q, r in zip(base, twins, ref):
        assert torch.equal(p, q)
    torch.testing.assert_close(base[-1], ref[-1])  # the non-contiguous one, via foreach


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu
@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids(OPTIMIZERS))
def test_cuda_default_is_the_kernel_and_step_never_syncs(info):
    """No host synchronisation inside step(): torch raises on any sync in "error" mode. The
    first step builds the tables (pinned, non-blocking copies); later steps only launch."""
    params = make(SIZES, torch.bfloat16, seed=4)
    opt = info.cls(params, lr=torch.tensor(1e-3, device="cuda"), state_dtype=torch.bfloat16)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    opt.grad_scale = torch.tensor(4.0, device="cuda")
    opt.found_inf = torch.tensor(0.0, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        del opt.grad_scale, opt.found_inf


@gpu
@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids(OPTIMIZERS))
def test_a_step_captured_in_a_cuda_graph_replays_like_eager_steps(info):
    def build():
        params = make([(4097,), (3, 5), (FT.BLOCK,)], torch.float32, seed=5)
        for p in params:
            p.grad = torch.zeros_like(p)
        return params, info.cls(params, lr=torch.tensor(1e-2, device="cuda"), weight_decay=0.1)

    eager, opt_e = build()
    graphed, opt_g = build()
    gen = torch.Generator(device="cuda").manual_seed(0)
    grads = [[torch.randn(p.shape, device="cuda", generator=gen) for p in eager] for _ in range(6)]
    for p, g in zip(graphed, grads[0]):  # warm up on a side stream: state, tables, compile
        p.grad.copy_(g)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        opt_g.step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt_g.step()
    for p, g in zip(eager, grads[0]):
        p.grad = g.clone()
    opt_e.step()  # capturing records the step without running it: both sides have taken one step
    for gs in grads[1:]:
        for p, q, g in zip(eager, graphed, gs):
            p.grad.copy_(g)
            q.grad.copy_(g)
        opt_e.step()
        graph.replay()
    torch.cuda.synchronize()
    for p, q in zip(eager, graphed):
        torch.testing.assert_close(q, p)


PTX_COUNTS = """
import inspect, json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from optimizer import _fused_triton as FT

out = {}
for name, aligned in json.loads(sys.argv[1]):  # the kernels' names in _fused_triton, their ALIGNED masks
    kernel = getattr(FT, name)
    constexprs = dict(lr_ptr=None, grad_scale_ptr=None, found_inf_ptr=None, seeds_ptr=None, P=triton.language.float32,
                      S=triton.language.float32, BLOCK=FT.BLOCK, LR_TENSOR=False, SCALED=False, SKIPPABLE=False,
                      MAXIMIZE=False, ALIGNED=aligned, ROUND=False)
    names = list(inspect.signature(kernel.fn).parameters)
    if "CORRECT_BIAS" in names:
        constexprs["CORRECT_BIAS"] = True
    pointers = {"table": "*i64", "blocks": "*i64", "log_betas": "*fp64"}
    signature = {n: "constexpr" if n in constexprs else pointers.get(n, "fp32") for n in names}
    try:
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": FT.NUM_WARPS})
    except Exception as err:  # a Triton without its CUDA compiler backend
        print("SKIP", type(err).__name__, err)
        sys.exit(0)
    ptx = compiled.asm["ptx"]
    out[f"{name} {aligned}"] = [len(re.findall(r"ld\\.global(\\.\\w+)*\\.v4", ptx)),
                                len(re.findall(r"st\\.global(\\.\\w+)*\\.v4", ptx))]
print(json.dumps(out))
"""


def test_whole_blocks_compile_to_16_byte_vector_accesses():
    """Compiled for an H100 (sm_90; no GPU needed: Triton's own compiler, in a process without
    the interpreter): the loads and stores of a whole block are 16-byte vectors, what reaching
    memory bandwidth takes. Each fp32 stream of a 2048-element block over 128 threads is 16
    values a thread: 4 vectors. A gradient off a 16-byte boundary (a DDP bucket view) makes its
    own loads scalar, and only those (Note [alignment]); nothing aligned, nothing a vector."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    streams = {info.triton_kernel: info.kernel_streams for info in OPTIMIZERS}  # tensors read, written
    masks = {"every stream": lambda n: (1 << n) - 1, "all but the gradient": lambda n: (1 << n) - 1 - 2,
             "none": lambda n: 0}  # bit k: the k-th stream read (p, g, states) starts at a 16-byte boundary
    variants = [[name, mask(loads)] for name, (loads, _) in streams.items() for mask in masks.values()]
    done = subprocess.run([sys.executable, "-c", PTX_COUNTS, json.dumps(variants)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    if done.stdout.startswith("SKIP"):
        pytest.skip(done.stdout.strip())
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    per_thread = FT.BLOCK // (32 * FT.NUM_WARPS) // 4  # 16-byte vectors per fp32 stream
    for name, (loads, stores) in streams.items():
        expected = {"every stream": [loads, stores], "all but the gradient": [loads - 1, stores], "none": [0, 0]}
        for which, mask in masks.items():
            got = counts[f"{name} {mask(loads)}"]
            assert got == [n * per_thread for n in expected[which]], (name, which, counts)


NO_TRITON = """
import sys, warnings
sys.modules["triton"] = None            # a machine without Triton: importing it fails
import torch
import optimizer
from optimizer import Lion, _dispatch
_dispatch.TRITON_DEVICES.add("cpu")         # send CPU parameters where CUDA ones would go
p = torch.nn.Parameter(torch.ones(5000)); q = torch.nn.Parameter(torch.ones(5000))
a, b = Lion([p], lr=0.1), Lion([q], lr=0.1, foreach=False, fused=False)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(3):
        p.grad = torch.linspace(-1, 1, 5000); q.grad = p.grad.clone()
        a.step(); b.step()
ours = [w for w in caught if "need Triton" in str(w.message)]
print("warnings", len(ours), "equal", torch.equal(p, q))
try:
    Lion([p], fused=True).step()
except RuntimeError as err:
    print("fused=True raises:", "need Triton" in str(err))
"""


def test_without_triton_import_works_and_steps_fall_back_with_one_warning():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", NO_TRITON], capture_output=True, text=True, timeout=300, env=env)
    assert "warnings 1 equal True" in done.stdout, done.stdout + done.stderr
    assert "fused=True raises: True" in done.stdout, done.stdout + done.stderr


def test_adamw_bias_corrections_keep_float32_precision_in_the_first_steps():
    """From p = 0 with lr = 1 the parameter is the update itself: 1 - beta2^t computed in float32
    (0.999 -> 1e-3 loses 4 digits) would show as a 1e-5 relative error; the kernel's float64
    corrections stay at float32 rounding."""
    from optimizer import AdamW

    params = [torch.nn.Parameter(torch.zeros(n, device=DEVICE)) for n in (4097, 3)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = AdamW(params, lr=1.0, weight_decay=0.0, fused=True)
    ref = AdamW(twins, lr=1.0, weight_decay=0.0, foreach=False, fused=False)
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        for p, q in zip(params, twins):
            q.grad = torch.randn(q.shape, generator=gen).to(DEVICE)
            p.grad = q.grad.clone()
        opt.step()
        ref.step()
        for p, q in zip(params, twins):
            torch.testing.assert_close(p, q, rtol=3e-6, atol=1e-6)  # updates are ~1: a few float32 roundings
