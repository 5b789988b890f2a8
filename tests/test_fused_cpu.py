"""The fused CPU backends (Note [fused CPU]): large tensors through the compiled kernels or
torch's fused AdamW, against the reference at every step; state_dict round trips; the fallback
when no C++ compiler works. (The bench command's tests are in test_bench.py.)"""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import draw_config, set_grads
from hypothesis import given
from hypothesis import strategies as st
from optim_table import OPTIMIZERS, ids

from optimizer._fused_cpu import BLOCK

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def big_and_small(data, dtype, seed):
    """One or two tensors of several blocks of the C kernels and an odd tail, and small ones around them."""
    extra = data.draw(st.integers(0, 40), label="extra")
    shapes = [(2 * BLOCK + 2 * extra + 1,), (3,), ()]
    if data.draw(st.booleans(), label="second big"):
        shapes.insert(1, (129, BLOCK // 128 + extra))
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(dtype)) for s in shapes]


@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids(OPTIMIZERS))
@given(data=st.data())
def test_fused_matches_reference_every_step_on_large_tensors(info, data):
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    cfg = draw_config(data, info)
    tensor_lr = data.draw(st.booleans(), label="tensor_lr")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    ref_params = big_and_small(data, dtype, seed)
    new_params = [torch.nn.Parameter(p.detach().clone()) for p in ref_params]

    def groups(params):
        lr = torch.tensor(cfg["lr"]) if tensor_lr else cfg["lr"]
        return [{"params": params[:1], "lr": lr}, {"params": params[1:], "lr": cfg["lr"] / 3, "weight_decay": 0.0}]

    rest = {k: v for k, v in cfg.items() if k != "lr"}
    ref = info.cls(groups(ref_params), foreach=False, fused=False, **rest)
    new = info.cls(groups(new_params), fused=True, **rest)
    gen_ref, gen_new = torch.Generator().manual_seed(seed + 1), torch.Generator().manual_seed(seed + 1)
    scale = [p.detach().abs().float() for p in ref_params]  # the largest magnitude each element has had
    # an update that jumps (Lion's at c = 0): where it is within rounding of a jump, the kernel and
    # the reference may land on either side (Lion: sign(c) differs, by 2 lr), and that difference
    # is then carried along
    excused = [torch.zeros(p.shape, dtype=torch.bool) for p in ref_params]
    for step in range(1, 5):
        set_grads(ref_params, gen_ref, p_missing=0.15)
        set_grads(new_params, gen_new, p_missing=0.15)
        if info.near_jump is not None:
            for a, e in zip(ref_params, excused):
                if a.grad is not None:
                    state = {k: ref.state[a][k].double() if ref.state[a] else torch.zeros(a.shape, dtype=torch.float64)
                             for k in info.state_tensor_keys}
                    e |= info.near_jump(state, a.grad.double(), rel=1e-6, **cfg)
        ref.step()
        new.step()
        for a, b, s, e in zip(ref_params, new_params, scale, excused):
            a, b, s = a.detach()[~e], b.detach()[~e], s[~e]
            if dtype in (torch.float16, torch.bfloat16):
                # float32 math that rounds differently by an ulp can land on the other side of a
                # bf16/fp16 rounding boundary: at most one ulp of the parameter's dtype per step, at
                # the magnitude the element had when it happened (the difference is carried along)
                s = torch.maximum(s, a.abs().float())
                ulp = (
                    torch.nextafter(s.to(dtype), torch.tensor(float("inf"), dtype=dtype)).float() - s.to(dtype).float()
                )
                assert ((a.float() - b.float()).abs() <= step * ulp).all()
            else:
                torch.testing.assert_close(b, a)
        for a, b, s, e in zip(ref_params, new_params, scale, excused):
            s[~e] = torch.maximum(s[~e], a.detach()[~e].abs().float())
            assert e.float().mean() < 1e-3  # excuses stay rare
            for k, v in ref.state[a].items():
                torch.testing.assert_close(new.state[b][k], v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids(OPTIMIZERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_state_dict_round_trip_is_bit_identical(info, dtype):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(BLOCK + 3).to(dtype)), torch.nn.Parameter(torch.randn(5).to(dtype))]
    opt = info.cls(params, fused=True, weight_decay=0.1, **info.c_loop_kwargs)
    grads = [[torch.randn_like(p) for p in params] for _ in range(6)]
    for gs in grads[:3]:
        for p, g in zip(params, gs):
            p.grad = g
        opt.step()
    buf = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    twins = [torch.nn.Parameter(t) for t in saved["params"]]
    opt2 = info.cls(twins, fused=True, weight_decay=0.1, **info.c_loop_kwargs)
    opt2.load_state_dict(saved["opt"])
    for gs in grads[3:]:
        for p, q, g in zip(params, twins, gs):
            p.grad, q.grad = g, g.clone()
        opt.step()
        opt2.step()
    for p, q in zip(params, twins):
        assert torch.equal(p, q)


