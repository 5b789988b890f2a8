"""The Triton kernels of 8-bit states and stochastic rounding against their references at every step: the 8-bit
kernels ``adamw8bit`` and ``lion8bit`` (Note [8-bit states] in _8bit.py, Note [8-bit
kernels] in _fused_triton.py) and the stochastic rounding of bf16/fp16 parameters in all
four kernels (Note [stochastic rounding]).

Without a GPU the kernels run in Triton's interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1; the fixture triton_on_this_device sends CPU parameters to them, as in
test_fused_triton.py); on a GPU the same tests run on CUDA tensors, and the tests marked
``gpu`` compare with torch's reference on CUDA.

The 8-bit kernels do the reference's float32 operations in its order with correctly rounded
operations. So they equal it bit for bit where the reference's operations are correctly
rounded too: all are but torch's float32 sqrt on the CPU (its x86 vector kernel is within
0.75 ulp, not correctly rounded), so the bit-for-bit tests give the reference a correctly
rounded sqrt (:func:`ieee_sqrt`) and the others bound the difference from the plain one.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_unchanged, snapshot

triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402

from optimizer import AdamW, AdamW8bit, Lion, Lion8bit, _8bit, _rounding  # noqa: E402
from optimizer import _fused_triton as FT  # noqa: E402
from optimizer.adamw import _single_tensor_adamw8bit  # noqa: E402
from optimizer.lion import _single_tensor_lion8bit  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# rows x cols: rows shorter than a block, a row of 1 block and a partial one, whole blocks, 3-d
SHAPES = [(3, 100), (5, 300), (2, 512), (2, 3, 70)]
REFERENCES = {"adamw": _single_tensor_adamw8bit, "lion": _single_tensor_lion8bit}
KERNELS = {"adamw": "adamw8bit", "lion": "lion8bit"}
CLASSES = {"adamw": AdamW8bit, "lion": Lion8bit}


pytestmark = pytest.mark.usefixtures("triton_on_this_device")  # (conftest.py)


@pytest.fixture
def ieee_sqrt(monkeypatch):
    """The references with a correctly rounded float32 sqrt (through float64, which rounds the
    float32 result exactly), as the kernels' (sqrt_rn; numpy's in the interpreter) and CUDA's."""
    sqrt = torch.sqrt

    def correctly_rounded(x, *args, **kwargs):
        if isinstance(x, torch.Tensor) and x.dtype == torch.float32 and not args and not kwargs:
            return sqrt(x.double()).float()
        return sqrt(x, *args, **kwargs)

    monkeypatch.setattr(torch, "sqrt", correctly_rounded)
    monkeypatch.setattr(torch.Tensor, "sqrt", correctly_rounded)


# ----- helpers -------------------------------------------------------------------------

def hyper_of(algo, lr=3e-3, weight_decay=0.1, maximize=False, correct_bias=True, betas=(0.9, 0.99)):
    h = dict(lr=lr, beta1=betas[0], beta2=betas[1], weight_decay=weight_decay, maximize=maximize)
    if algo == "adamw":
        h.update(eps=1e-8, correct_bias=correct_bias)
    return h


def new_states(algo, params):
    """The 8-bit states of the backends' lists: codes, scales (and AdamW's step counters)."""
    n = 2 if algo == "adamw" else 1
    codes = [[torch.zeros(p.shape, dtype=torch.uint8, device=p.device) for p in params] for _ in range(n)]
    scales = [[torch.zeros(_8bit.scale_shape(p.shape), device=p.device) for p in params] for _ in range(n)]
    steps = [[torch.tensor(0.0, device=p.device) for p in params]] if algo == "adamw" else []
    return codes + scales + steps


def make_params(shapes, dtype, seed, device):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype).to(device) for s in shapes]


def make_grads(params, gen, device):
    """Gradients of a few magnitudes, so that blocks and rows get different scales."""
    out = []
    for p in params:
        g = torch.randn(p.shape, generator=gen) * torch.exp(2 * torch.randn(p.shape[0], *[1] * (p.dim() - 1),
                                                                                generator=gen))
        out.append(g.to(p.dtype).to(device))
    return out


