"""The C loops of 8-bit states and stochastic rounding (optimizer/_fused_cpu.py): 8-bit states (Note [8-bit states],
csrc/8bit_loop.c) and stochastic rounding (Note [stochastic rounding]) against the plain-torch
references, bit for bit at every step; and their pieces of C (the codes, the rounding) against
optimizer/_8bit.py value by value, edge cases included.

Bit for bit, where torch's float32 ``sqrt`` is correctly rounded: torch's CPU ``sqrt`` is MKL's
vector math here (``VML_HA``, measured up to 0.75 ulp off on an AMD EPYC, differently on other
CPUs), which no C loop can reproduce. The tests that compare bits swap torch's float32 CPU ``sqrt``
for a correctly rounded one (``exact_sqrt``); ``test_with_torchs_own_sqrt_the_difference_is_a_rounding``
bounds what torch's own ``sqrt`` changes."""

from __future__ import annotations

import ctypes
import dataclasses
import math
import shutil
import subprocess

import numpy as np
import pytest
import torch

from optimizer import AdamW, Lion, _8bit, _dispatch, _fused_cpu, _rounding

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")

ALGOS = {"adamw": AdamW, "lion": Lion}
# rows x cols: rows shorter than a block, a row of two blocks and a tail, whole blocks, 3-d
SHAPES = [(64, 100), (33, 515), (7, 256, 3), (5, 1000)]


def _sqrt(orig):
    def sqrt(x, *args, **kwargs):
        if isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.device.type == "cpu" and not args \
                and not kwargs:  # numpy's float32 sqrt is the hardware's: correctly rounded
            return torch.from_numpy(np.sqrt(x.detach().contiguous().numpy())).reshape(x.shape)
        return orig(x, *args, **kwargs)
    return sqrt