def test_adamw_fused_default_is_torchs_kernel_and_exact():
    """fp32 AdamW with correct_bias runs torch's fused kernel: equal to torch.optim.AdamW(fused=True)."""
    from optimizer import AdamW

    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(BLOCK * 2))
    b = torch.nn.Parameter(a.detach().clone())
    ours, theirs = AdamW([a], weight_decay=0.1), torch.optim.AdamW([b], weight_decay=0.1, fused=True)
    for _ in range(5):
        g = torch.randn_like(a)
        a.grad, b.grad = g, g.clone()
        ours.step()
        theirs.step()
    assert torch.equal(a, b)


def test_one_call_updates_every_element_of_every_tensor_exactly_once():
    """The C loop cuts all tensors of a step into blocks shared by the threads: sizes around
    the block size, empty and 0-dim tensors, and several dtypes in one step. From m = 0 and
    g = 1, one Lion step moves every element by exactly -lr (twice would be -2 lr, never 0)."""
    from optimizer import Lion

    sizes = [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5, 7]
    params = [torch.nn.Parameter(torch.zeros(n, dtype=dt)) for dt in DTYPES for n in sizes]
    params.append(torch.nn.Parameter(torch.zeros((), dtype=torch.float32)))
    for p in params:
        p.grad = torch.ones_like(p)
    opt = Lion(params, lr=0.25, betas=(0.5, 0.75), fused=True)
    opt.step()
    for p in params:
        assert torch.equal(p.detach(), torch.full_like(p, -0.25)), (p.dtype, p.shape)
        assert torch.equal(opt.state[p]["exp_avg"], torch.full_like(opt.state[p]["exp_avg"], 0.25))


def test_step_leaves_gradients_alone():
    for info in OPTIMIZERS:
        p = torch.nn.Parameter(torch.randn(BLOCK + 1))
        g = torch.randn_like(p)
        p.grad = g.clone()
        info.cls([p], maximize=True, fused=True).step()
        assert torch.equal(p.grad, g)


def test_a_torch_adamw_checkpoint_loads_into_ours():
    from optimizer import AdamW

    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(10))
    theirs = torch.optim.AdamW([a], lr=1e-2)
    a.grad = torch.randn(10)
    theirs.step()
    b = torch.nn.Parameter(a.detach().clone())
    ours = AdamW([b])
    ours.load_state_dict(theirs.state_dict())
    assert ours.param_groups[0]["lr"] == 1e-2 and ours.param_groups[0]["correct_bias"] is True
    g = torch.randn(10)
    a.grad, b.grad = g, g.clone()
    theirs.step()
    ours.step()
    torch.testing.assert_close(a, b)


FALLBACK = textwrap.dedent(
    """
    import os, warnings, torch
    os.environ["CC"] = "/nonexistent/cc"   # a machine without a working C compiler
    from optimizer import Lion
    from optimizer._fused_cpu import BLOCK
    p = torch.nn.Parameter(torch.ones(BLOCK + 1)); q = torch.nn.Parameter(torch.ones(BLOCK + 1))
    a, b = Lion([p], lr=0.1), Lion([q], lr=0.1, foreach=False, fused=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            p.grad = torch.linspace(-1, 1, BLOCK + 1); q.grad = p.grad.clone()
            a.step(); b.step()
    ours = [w for w in caught if "fused CPU kernels cannot be compiled" in str(w.message)]
    print("warnings", len(ours), "equal", torch.equal(p, q))
    try:
        Lion([p], fused=True).step()
    except RuntimeError as err:
        print("fused=True raises:", "cannot be compiled" in str(err))
    """
)


def test_without_a_compiler_it_falls_back_with_one_warning():
    done = subprocess.run([sys.executable, "-c", FALLBACK], capture_output=True, text=True, timeout=300)
    assert "warnings 1 equal True" in done.stdout, done.stdout + done.stderr
    assert "fused=True raises: True" in done.stdout, done.stdout + done.stderr