def clone_all(lists, device=None):
    return [[t.detach().clone() if device is None else t.detach().to(device, copy=True) for t in lst] for lst in lists]


def one_step(algo, kernel, params, grads, states, hyper, seeds):
    """One step of the kernel or of the reference, step counters counted first (Note [step counters])."""
    if algo == "adamw":
        for s in states[-1]:
            s += 1
    fn = getattr(FT, KERNELS[algo]) if kernel else REFERENCES[algo]
    fn(params, grads, *states, **hyper, rounding_seeds=seeds)


def bits(t):
    t = t.detach().cpu()
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_bits_equal(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape, what
    same = bits(a) == bits(b)
    both_nan = a.detach().cpu().isnan() & b.detach().cpu().isnan() if a.is_floating_point() else False
    bad = ~(same | both_nan)  # NaNs are NaNs whatever their payload
    assert not bad.any(), f"{what}: {int(bad.sum())} of {a.numel()} differ, first at {bad.nonzero()[0].tolist()}"


def ulp(x, dtype):
    """The gap above |x| in ``dtype`` (as float32)."""
    a = x.detach().abs().to(dtype)
    return (torch.nextafter(a, torch.tensor(math.inf, dtype=dtype, device=a.device)).float() - a.float()).abs()


def within_an_ulp(new, old, dtype):
    """What an ulp of difference in the float32 update (a sqrt, a division) may move a parameter
    ``old`` -> ``new``: an ulp of ``new`` in its dtype (a rounding crossed), plus two float32 ulps
    of the update (where the parameter cancels, they are many of its own)."""
    return ulp(new, dtype) + 2 * ulp(new.float() - old.float(), torch.float32)


# ----- the 8-bit kernels: bit for bit --------------------------------------------------

# (algorithm, parameter dtype, stochastic rounding, hyper-parameters)
CASES = [
    ("adamw", torch.float32, False, dict(weight_decay=0.1)),
    ("adamw", torch.float32, False, dict(maximize=True, weight_decay=0.0, lr="tensor")),
    ("adamw", torch.bfloat16, True, dict(correct_bias=False, weight_decay=0.1, lr=1e-2)),
    ("adamw", torch.float16, True, dict(maximize=True, betas=(0.8, 0.999))),
    ("adamw", torch.bfloat16, False, dict()),
    ("lion", torch.float32, False, dict(weight_decay=0.5)),
    ("lion", torch.bfloat16, True, dict(maximize=True, lr="tensor")),
    ("lion", torch.float16, False, dict(betas=(0.95, 0.98))),
]


def case_id(case):
    algo, dtype, sr, cfg = case
    return "-".join([algo, str(dtype).replace("torch.", ""), *(["sr"] if sr else []),
                     *(f"{k}={v}" for k, v in cfg.items())])


def setup_case(case, device):
    algo, dtype, sr, cfg = case
    cfg = dict(cfg)
    if cfg.get("lr") == "tensor":
        cfg["lr"] = torch.tensor(2e-3)
    hyper = hyper_of(algo, **cfg)
    hyper_dev = dict(hyper, lr=hyper["lr"].to(device)) if isinstance(hyper["lr"], torch.Tensor) else hyper
    return algo, dtype, sr, hyper, hyper_dev


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_8bit_kernel_matches_the_reference_bit_for_bit_every_step(case, ieee_sqrt):
    """Parameters, codes and scales equal the reference's at each of 12 steps (two runs side by
    side: any difference would show and grow)."""
    algo, dtype, sr, hyper, hyper_dev = setup_case(case, DEVICE)
    ref_params = make_params(SHAPES, dtype, seed=1, device="cpu")
    ref_states = new_states(algo, ref_params)
    params, states = clone_all([ref_params], DEVICE)[0], clone_all(ref_states, DEVICE)
    gen = torch.Generator().manual_seed(2)
    for step in range(12):
        grads = make_grads(ref_params, gen, "cpu")
        seeds = _rounding.rounding_seeds(7, step, len(params)) if sr else None
        one_step(algo, False, ref_params, grads, ref_states, hyper, seeds)
        one_step(algo, True, params, [g.to(DEVICE) for g in grads], states, hyper_dev, seeds)
        for i, (a, b) in enumerate(zip(ref_params, params)):
            assert_bits_equal(b, a, f"step {step}: params[{i}]")
        for j, (lst_a, lst_b) in enumerate(zip(ref_states, states)):
            for i, (a, b) in enumerate(zip(lst_a, lst_b)):
                assert_bits_equal(b, a, f"step {step}: states[{j}][{i}]")


def test_8bit_nan_inf_and_zero_blocks_as_the_reference(ieee_sqrt):
    """A NaN or an infinity stays in its value (Note [8-bit states]): its block is special (its
    scale the largest finite magnitude, negated) and keeps its other values finite, as the
    reference does; a block of zeros has scale 0 and codes 0."""
    for algo in ("adamw", "lion"):
        hyper = hyper_of(algo)
        ref_params = make_params([(4, 300)], torch.float32, seed=3, device="cpu")
        ref_states = new_states(algo, ref_params)
        params, states = clone_all([ref_params], DEVICE)[0], clone_all(ref_states, DEVICE)
        for step in range(3):
            g = torch.randn(4, 300, generator=torch.Generator().manual_seed(step))
            g[0, 5] = math.nan      # row 0, first block
            g[1, 290] = math.inf    # row 1, second (partial) block
            g[2] = 0.0              # row 2: zeros (at the first step, zero states too)
            g[3, 10] = 1e30         # row 3, first block: g^2 overflows (AdamW's r is inf there, m finite)
            one_step(algo, False, ref_params, [g], ref_states, hyper, None)
            one_step(algo, True, params, [g.to(DEVICE)], states, hyper, None)
            assert_bits_equal(params[0], ref_params[0], f"{algo} step {step}: params")
            for j, (a, b) in enumerate(zip(ref_states, states)):
                assert_bits_equal(b[0], a[0], f"{algo} step {step}: states[{j}]")
        n = 2 if algo == "adamw" else 1
        for k, (codes, scale) in enumerate(zip(states[:n], states[n:2 * n])):
            scale, codes = scale[0].cpu(), codes[0].cpu()
            values = _8bit.decode_root(codes, scale) if k == 1 else _8bit.decode_signed(codes.view(torch.int8), scale)
            overflow = [[3, 0]] if k == 1 else []
            assert (~values.isfinite()).nonzero().tolist() == [[0, 5], [1, 290], *([[3, 10]] if overflow else [])]
            assert torch.signbit(scale).nonzero().tolist() == [[0, 0], [1, 1], *overflow] and scale.isfinite().all()
            assert (scale[2] == 0).all() and (codes[2] == 0).all()


@pytest.mark.parametrize("algo,betas", [("adamw", (0.9, 0.999)), ("adamw", (0.0, 0.999)), ("lion", (0.9, 0.99))],
                         ids=["adamw", "adamw-beta1=0", "lion"])
def test_8bit_overflow_stays_in_its_value_as_in_float32(algo, betas, ieee_sqrt):
    """Issue 27's examples through the optimizers' fused (Triton) path: AdamW's g^2 overflowing in
    every other value (1e-20 / 1e30 alternating; and the largest float, as nan_to_num makes of an
    infinity, in one value a row: with beta1 = 0 the momentum is that float, the largest a scale
    may not be), Lion's momentum overflowing in one value a block (+-3.4e38 alternating). As the
    reference does, bit for bit, and as float32 states: nothing non-finite where float32 keeps it
    finite (the blocks' scales became inf and their values NaN)."""
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(64, 256, generator=gen)
    params = {k: torch.nn.Parameter(start.clone().to(DEVICE if k == "fused" else "cpu"))
              for k in ("fused", "ref", "fp32")}
    float_cls = AdamW if algo == "adamw" else Lion
    kw = dict(lr=1e-3, betas=betas)
    opts = {"fused": CLASSES[algo]([params["fused"]], **kw, min_8bit_size=1, fused=True),
            "ref": CLASSES[algo]([params["ref"]], **kw, min_8bit_size=1, foreach=False, fused=False),
            "fp32": float_cls([params["fp32"]], **kw, foreach=False, fused=False)}
    g = torch.randn(64, 256, generator=gen)
    for step in range(4):
        if algo == "adamw":
            g = torch.randn(64, 256, generator=gen) * torch.tensor([1e-20, 1e30]).repeat(64, 128)
            g[:, 1] = torch.finfo(torch.float32).max
        else:
            g[:, 0] = 3.4e38 * (-1) ** step
        for k, p in params.items():
            p.grad = g.to(p.device)
            opts[k].step()
        assert_bits_equal(params["fused"], params["ref"], f"step {step}")
        for key, v in opts["ref"].state[params["ref"]].items():
            assert_bits_equal(opts["fused"].state[params["fused"]][key], v, f"step {step}: {key}")
        assert torch.equal(params["fused"].detach().cpu().isfinite(), params["fp32"].isfinite())
    if algo == "lion":
        assert torch.equal(params["fused"].detach().cpu(), params["fp32"].detach())


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[5], CASES[6]], ids=case_id)
def test_8bit_kernel_within_an_ulp_of_the_plain_reference_every_step(case):
    """With torch's own float32 sqrt (not correctly rounded on the CPU): at each of 10 steps, from
    the same states, codes within 1 (nearly all equal), scales and parameters within an ulp."""
    algo, dtype, sr, hyper, hyper_dev = setup_case(case, DEVICE)
    params = make_params(SHAPES, dtype, seed=4, device=DEVICE)
    states = new_states(algo, params)
    gen = torch.Generator().manual_seed(5)
    n = 2 if algo == "adamw" else 1
    codes_total = codes_equal = 0
    for step in range(10):
        grads = make_grads(params, gen, "cpu")
        seeds = _rounding.rounding_seeds(9, step, len(params)) if sr else None
        ref_params, ref_states = clone_all([params], "cpu")[0], clone_all(states, "cpu")
        before = [p.detach().cpu().float().clone() for p in params]
        one_step(algo, False, ref_params, grads, ref_states, hyper, seeds)
        one_step(algo, True, params, [g.to(DEVICE) for g in grads], states, hyper_dev, seeds)
        for a, b, p in zip(ref_params, params, before):
            assert ((b.cpu().float() - a.float()).abs() <= within_an_ulp(a, p, dtype)).all()
        for k in range(n):
            for a, b in zip(ref_states[k], states[k]):
                view = torch.uint8 if algo == "adamw" and k == 1 else torch.int8
                d = (b.cpu().view(view).int() - a.view(view).int()).abs()
                assert d.max() <= 1
                codes_total += d.numel()
                codes_equal += int((d == 0).sum())
            for a, b in zip(ref_states[n + k], states[n + k]):
                torch.testing.assert_close(b.cpu(), a, rtol=2.5e-7, atol=0)
    assert codes_equal >= 0.995 * codes_total