@pytest.fixture
def exact_sqrt(monkeypatch):
    """torch's float32 CPU sqrt, correctly rounded (as IEEE and the C loops' sqrtf)."""
    monkeypatch.setattr(torch, "sqrt", _sqrt(torch.sqrt))
    monkeypatch.setattr(torch.Tensor, "sqrt", _sqrt(torch.Tensor.sqrt))


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bits, where any NaN equals any NaN (NaN payloads differ between torch's own kernels)."""
    a, b = a.detach(), b.detach()
    if not a.is_floating_point():
        return torch.equal(a, b)
    return bool(((a == b) & (torch.signbit(a) == torch.signbit(b)) | (a.isnan() & b.isnan())).all())


def make(shapes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def grads_of(params, gen, step, nan_step=None):
    out = []
    for j, p in enumerate(params):
        g = torch.randn(p.shape, generator=gen) * (0.1 if j % 2 else 1.0)
        if step == nan_step and j == 1:  # one NaN, in the tail block of row 1: that value's states become NaN
            g.view(-1)[515 + 513] = math.nan
        if nan_step is not None and step >= nan_step and j == 2:  # g^2 overflows, then the momentum (g - m)
            g.view(-1)[7] = 3.4e38 * (-1) ** step
        out.append(g.to(p.dtype))
    return out


def run_pair(algo, dtype, steps=20, shapes=SHAPES, nan_step=None, check=None, **kw):
    """The reference and the fused C path side by side from the same start, compared after
    every step: parameters, codes and scales, bit for bit."""
    cls = ALGOS[algo]
    kw = {"lr": 1e-2 if algo == "adamw" else 1e-3, **kw}
    ref_p = make(shapes, dtype)
    new_p = [torch.nn.Parameter(p.detach().clone()) for p in ref_p]
    ref = cls(ref_p, foreach=False, fused=False, **kw)
    new = cls(new_p, fused=True, **kw)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        for p, q, g in zip(ref_p, new_p, grads_of(ref_p, gen, step, nan_step)):
            p.grad, q.grad = g, g.clone()
        ref.step()
        new.step()
        for i, (p, q) in enumerate(zip(ref_p, new_p)):
            assert same(p, q), (step, i, (p.float() - q.float()).abs().max())
            for key, value in ref.state[p].items():
                assert same(value, new.state[q][key]), (step, i, key)
        if check is not None:
            check(step, new, new_p)
    return ref, new, ref_p, new_p


# ----- 8-bit states -----------------------------------------------------------------------

CONFIGS = {
    "adamw": [dict(weight_decay=0.1), dict(maximize=True, correct_bias=False, weight_decay=0.0),
              dict(betas=(0.5, 0.3), eps=1e-3)],
    "lion": [dict(weight_decay=0.1), dict(maximize=True, betas=(0.6, 0.7)), dict(weight_decay=0.0)],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("algo,config", [(a, c) for a, cs in CONFIGS.items() for c in range(len(cs))],
                         ids=[f"{a}-{c}" for a, cs in CONFIGS.items() for c in range(len(cs))])
def test_8bit_c_loop_matches_the_reference_every_step(algo, config, dtype, exact_sqrt):
    kw = dict(CONFIGS[algo][config], state_dtype=torch.uint8, min_8bit_size=1)

    def nan_stays_in_its_element(step, opt, params):  # its block (row 1, block 2) is special, the rest finite
        if step >= 5:
            state = opt.state[params[1]]
            scales = state["exp_avg_scale"]
            assert torch.signbit(scales[1, 2]) and torch.signbit(scales).sum() == 1
            m = _8bit.decode_signed(state["exp_avg"].view(torch.int8).reshape(33, 515), scales)
            assert m.isnan().nonzero().tolist() == [[1, 513]] and m.isinf().sum() == 0
            assert (~params[1].isfinite()).sum() <= 1
            state = opt.state[params[2]]  # (7, 768): the overflows at value 7, in row 0's first block
            m = _8bit.decode_signed(state["exp_avg"].view(torch.int8).reshape(7, 768), state["exp_avg_scale"])
            assert (~m.isfinite()).nonzero().tolist() in ([[[0, 7]]] if step > 5 else [[], [[0, 7]]])  # (bf16: inf)
            assert (~params[2].isfinite()).nonzero().tolist() in ([], [[0, 2, 1]])
    run_pair(algo, dtype, steps=20, nan_step=5, check=nan_stays_in_its_element, **kw)


def test_8bit_fp16_params_match_the_reference(exact_sqrt):
    for algo in ALGOS:
        run_pair(algo, torch.float16, steps=8, state_dtype=torch.uint8, min_8bit_size=1, weight_decay=0.1)


def test_8bit_large_step_counts_and_tensor_lr(exact_sqrt):
    """Bias corrections near 1, a tensor learning rate, several groups of one step."""
    ref_p = make(SHAPES, torch.float32)
    new_p = [torch.nn.Parameter(p.detach().clone()) for p in ref_p]

    def groups(ps):
        return [{"params": ps[:2], "lr": torch.tensor(3e-3)}, {"params": ps[2:], "weight_decay": 0.5}]
    ref = AdamW(groups(ref_p), state_dtype=torch.uint8, min_8bit_size=1, foreach=False, fused=False)
    new = AdamW(groups(new_p), state_dtype=torch.uint8, min_8bit_size=1, fused=True)
    gen = torch.Generator().manual_seed(3)
    for step in range(4):
        for p, q, g in zip(ref_p, new_p, grads_of(ref_p, gen, step)):
            p.grad, q.grad = g, g.clone()
        if step == 1:  # jump the counters: t = 5001, 5002
            for opt, ps in ((ref, ref_p), (new, new_p)):
                for p in ps:
                    opt.state[p]["step"].fill_(5000.0)
        ref.step()
        new.step()
        for p, q in zip(ref_p, new_p):
            assert same(p, q)
            for key, value in ref.state[p].items():
                assert same(value, new.state[q][key]), key


def _refuse(*args, **kwargs):
    raise AssertionError("the reference ran: the C loop was not taken")


@pytest.mark.parametrize("algo", ALGOS)
def test_8bit_fused_step_takes_the_c_loop(algo, monkeypatch):
    cls = ALGOS[algo]
    backends = cls.backends_8bit
    assert backends.c is not None and backends.c_kernel is not None and backends.c_kernel.codes
    params = make([(33, 515)], torch.bfloat16)
    params[0].grad = torch.randn(33, 515).to(torch.bfloat16)
    lists = [params, [params[0].grad]] + [[torch.zeros(33, 515, dtype=torch.uint8)]] * len(backends.c_kernel.states) \
        + [[_8bit.new_scales(params[0])]] * len(backends.c_kernel.states) \
        + [[torch.zeros(())]] * (len(backends.names) - 2 - 2 * len(backends.c_kernel.states))
    assert _dispatch.route(backends, lists, {"rounding_seeds": [7]}, foreach=None, fused=True) == {"c": [0]}
    refusing = dataclasses.replace(backends, reference=_refuse, foreach=_refuse)
    monkeypatch.setattr(cls, "backends_8bit", refusing)
    before = params[0].detach().clone()
    opt = cls(params, state_dtype=torch.uint8, min_8bit_size=1, stochastic_rounding=True)
    opt.step()
    assert not torch.equal(params[0].detach(), before)
    assert opt.state[params[0]]["exp_avg"].any()


@pytest.mark.parametrize("algo", ALGOS)
def test_with_torchs_own_sqrt_the_difference_is_a_rounding(algo):
    """From the same state, one step of the reference with torch's own sqrt and one of the C loop
    differ at most by a code on a rounding boundary, and (AdamW) by about one float32 rounding
    of r, its scale and the update."""
    cls = ALGOS[algo]
    kw = dict(state_dtype=torch.uint8, min_8bit_size=1, weight_decay=0.1)
    new_p = make(SHAPES, torch.float32)
    new = cls(new_p, fused=True, **kw)
    gen = torch.Generator().manual_seed(5)
    codes_off = values = 0
    for step in range(12):
        ref_p = [torch.nn.Parameter(p.detach().clone()) for p in new_p]
        ref = cls(ref_p, foreach=False, fused=False, **kw)
        if step:
            ref.load_state_dict(new.state_dict())
        for p, q, g in zip(ref_p, new_p, grads_of(ref_p, gen, step)):
            p.grad, q.grad = g, g.clone()
        ref.step()
        new.step()
        for p, q in zip(ref_p, new_p):
            torch.testing.assert_close(q, p, rtol=2e-6, atol=1e-9)
            for key, value in ref.state[p].items():
                mine = new.state[q][key]
                if key.endswith("_scale"):
                    torch.testing.assert_close(mine, value, rtol=2.4e-7, atol=0)
                elif key != "step":
                    signed = key == "exp_avg"
                    a = value.view(torch.int8).int() if signed else value.int()
                    b = mine.view(torch.int8).int() if signed else mine.int()
                    assert (a - b).abs().max() <= 1
                    codes_off += int((a != b).sum())
                    values += a.numel()
    assert codes_off <= values * 1e-3  # rare


def test_8bit_step_counters_are_counted_in_c():
    """The 8-bit kernel's library also counts AdamW's steps (Note [step counters])."""
    p = make([(64, 100)], torch.float32)[0]
    p.grad = torch.ones_like(p)
    opt = AdamW([p], state_dtype=torch.uint8, min_8bit_size=1, fused=True)
    opt.step()
    kernel = AdamW.backends_8bit.c_kernel
    assert ("count", torch.float32) in _fused_cpu.library(kernel, strict=True)
    assert _fused_cpu.count(kernel, [opt.state[p]["step"]]) and opt.state[p]["step"].item() == 2.0


# ----- stochastic rounding in the float C loop --------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("algo,kw", [
    ("adamw", dict(correct_bias=False, weight_decay=0.1)),         # the C loop (correct_bias: also)
    ("adamw", dict(state_dtype=torch.bfloat16, maximize=True)),
    ("adamw", dict(weight_decay=0.1)),
    ("lion", dict(weight_decay=0.1)),
    ("lion", dict(state_dtype=torch.bfloat16, maximize=True)),
], ids=["adamw-nobias", "adamw-bf16state", "adamw", "lion", "lion-bf16state"])
def test_stochastic_rounding_matches_the_reference_every_step(algo, kw, dtype, exact_sqrt):
    shapes = [(2 * _fused_cpu.BLOCK + 77,), (33, 515), (5,)]
    run_pair(algo, dtype, steps=20, shapes=shapes, stochastic_rounding=True, seed=11, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("algo,kw", [("adamw", dict(correct_bias=False, weight_decay=0.1)),
                                     ("lion", dict(weight_decay=0.1, maximize=True))], ids=["adamw", "lion"])
def test_float_c_loop_rounding_to_nearest_matches_the_reference_every_step(algo, kw, dtype, exact_sqrt):
    """Without stochastic rounding too the float C loop is the reference bit for bit (lerp and
    addcmul are one fma each in torch's CPU kernels, and in the loop)."""
    run_pair(algo, dtype, steps=10, shapes=[(2 * _fused_cpu.BLOCK + 77,), (33, 515), (5,)], **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("algo", ALGOS)
def test_8bit_stochastic_rounding_matches_the_reference_every_step(algo, dtype, exact_sqrt):
    run_pair(algo, dtype, steps=20, stochastic_rounding=True, seed=3, state_dtype=torch.uint8, min_8bit_size=1,
             weight_decay=0.1)


@pytest.mark.parametrize("algo", ALGOS)
def test_stochastic_rounding_is_taken_and_rounds(algo, monkeypatch):
    """bf16 parameters with stochastic rounding go to the C loop (not the reference), and
    updates far below half a bf16 ulp move the parameters on average."""
    cls = ALGOS[algo]
    params = [torch.nn.Parameter(torch.ones(3 * _fused_cpu.BLOCK + 5, dtype=torch.bfloat16))]
    refusing = dataclasses.replace(cls.backends, reference=_refuse, foreach=_refuse)
    monkeypatch.setattr(cls, "backends", refusing)
    lr = 1e-4  # 1 - lr is 1.0 in bf16: round to nearest never moves
    opt = cls(params, lr=lr, betas=(0.0, 0.0), stochastic_rounding=True,
              fused=True, weight_decay=0.0, **({"correct_bias": False} if algo == "adamw" else {}))
    steps = 40
    for _ in range(steps):
        params[0].grad = torch.ones_like(params[0])
        opt.step()
    moved = 1.0 - params[0].detach().float().mean().item()
    assert 0.5 * steps * lr < moved < 1.5 * steps * lr  # about lr per step on average


# ----- the pieces of C, value by value --------------------------------------------------------------

HARNESS = r"""
void t_encode_signed(const float *x, int n, uint8_t *codes, float *scale) {
    encode_signed(x, n, codes, scale, block_top(x, n));
}
void t_encode_root(const float *x, int n, uint8_t *codes, float *scale, uint32_t seed) {
    encode_root(x, n, codes, scale, block_top(x, n), seed);
}
void t_decode_signed(const uint8_t *c, int n, float scale, float *out) {
    decode_signed_block(c, n, out, scale);
}
void t_decode_root(const uint8_t *c, int n, float scale, float *out) {
    decode_root_block(c, n, out, scale);
}
void t_round_bf16(const float *x, int64_t n, uint32_t seed, bf16 *out) {
    for (int64_t i = 0; i < n; i++) out[i] = store_sr_bf16(x[i], random16(i, seed));
}
#ifdef HAVE_F16
void t_round_f16(const float *x, int64_t n, uint32_t seed, f16 *out) {
    for (int64_t i = 0; i < n; i++) out[i] = store_sr_f16(x[i], random16(i, seed));
}
#endif
void t_quotient(const float *x, const float *d, int n, float *out) {
    for (int i = 0; i < n; i++) out[i] = quotient(x[i], d[i], 1.0f / d[i]);
}
"""


@pytest.fixture(scope="module", params=[["-march=native"], []], ids=["native", "generic"])
def helpers(request, tmp_path_factory):
    """csrc's preludes and a few wrappers, compiled as the kernels are (with and without
    -march=native: with and without a fast fma)."""
    tmp = tmp_path_factory.mktemp("helpers")
    csrc = _fused_cpu._CSRC
    src = tmp / "helpers.c"
    src.write_text((csrc / "fused_prelude.h").read_text() + (csrc / "8bit_prelude.h").read_text() + HARNESS)
    lib = tmp / "helpers.so"
    cmd = ["cc", *_fused_cpu._CFLAGS, *request.param, "-Wall", "-Wextra", "-Werror", str(src), "-o", str(lib)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return ctypes.CDLL(str(lib))


def ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def special_blocks() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    blocks = [torch.randn(256, generator=g), torch.randn(100, generator=g) * 1e-3, torch.zeros(256),
              torch.randn(256, generator=g) * 1e-39, torch.randn(256, generator=g) * 3e38,  # tiny and huge scales
              torch.randn(7, generator=g), torch.tensor([0.0, -0.0, 1.0, -1.0]),
              torch.tensor([1.0, math.inf, -2.0, 0.0]), torch.tensor([1.0, -math.inf, 3.0]),
              torch.tensor([1.0, math.nan, -2.0, 0.0]), torch.tensor([5e-45, -1e-45, 0.0]),
              # special blocks (Note [8-bit states]): every kind at once, nothing finite but zeros, nothing
              # finite at all, a tiny largest finite value (k overflows), the largest float beside inf
              torch.tensor([math.inf, -math.inf, math.nan, -math.nan, 0.3, -0.02, 0.0, -0.0, 1e-30]),
              torch.tensor([0.0, -0.0, math.inf]), torch.tensor([math.nan, math.inf, -math.inf]),
              torch.tensor([1e-38, -3e-39, math.inf, 1e-45]), torch.tensor([3.4028235e38, -1.0, math.inf]),
              # the largest float, above the largest scale (an ordinary block)
              torch.tensor([3.4028235e38, -3.4028235e38, 1.0, 3.4028233e38]),
              # values on the codes' rounding boundaries: (k + 0.5)^2 / L^2 of the scale, and neighbours
              torch.tensor([1.0] + [((k + 0.5) / 127) ** 2 for k in range(127)]),
              torch.tensor([1.0] + [((k + 0.5) / 255) ** 2 for k in range(255)])]
    near = blocks[-1]
    blocks.append(torch.nextafter(near, torch.full_like(near, 2.0)))
    blocks.append(torch.nextafter(near, torch.zeros_like(near)))
    blocks += [torch.rand(256, generator=g) ** 4 * s for s in (1.0, 7.3, 1e-30, 1e30)]
    return [b.to(torch.float32) for b in blocks]


@pytest.mark.parametrize("step", [1, 2, 1000])
def test_codes_match_the_reference_value_by_value(helpers, exact_sqrt, step):
    seed = _8bit.root_seed(step)  # the second moment's stochastic codes
    for x in special_blocks():
        n = x.numel()
        for signed, fn, ref in ((True, helpers.t_encode_signed, _8bit.encode_signed),
                                (False, lambda *a: helpers.t_encode_root(*a, ctypes.c_uint32(seed)),
                                 lambda r: _8bit.encode_root(r, seed))):
            x_in = x if signed else x.abs()  # r >= 0 (or NaN)
            codes, scale = torch.empty(n, dtype=torch.uint8), torch.empty(1)
            fn(ptr(x_in), n, ptr(codes), ptr(scale))
            ref_codes, ref_scale = ref(x_in.reshape(1, n))
            assert same(scale, ref_scale.reshape(1)), (x_in, scale, ref_scale)
            assert torch.equal(codes, ref_codes.view(torch.uint8).reshape(n)), (x_in[:8], codes[:8], ref_codes[0, :8])


def test_decoding_matches_the_reference_for_every_code(helpers):
    codes = torch.arange(256, dtype=torch.int64).to(torch.uint8)
    # negative: special blocks; the positive inf and nan scales of blocks written before special blocks
    for scale in (1.0, 0.3, 7.7e-30, 3.3e37, 0.0, math.inf, math.nan, -1.0, -0.3, -7.7e-30, -3.3e37, -0.0, -math.nan):
        s = torch.full((1, 1), scale)
        for fn, ref in ((helpers.t_decode_signed, lambda c: _8bit.decode_signed(c.view(torch.int8), s)),
                        (helpers.t_decode_root, lambda c: _8bit.decode_root(c, s))):
            out = torch.empty(256)
            fn(ptr(codes), 256, ctypes.c_float(scale), ptr(out))
            assert same(out, ref(codes.reshape(1, 256)).reshape(256)), scale


def test_quotient_is_the_division(helpers):
    """Markstein's correction (with a fast fma) rounds as the division does where its callers use it."""
    g = torch.Generator().manual_seed(0)
    n = 1 << 20
    d = (torch.rand(n, generator=g) + 0.5) * torch.exp2(torch.randint(-60, 60, (n,), generator=g).float())
    x = d * torch.rand(n, generator=g) * torch.exp2(torch.randint(-20, 2, (n,), generator=g).float())
    x[:256] = torch.arange(256).float()
    d[:128], d[128:256] = 127.0, 255.0
    x[256:260] = torch.tensor([math.inf, -math.inf, math.nan, 0.0])
    out = torch.empty(n)
    helpers.t_quotient(ptr(x), ptr(d), n, ptr(out))
    assert same(out, x / d)


def rounding_inputs(dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    info = torch.finfo(dtype)
    top, tiny = info.max, info.smallest_normal
    values = [torch.randn(4096, generator=g), torch.randn(512, generator=g) * tiny,  # subnormals of dtype
              torch.randn(512, generator=g) * 1e-44, torch.rand(512, generator=g) * top * 1.01,
              -torch.rand(512, generator=g) * top * 1.01,
              torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, top, -top, tiny, -tiny, 1.0, -1.0,
                            3.4028235e38, -3.4028235e38, 1e-45, -1e-45])]
    x = torch.cat(values).to(torch.float32)
    return torch.cat([x, torch.nextafter(x, torch.full_like(x, math.inf))])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_stochastic_rounding_matches_the_reference_value_by_value(helpers, dtype):
    fn = helpers.t_round_bf16 if dtype == torch.bfloat16 else getattr(helpers, "t_round_f16", None)
    if fn is None:
        pytest.skip("this C compiler has no _Float16")
    x = rounding_inputs(dtype)
    for seed in (0, 12345, 0xFFFFFFFF):
        out = torch.empty(x.numel(), dtype=dtype)
        fn(ptr(x), x.numel(), ctypes.c_uint32(seed), ptr(out))
        assert same(out, _rounding.round_stochastic(x, dtype, seed)), seed
    up = (out.float().abs() > x.abs()) & x.isfinite()
    assert 0.2 < up.float().mean() < 0.8  # both ways