# ----- the 8-bit kernels in the optimizers: the path, launches, GradScaler ---------------

@pytest.mark.parametrize("algo", ["adamw", "lion"])
def test_8bit_steps_take_the_triton_kernel_in_one_launch(algo, monkeypatch, ieee_sqrt):
    """AdamW8bit/Lion8bit with fused kernels send every 8-bit tensor of a group to the Triton
    kernel, in one launch per dtype, with each tensor's rounding seed; the result is the
    reference optimizer's, bit for bit (stochastic rounding of bf16 parameters included)."""
    calls, launches = [], []
    function, kernel = getattr(FT, KERNELS[algo]), getattr(FT, f"_{KERNELS[algo]}_kernel")

    def spy(*lists, **hyper):
        calls.append((len(lists[0]), hyper.get("rounding_seeds")))
        return function(*lists, **hyper)

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(FT, KERNELS[algo], spy)
    monkeypatch.setattr(FT, f"_{KERNELS[algo]}_kernel", Counting())
    shapes = [(3, 100), (5, 300), (2, 3, 70), (2, 512)]
    params = [torch.nn.Parameter(p) for p in make_params(shapes, torch.bfloat16, seed=6, device=DEVICE)]
    params.append(torch.nn.Parameter(torch.randn(3, 40, device=DEVICE)))  # float32: its own launch
    twins = [torch.nn.Parameter(p.detach().cpu().clone()) for p in params]
    kw = dict(lr=1e-2, weight_decay=0.1, min_8bit_size=1, stochastic_rounding=True, seed=3)
    opt = CLASSES[algo](params, fused=True, **kw)
    ref = CLASSES[algo](twins, foreach=False, fused=False, **kw)
    gen = torch.Generator().manual_seed(7)
    for step in range(3):
        for p, q in zip(params, twins):
            q.grad = torch.randn(q.shape, generator=gen).to(q.dtype)
            p.grad = q.grad.to(DEVICE)
        opt.step()
        ref.step()
        assert len(calls) == step + 1 and calls[-1][0] == len(params) and len(calls[-1][1]) == len(params)
        assert len(launches) == 2 * (step + 1)  # bf16 and float32
        for p, q in zip(params, twins):
            assert_bits_equal(p, q, f"step {step}")
            for key, v in ref.state[q].items():
                assert_bits_equal(opt.state[p][key], v, f"step {step}: {key}")
    assert calls[0][1] != calls[1][1]  # new seeds every step


@pytest.mark.parametrize("algo", ["adamw", "lion"])
def test_8bit_gradscaler_skip_changes_nothing_and_scale_divides(algo, ieee_sqrt):
    """found_inf != 0: nothing changes (codes, scales, parameters, step counts); grad_scale: the
    gradient is divided by it in the kernel."""
    params = [torch.nn.Parameter(p) for p in make_params([(3, 100), (2, 300)], torch.float32, 8, DEVICE)]
    twins = [torch.nn.Parameter(p.detach().cpu().clone()) for p in params]
    opt = CLASSES[algo](params, fused=True, min_8bit_size=1, weight_decay=0.1)
    ref = CLASSES[algo](twins, foreach=False, fused=False, min_8bit_size=1, weight_decay=0.1)
    for p, q in zip(params, twins):
        q.grad = torch.randn(q.shape)
        p.grad = q.grad.to(DEVICE)
    opt.step()
    ref.step()
    opt.grad_scale = torch.tensor(1024.0, device=DEVICE)
    opt.found_inf = torch.tensor(1.0, device=DEVICE)
    for p in params:
        p.grad = torch.full_like(p, math.nan)
    before = snapshot(opt)
    opt.step()
    assert_unchanged(opt, before)
    opt.found_inf = torch.tensor(0.0, device=DEVICE)
    for p, q in zip(params, twins):
        q.grad = torch.randn(q.shape)
        p.grad = q.grad.to(DEVICE) * 1024.0
    opt.step()
    ref.step()
    del opt.grad_scale, opt.found_inf
    for p, q in zip(params, twins):
        assert_bits_equal(p, q, "params")
        for key, v in ref.state[q].items():
            assert_bits_equal(opt.state[p][key], v, key)


# ----- stochastic rounding ---------------------------------------------------------------

@triton.jit
def _round_probe(x_ptr, out_ptr, seed_ptr, n, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    FT._round_stochastic(out_ptr, offs, mask, x, tl.load(seed_ptr).to(tl.uint32), DTYPE)


def edge_values(dtype):
    """float32 values around everything a rounding can meet in ``dtype``."""
    info = torch.finfo(dtype)
    specials = [0.0, -0.0, math.inf, -math.inf, math.nan, info.max, -info.max, info.tiny, info.smallest_normal / 3,
                2 * info.max, 3e38, -3.3e38, 1.0, -1.0, 1 + info.eps / 2, 65504.0, 65519.0, 65520.0, 70000.0,
                -65519.9, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 1e-40, -1e-45]
    gen = torch.Generator().manual_seed(0)
    randoms = torch.randn(3000, generator=gen) * torch.exp(8 * torch.randn(3000, generator=gen))
    top = info.max * (1 - torch.rand(200, generator=gen) * 0.01)
    return torch.cat([torch.tensor(specials, dtype=torch.float32), randoms, top.float(), -top.float()])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_stochastic_rounding_is_round_stochastic_bit_for_bit(dtype):
    """The kernels' rounding on values around zero, subnormals, the largest finite values,
    infinities and NaN, and on random ones, against _rounding.round_stochastic."""
    x = edge_values(dtype)
    for seed in (0, 0xDEADBEEF, 12345):
        out = torch.empty(x.shape, dtype=dtype, device=DEVICE)
        _round_probe[(triton.cdiv(x.numel(), 1024),)](x.to(DEVICE), out, torch.tensor([seed], device=DEVICE),
                                                      x.numel(), DTYPE=FT.TL[dtype], BLOCK=1024)
        assert_bits_equal(out.cpu(), _rounding.round_stochastic(x, dtype, seed), f"seed {seed}")


@pytest.mark.parametrize("name", ["adamw", "lion"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_float_kernels_round_their_float32_result_stochastically(name, dtype):
    """A bf16/fp16 parameter with a seed is _rounding.round_stochastic of the very float32 value the
    kernel computes (that of a float32 twin): element indices run across the kernel's blocks."""
    sizes = [(2 * FT.BLOCK + 5,), (5, 7), (1,)]
    params = make_params(sizes, dtype, seed=10, device=DEVICE)
    twins = [p.float() for p in params]
    gen = torch.Generator().manual_seed(11)
    grads = [torch.randn(p.shape, generator=gen).to(dtype).to(DEVICE) for p in params]
    n_states = 2 if name == "adamw" else 1
    states = [[torch.randn(p.shape, generator=gen).abs().to(DEVICE) for p in params] for _ in range(n_states)]
    twin_states = clone_all(states)
    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1, maximize=False)
    if name == "adamw":
        hyper.update(eps=1e-8, correct_bias=True)
        steps = [[torch.tensor(3.0, device=DEVICE) for _ in params]]
        states, twin_states = states + steps, twin_states + clone_all(steps)
    seeds = _rounding.rounding_seeds(1, 4, len(params))
    getattr(FT, name)(twins, [g.float() for g in grads], *twin_states, **hyper)
    getattr(FT, name)(params, grads, *states, **hyper, rounding_seeds=seeds)
    moved = 0
    for p, f, s in zip(params, twins, seeds):
        assert_bits_equal(p.cpu(), _rounding.round_stochastic(f.cpu(), dtype, s), "params")
        moved += int((p.cpu() != f.cpu().to(dtype)).sum())
    assert moved > 0  # not all to nearest


@pytest.mark.parametrize("cls", [AdamW, Lion], ids=["AdamW", "Lion"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_float_kernels_round_stochastically_as_the_reference_every_step(cls, dtype, monkeypatch):
    """``stochastic_rounding=True`` sends bf16/fp16 parameters to the Triton kernels with their
    seeds; at each of 10 steps the parameters are the reference's, but where the float32 updates
    differ by their last bit (the kernels' lerp and sqrt round differently from torch's CPU ones)
    and that crosses a rounding threshold: one gap of the dtype per step at most, and rarely."""
    calls = []
    function = getattr(FT, cls.backends.triton)

    def spy(*lists, **hyper):
        calls.append(hyper.get("rounding_seeds"))
        return function(*lists, **hyper)

    monkeypatch.setattr(FT, cls.backends.triton, spy)
    params = [torch.nn.Parameter(p) for p in make_params([(3000,), (5, 7)], dtype, seed=12, device=DEVICE)]
    twins = [torch.nn.Parameter(p.detach().cpu().clone()) for p in params]
    opt = cls(params, lr=1e-3, weight_decay=0.1, fused=True, stochastic_rounding=True, seed=5)
    ref = cls(twins, lr=1e-3, weight_decay=0.1, foreach=False, fused=False, stochastic_rounding=True, seed=5)
    gen = torch.Generator().manual_seed(13)
    differ = total = 0
    for step in range(1, 11):
        for p, q in zip(params, twins):
            q.grad = torch.randn(q.shape, generator=gen).to(dtype)
            p.grad = q.grad.to(DEVICE)
        opt.step()
        ref.step()
        assert len(calls) == step and calls[-1] is not None and len(calls[-1]) == len(params)
        for p, q in zip(params, twins):
            d = (p.detach().cpu().float() - q.detach().float()).abs()
            assert (d <= step * ulp(q, dtype)).all()
            differ += int((d > 0).sum())
            total += d.numel()
    assert differ <= 0.01 * total


def test_stochastic_rounding_of_a_non_contiguous_parameter_as_the_reference():
    """A transposed bf16 parameter (its gradient and states transposed alike: one dense layout, which
    the float kernels take) rounds as the reference does, elements in their logical order."""
    base = make_params([(40, 30)], torch.bfloat16, seed=17, device=DEVICE)[0]
    p, q = torch.nn.Parameter(base.clone().t()), torch.nn.Parameter(base.cpu().clone().t())
    opt = Lion([p], lr=1e-3, fused=True, stochastic_rounding=True)
    ref = Lion([q], lr=1e-3, foreach=False, fused=False, stochastic_rounding=True)
    g = torch.randn(40, 30, generator=torch.Generator().manual_seed(18)).to(torch.bfloat16).t()
    p.grad, q.grad = g.to(DEVICE), g.clone()
    opt.step()
    ref.step()
    assert_bits_equal(p, q, "params")


# ----- compiled for a GPU (no GPU needed) ------------------------------------------------

COMPILE = r"""
import inspect, json, re, sys
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

def build(kernel, constexprs, types, num_warps, fusion=True):
    names = list(inspect.signature(kernel.fn).parameters)
    signature = {n: "constexpr" if n in constexprs else types.get(n, "fp32") for n in names}
    return triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                          target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "enable_fp_fusion": fusion})

@triton.jit
def _probe(x):
    tl.store(x, 1.0)

try:  # a Triton without its CUDA compiler backend cannot compile anything: skip
    build(_probe, {}, {"x": "*fp32"}, 4)
except Exception as err:
    print("SKIP", type(err).__name__, err)
    sys.exit(0)

from optimizer import _fused_triton as FT

types = {"table": "*i64", "blocks": "*i64", "log_betas": "*fp64", "lr_ptr": "*fp32", "grad_scale_ptr": "*fp32",
         "found_inf_ptr": "*fp32", "seeds_ptr": "*i64", "lr_value": "fp64", "weight_decay": "fp64"}
optional = {"lr_ptr": "LR_TENSOR", "grad_scale_ptr": "SCALED", "found_inf_ptr": "SKIPPABLE", "seeds_ptr": "ROUND"}
out = {}
for name in ("_adamw8bit_kernel", "_lion8bit_kernel"):
    kernel = getattr(FT, name)
    for P, on in ((tl.float32, False), (tl.bfloat16, True), (tl.float16, True)):
        if True:
            flags = dict(LR_TENSOR=on, SCALED=on, SKIPPABLE=on, ROUND=on, MAXIMIZE=on)
            c = dict(P=P, QBLOCK=256, PER_PROGRAM=FT.PER_PROGRAM, **flags)
            if "CORRECT_BIAS" in inspect.signature(kernel.fn).parameters:
                c["CORRECT_BIAS"] = not on
            c.update({ptr: None for ptr, flag in optional.items() if not c[flag]})
            ptx = build(kernel, c, types, FT.NUM_WARPS_8BIT, fusion=False).asm["ptx"]  # as launched
            out[f"{name} {P} {on}"] = [len(re.findall(r"ld\.global(\.\w+)*\.v4\.b32", ptx)),
                                       len(re.findall(r"fma\.rn\.f32", ptx))]
for name, P, streams in (("_adamw_kernel", tl.bfloat16, 4), ("_lion_kernel", tl.float16, 3)):
    kernel = getattr(FT, name)
    if True:
        c = dict(lr_ptr=None, grad_scale_ptr=None, found_inf_ptr=None, P=P, S=tl.float32, BLOCK=FT.BLOCK,
                 LR_TENSOR=False, SCALED=False, SKIPPABLE=False, MAXIMIZE=False, ALIGNED=(1 << streams) - 1,
                 ROUND=True)
        if "CORRECT_BIAS" in inspect.signature(kernel.fn).parameters:
            c["CORRECT_BIAS"] = True
        ptx = build(kernel, c, {k: v for k, v in types.items() if v != "fp64"}, FT.NUM_WARPS).asm["ptx"]
        out[f"{name} {P} round"] = [len(re.findall(r"st\.global(\.\w+)*\.v4", ptx))]
print(json.dumps(out))
"""


def test_kernels_compile_for_a_gpu(tmp_path):
    """Compiled for an H100 (sm_90; Triton's own compiler in a process without the interpreter,
    no GPU needed): every variant of the 8-bit kernels and the rounding float kernels compiles;
    the aligned tensors' blocks load the parameter and gradient as 16-byte vectors, and those whose
    gradient alone is off a 16-byte boundary (a DDP bucket view) the parameter (Note [alignment]);
    the only fused multiply-adds are the reference's (AdamW: lerp and addcmul, Lion: two lerps;
    each lerp in its two branches; the compiler keeps two copies of the math that the three forms
    of an update share); the rounding float kernels store the rounded parameter and the float32
    states as 16-byte vectors."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = tmp_path / "compile_kernels.py"  # a file: Triton reads @jit functions' source from theirs
    script.write_text(COMPILE)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr[-5000:]
    if done.stdout.startswith("SKIP"):
        pytest.skip(done.stdout.strip())
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    per_thread = FT.PER_PROGRAM * _8bit.BLOCK // (32 * FT.NUM_WARPS_8BIT)  # values a thread
    for key, value in counts.items():
        vectors = per_thread * (4 if "fp32" in key else 2) // 16  # 16-byte vectors a thread, a stream of p's dtype
        if key.startswith("_adamw8bit"):
            assert value[0] == 3 * vectors, (key, value)  # p and g (all aligned), p (all but the gradient)
            assert value[1] == 2 * 3 * per_thread, (key, value)   # 2 copies x (lerp (2 branches) + addcmul)
        elif key.startswith("_lion8bit"):
            assert value[0] == 3 * vectors, (key, value)
            assert value[1] == 2 * 4 * per_thread, (key, value)   # 2 copies x two lerps (2 branches each)
        else:  # a bf16/fp16 parameter's vectors, then the float32 states' (AdamW 2, Lion 1)
            n_states = 2 if key.startswith("_adamw") else 1
            assert value[0] == FT.BLOCK // (32 * FT.NUM_WARPS) * (2 + 4 * n_states) // 16, (key, value)


# ----- on a GPU --------------------------------------------------------------------------

@gpu
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[5], CASES[6]], ids=case_id)
def test_cuda_8bit_kernel_near_torchs_cuda_reference_every_step(case):
    """Against the reference run by torch on the same GPU, which divides by a scalar as a
    multiplication by its reciprocal (r / sqrt(1 - beta2^t); the codes' quotients divide two
    tensors, which it rounds as IEEE's division): at
    each of 10 steps, from the same states, codes within 1, scales and parameters within an ulp."""
    algo, dtype, sr, hyper, hyper_dev = setup_case(case, "cuda")
    params = make_params(SHAPES, dtype, seed=14, device="cuda")
    states = new_states(algo, params)
    gen = torch.Generator().manual_seed(15)
    n = 2 if algo == "adamw" else 1
    for step in range(10):
        grads = make_grads(params, gen, "cuda")
        seeds = _rounding.rounding_seeds(2, step, len(params)) if sr else None
        ref_params, ref_states = clone_all([params])[0], clone_all(states)
        before = [p.detach().float().clone() for p in params]
        one_step(algo, False, ref_params, grads, ref_states, hyper_dev, seeds)
        one_step(algo, True, params, grads, states, hyper_dev, seeds)
        for a, b, p in zip(ref_params, params, before):
            assert ((b.float() - a.float()).abs() <= within_an_ulp(a, p, dtype)).all()
        for k in range(n):
            view = torch.uint8 if algo == "adamw" and k == 1 else torch.int8
            for a, b in zip(ref_states[k], states[k]):
                assert (b.view(view).int() - a.view(view).int()).abs().max() <= 1
            for a, b in zip(ref_states[n + k], states[n + k]):
                torch.testing.assert_close(b, a, rtol=2.5e-7, atol=0)


@gpu
@pytest.mark.parametrize("algo", ["adamw", "lion"])
def test_cuda_8bit_step_with_stochastic_rounding_never_syncs(algo):
    """No host synchronisation in an 8-bit step with stochastic rounding and GradScaler's
    tensors: the tables are cached, the seeds copied from pinned memory without a sync."""
    params = [torch.nn.Parameter(p) for p in make_params([(64, 300), (128, 256)], torch.bfloat16, 16, "cuda")]
    opt = CLASSES[algo](params, lr=torch.tensor(1e-3, device="cuda"), stochastic_rounding=True, min_8bit_size=1)
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
