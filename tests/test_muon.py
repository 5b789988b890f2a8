"""Muon (optimizer/muon.py) alone: against torch.optim.Muon, against a float64 transcription of
its formulas (optim_table.py), its backends against each other, its AdamW groups against
AdamW, how a parameter is seen as matrices, its groups and their checks, checkpoints, failing
steps, torch.compile, 8-bit momentum, stochastic rounding, and create_optimizer's split of a
model. The generic contract runs it through its row of optim_table.py."""

from __future__ import annotations

import copy
import io
import math
import unittest.mock

import pytest
import torch
from helpers import assert_same_nested, assert_unchanged, snapshot, tiny_model
from optim_table import muon_scale, newton_schulz_formula
from torch._dynamo.utils import counters

from optimizer import AdamW, Muon, _8bit, _dispatch, _rounding
from optimizer.factory import ConfigError, create_optimizer, muon_labels
from optimizer.muon import CPU_NS_DTYPE, NS_COEFFICIENTS, _fast_bf16_matmul, muon, ns_dtype_of

REFERENCE, BATCHED = dict(foreach=False, fused=False), dict(foreach=True)
SHAPES = [(24, 16), (16, 24), (20, 20), (40, 8), (7, 1), (1, 7)]


def make(shapes, seed=0, dtype=torch.float32, twins=1):
    """``twins`` lists of parameters with the same values."""
    gen = torch.Generator().manual_seed(seed)
    values = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    return [[torch.nn.Parameter(v.clone()) for v in values] for _ in range(twins)]


def step_all(opts, lists, gen, scale=1.0):
    """The same random gradients for each list (of the first list's dtype), then a step of each optimizer."""
    grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64).mul_(scale).to(p.dtype) for p in lists[0]]
    for params in lists:
        for p, g in zip(params, grads):
            p.grad = g.to(p.dtype)
    for opt in opts:
        opt.step()


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ---------------------------------------------------------------------------
# the numbers
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", [REFERENCE, BATCHED], ids=["reference", "batched"])
@pytest.mark.parametrize("adjust_lr_fn", [None, "original", "match_rms_adamw"])
@pytest.mark.parametrize(("nesterov", "weight_decay"), [(True, 0.1), (False, 0.0), (False, 0.1)])
def test_bf16_steps_equal_torch_muon(backend, adjust_lr_fn, nesterov, weight_decay):
    """ns_dtype=torch.bfloat16: the reference is torch.optim.Muon bit for bit (the same operations
    in the same order); the batched path multiplies with bmm instead of mm, which gives the same
    bits for these sizes on this CPU (measured) but may round otherwise elsewhere (bmm and mm take
    other kernels for small products): it is held to 4 bf16 ulps of O a step."""
    ours, theirs = make(SHAPES * 2, twins=2)  # (two of each shape: batches of two)
    kw = dict(lr=0.02, weight_decay=weight_decay, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    opt = Muon(ours, ns_dtype=torch.bfloat16, **kw, **backend)
    ref = torch.optim.Muon(theirs, **kw)
    gen = torch.Generator().manual_seed(1)
    for step in range(1, 5):
        step_all([opt, ref], [ours, theirs], gen)
        for a, b in zip(ours, theirs):
            assert torch.equal(opt.state[a]["momentum_buffer"], ref.state[b]["momentum_buffer"])
            if backend is REFERENCE:
                assert torch.equal(a, b), step
            else:
                bound = step * 0.02 * muon_scale(adjust_lr_fn, *a.shape) * 2**-5  # 4 ulps of O (|O| < 2)
                torch.testing.assert_close(a, b, rtol=0, atol=bound)


def test_a_torch_muon_checkpoint_loads_and_continues_as_torch_muon():
    ours, theirs = make(SHAPES, twins=2)
    ref = torch.optim.Muon(theirs, lr=0.02)
    gen = torch.Generator().manual_seed(2)
    step_all([ref], [theirs], gen)
    opt = Muon(ours, ns_dtype=torch.bfloat16)
    for a, b in zip(ours, theirs):
        a.data.copy_(b.detach())
    opt.load_state_dict(roundtrip(ref.state_dict()))
    assert opt.param_groups[0]["lr"] == 0.02 and opt.param_groups[0]["use_muon"] is True
    for _ in range(3):
        step_all([opt, ref], [ours, theirs], gen)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def transcription_step(p, g, m, *, lr, weight_decay, momentum, nesterov, adjust_lr_fn, eps=1e-7, ns_steps=5):
    """One Muon step of a 2-D tensor in float64, written from the equations of Muon's docstring
    (the iteration is optim_table.newton_schulz_formula)."""
    m = momentum * m + (1 - momentum) * g
    u = g + momentum * (m - g) if nesterov else m
    o = newton_schulz_formula(u, coefficients=NS_COEFFICIENTS, steps=ns_steps, eps=eps)
    return p - lr * weight_decay * p - lr * muon_scale(adjust_lr_fn, *p.shape) * o, m


@pytest.mark.parametrize("adjust_lr_fn", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_float32_reference_matches_the_float64_transcription(adjust_lr_fn, nesterov):
    """ns_dtype=torch.float32: each step of the reference is the float64 transcription applied to
    the current values, to float32 rounding of O (measured: at most 4e-7 of O beyond the step's
    own rounding; held to 1e-5, times lr * scale); float64 parameters iterate in float64 and match
    to 1e-12."""
    kw = dict(lr=0.05, weight_decay=0.1, momentum=0.9, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    for dtype, ns_dtype, tol in ((torch.float32, torch.float32, 1e-5), (torch.float64, None, 1e-12)):
        (params,) = make(SHAPES, dtype=dtype)
        opt = Muon(params, ns_dtype=ns_dtype, **kw, **REFERENCE)
        gen = torch.Generator().manual_seed(3)
        for _ in range(4):
            before = [(p.detach().double().clone(), opt.state[p]["momentum_buffer"].double().clone() if opt.state[p]
                       else torch.zeros(p.shape, dtype=torch.float64)) for p in params]  # (copies: float64 aliases)
            step_all([opt], [params], gen)
            for p, (p0, m0) in zip(params, before):
                expected, m = transcription_step(p0, p.grad.double(), m0, **kw)
                bound = tol * kw["lr"] * muon_scale(adjust_lr_fn, *p.shape) + 4 * torch.finfo(dtype).eps * p0.abs()
                assert ((p.detach().double() - expected).abs() <= bound).all()
                torch.testing.assert_close(opt.state[p]["momentum_buffer"].double(), m, rtol=2e-7, atol=4e-7)


MIXED = [(24, 16), (16, 24), (24, 16), (3, 8, 5), (2, 8, 5), (6, 4, 3, 3), (12, 8)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ns_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nesterov", [True, False])
def test_batched_matches_the_reference_every_step(dtype, ns_dtype, nesterov):
    """Matrices of several shapes, stacks of them and a conv kernel, some of one shape in several
    tensors (a batch of 5 matrices of 8 x 5 from two stacks), a fused weight split in blocks.
    float32 iterations may round otherwise in bmm than in mm, by about 1e-6 of O (measured), held
    to 1e-5; bf16 ones are bit-equal for these sizes on this CPU (measured), held to 4 ulps of O."""
    ref_p, new_p = make(MIXED, dtype=dtype, twins=2)

    def groups(ps):
        return [{"params": ps[:-1]}, {"params": ps[-1:], "split": [4, 4, 4]}]

    kw = dict(lr=0.03, weight_decay=0.1, nesterov=nesterov, ns_dtype=ns_dtype)
    ref, new = Muon(groups(ref_p), **kw, **REFERENCE), Muon(groups(new_p), **kw, **BATCHED)
    gen = torch.Generator().manual_seed(4)
    for step in range(1, 6):
        step_all([ref, new], [ref_p, new_p], gen)
        for a, b in zip(ref_p, new_p):
            assert torch.equal(ref.state[a]["momentum_buffer"], new.state[b]["momentum_buffer"])
            if ns_dtype == torch.bfloat16 and dtype == torch.float32:
                torch.testing.assert_close(b, a, rtol=0, atol=step * 0.03 * 2 * 2**-5)
            elif dtype == torch.float32:
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
            else:  # bf16 parameters: a float32 difference may round to the neighbouring bf16 value
                torch.testing.assert_close(b, a, rtol=2**-7, atol=1e-5)


def test_the_iteration_approximates_the_orthogonal_factor():
    """What NS is for: 5 steps take the singular values of the normalised input from [6e-3, 0.8]
    to [0.68, 1.2] (not to 1: Muon's docstring), keeping u's singular vectors."""
    gen = torch.Generator().manual_seed(5)
    q1, _ = torch.linalg.qr(torch.randn(32, 32, generator=gen, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen, dtype=torch.float64))
    s = torch.logspace(-2, 0, 16, dtype=torch.float64)
    u = q1[:, :16] @ torch.diag(s) @ q2.T
    o = newton_schulz_formula(u, coefficients=NS_COEFFICIENTS, steps=5, eps=1e-7)
    values = torch.linalg.svdvals(o)
    assert 0.65 < values.min() and values.max() < 1.25
    polar = q1[:, :16] @ q2.T  # U V^T
    assert torch.linalg.matrix_norm(o - polar, 2) < 0.35


# ---------------------------------------------------------------------------
# matrices: stacks of experts, conv kernels, fused weights
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", [REFERENCE, BATCHED], ids=["reference", "batched"])
def test_a_stack_of_experts_is_its_matrices(backend):
    """[E, out, in]: each expert as its own 2-D parameter, bit for bit."""
    (stack,), = make([(3, 8, 5)])
    experts = [torch.nn.Parameter(e.detach().clone()) for e in stack]
    kw = dict(lr=0.02, weight_decay=0.1, ns_dtype=torch.float32, adjust_lr_fn="match_rms_adamw", **backend)
    a, b = Muon([stack], **kw), Muon(experts, **kw)
    gen = torch.Generator().manual_seed(6)
    for _ in range(3):
        g = torch.randn(3, 8, 5, generator=gen)
        stack.grad = g.clone()
        for e, ge in zip(experts, g):
            e.grad = ge.clone()
        a.step()
        b.step()
    assert torch.equal(stack.detach(), torch.stack([e.detach() for e in experts]))


@pytest.mark.parametrize("backend", [REFERENCE, BATCHED], ids=["reference", "batched"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "conv1d"])
def test_a_conv_kernel_is_one_flattened_matrix(backend, layout):
    """[out, in, kh, kw] is the matrix [out, in * kh * kw] (any memory layout); a Conv1d kernel
    [out, in, k] with flatten=True too."""
    shape = (6, 4, 5) if layout == "conv1d" else (6, 4, 3, 3)
    (kernel,), = make([shape])
    if layout == "channels_last":
        kernel.data = kernel.data.contiguous(memory_format=torch.channels_last)
    matrix = torch.nn.Parameter(kernel.detach().reshape(6, -1).clone())
    kw = dict(lr=0.02, ns_dtype=torch.float32, **backend)
    a, b = Muon([{"params": [kernel], "flatten": layout == "conv1d"}], **kw), Muon([matrix], **kw)
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        g = torch.randn(shape, generator=gen)
        kernel.grad, matrix.grad = g.clone(), g.reshape(6, -1).clone()
        a.step()
        b.step()
    assert torch.equal(kernel.detach().reshape(6, -1), matrix.detach())
    assert kernel.stride() == a.state[kernel]["momentum_buffer"].stride()


@pytest.mark.parametrize("backend", [REFERENCE, BATCHED], ids=["reference", "batched"])
@pytest.mark.parametrize("adjust_lr_fn", ["original", "match_rms_adamw"])
def test_a_fused_weight_split_in_rows_is_its_matrices(backend, adjust_lr_fn):
    """A QKV weight of rows [q, k, v] = [8, 4, 4] (grouped-query attention) with split=[8, 4, 4],
    and a stack of fused gate/up weights [E, 2h, d] with split=h: each block as its own parameter
    (own orthogonalisation, own lr scale), bit for bit."""
    qkv, gate_up = make([(16, 8), (2, 12, 5)])[0]
    blocks = [torch.nn.Parameter(x.clone()) for x in qkv.detach().split([8, 4, 4])]
    halves = [torch.nn.Parameter(x.clone()) for x in gate_up.detach().split(6, dim=1)]
    kw = dict(lr=0.02, ns_dtype=torch.float32, adjust_lr_fn=adjust_lr_fn, **backend)
    fused = Muon([{"params": [qkv], "split": [8, 4, 4]}, {"params": [gate_up], "split": 6}], **kw)
    apart = Muon(blocks + halves, **kw)
    gen = torch.Generator().manual_seed(8)
    for _ in range(3):
        g1, g2 = torch.randn(16, 8, generator=gen), torch.randn(2, 12, 5, generator=gen)
        qkv.grad, gate_up.grad = g1.clone(), g2.clone()
        for p, g in zip(blocks + halves, [*g1.split([8, 4, 4]), *g2.split(6, dim=1)]):
            p.grad = g.clone()
        fused.step()
        apart.step()
    assert torch.equal(qkv.detach(), torch.cat([b.detach() for b in blocks]))
    assert torch.equal(gate_up.detach(), torch.cat([h.detach() for h in halves], dim=1))


def test_empty_matrices_and_stacks_are_updated_as_nothing():
    params = [torch.nn.Parameter(torch.randn(s)) for s in ((0, 4), (4, 0), (0, 3, 2), (2, 0, 3))]
    for backend in (REFERENCE, BATCHED):
        opt = Muon(params, **backend)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        assert all(p.numel() == 0 for p in params)


# ---------------------------------------------------------------------------
# one optimizer, two algorithms
# ---------------------------------------------------------------------------

def split_model(model, **adamw_group):
    """tiny_model's Linear weights to Muon, the rest (the embedding, biases, the norm) to AdamW."""
    mats = [model[1].weight, model[4].weight]
    rest = [p for p in model.parameters() if all(p is not m for m in mats)]
    return [{"params": mats}, {"params": rest, "use_muon": False, **adamw_group}], rest


@pytest.mark.parametrize("backend", [dict(), REFERENCE, BATCHED, dict(fused=True)],
                         ids=["default", "reference", "foreach", "fused"])
@pytest.mark.parametrize("precision", [dict(), dict(state_dtype=torch.bfloat16), dict(state_dtype=torch.uint8),
                                       dict(stochastic_rounding=True, seed=3)],
                         ids=["fp32", "bf16-state", "8bit", "stochastic"])
def test_adamw_groups_are_adamw_bit_for_bit(backend, precision):
    """The use_muon=False groups are updated by AdamW's own backends (torch's fused kernel or the C
    loop by default on the CPU): the same results as optimizer.AdamW on the same tensors at the
    same places (a tensor's rounding stream is its place in the optimizer: Note [stochastic
    rounding]; the twin's matrices have no gradients, so AdamW leaves them alone)."""
    dtype = torch.bfloat16 if precision.get("stochastic_rounding") else torch.float32
    model, twin = tiny_model().to(dtype), tiny_model().to(dtype)
    groups, rest = split_model(model, lr=3e-3, weight_decay=0.05)
    (twin_mats, _), twin_rest = split_model(twin)
    kw = dict(min_8bit_size=8, **backend, **precision)  # (the embedding's 88 values: 8-bit states)
    opt = Muon(groups, lr=0.02, adamw_betas=(0.8, 0.95), adamw_eps=1e-6, **kw)
    ref = AdamW([twin_mats, {"params": twin_rest}], lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05, **kw)
    gen = torch.Generator().manual_seed(9)
    for _ in range(4):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        for p, q in zip(rest, twin_rest):
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    if precision.get("state_dtype") == torch.uint8:
        assert opt.state[model[0].weight]["exp_avg"].dtype == torch.uint8
    for p, q in zip(rest, twin_rest):
        assert torch.equal(p, q)
        assert_same_nested(opt.state[p], ref.state[q])


def test_groups_hold_their_algorithms_options_and_defaults():
    model = tiny_model()
    groups, _ = split_model(model)
    opt = Muon(groups, lr=0.02, weight_decay=0.05, adamw_lr=3e-3, adamw_betas=(0.9, 0.99), adamw_eps=1e-6)
    muon_group, adamw_group = opt.param_groups
    assert muon_group["use_muon"] is True and "betas" not in muon_group
    assert (muon_group["lr"], muon_group["weight_decay"], muon_group["eps"]) == (0.02, 0.05, 1e-7)
    assert adamw_group["use_muon"] is False and "momentum" not in adamw_group and "ns_steps" not in adamw_group
    assert (adamw_group["lr"], adamw_group["betas"], adamw_group["eps"], adamw_group["weight_decay"]) == (
        3e-3, (0.9, 0.99), 1e-6, 0.05)  # adamw_weight_decay: None, the Muon groups' value
    late = torch.nn.Parameter(torch.ones(3))
    opt.add_param_group({"params": [late], "use_muon": False, "lr": 1e-4})
    assert opt.param_groups[2]["betas"] == (0.9, 0.99) and opt.param_groups[2]["lr"] == 1e-4
    assert not any(k.startswith("adamw_") for g in opt.param_groups for k in g)


def test_a_weight_decay_of_zero_stays_zero():
    """Never `value or default`: 0 given is 0 kept, for either algorithm, here and in the factory."""
    groups, _ = split_model(tiny_model())
    opt = Muon(groups, weight_decay=0.0)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.0]
    groups, _ = split_model(tiny_model())
    opt = Muon(groups, weight_decay=0.1, adamw_weight_decay=0.0, adamw_lr=0.0)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert opt.param_groups[1]["lr"] == 0.0
    opt = create_optimizer(tiny_model(), "muon", weight_decay=0.0)
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups)
    opt = create_optimizer(tiny_model(), "muon", adamw_weight_decay=0.0)
    assert {g["group"]: g["weight_decay"] for g in opt.param_groups}["adamw_decay"] == 0.0


def test_a_plain_list_of_matrices_is_one_muon_group_as_in_torch():
    a, b = torch.nn.Parameter(torch.ones(3, 2)), torch.nn.Parameter(torch.ones(4, 4))
    opt = Muon([a, b])
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["use_muon"] is True
    assert opt.defaults["lr"] == 1e-3 and opt.defaults["weight_decay"] == 0.1 and opt.defaults["momentum"] == 0.95
    assert opt.defaults["nesterov"] is True and opt.defaults["ns_coefficients"] == (3.4445, -4.775, 2.0315)
    assert opt.defaults["eps"] == 1e-7 and opt.defaults["ns_steps"] == 5 and opt.defaults["adjust_lr_fn"] is None


BAD_GROUPS = {
    "a bias in a Muon group": (lambda ps: [ps["w"], ps["b"]], r"Invalid params: parameter 1 of group 0 \(shape "
                               r"\(4,\)\) has 1 dimension\(s\).*use_muon': False.*create_optimizer\(model, 'muon'\)"),
    "a 0-dim tensor": (lambda ps: [{"params": [ps["w"]]}, {"params": [ps["s"]]}],
                       r"parameter 0 of group 1 \(shape \(\)\) has 0 dimension"),
    "betas in a Muon group": (lambda ps: [{"params": [ps["w"]], "betas": (0.9, 0.95)}],
                              r"Invalid option 'betas' in a group of Muon \(use_muon=True\).*set use_muon=False"),
    "momentum in an AdamW group": (lambda ps: [{"params": [ps["b"]], "use_muon": False, "momentum": 0.9}],
                                   r"Invalid option 'momentum' in a group of AdamW \(use_muon=False\)"),
    "adamw_lr in a group": (lambda ps: [{"params": [ps["w"]], "adamw_lr": 5e-3}], r"Invalid option 'adamw_lr'"),
    "use_muon not a bool": (lambda ps: [{"params": [ps["w"]], "use_muon": "yes"}], r"Invalid use_muon: 'yes'"),
    "a split that does not divide": (lambda ps: [{"params": [ps["w"]], "split": 3}],
                                     r"Invalid split: 3 does not divide the 4 rows of parameter 0 of group 0"),
    "a split that does not add up": (lambda ps: [{"params": [ps["w"]], "split": [2, 1]}],
                                     r"Invalid split: \[2, 1\] adds up to 3 rows, parameter 0 .* has 4"),
    "a complex matrix": (lambda ps: [ps["z"]], r"parameter 0 of group 0 \(shape \(2, 2\)\) is torch.complex64"),
    "a bad AdamW group value": (lambda ps: [{"params": [ps["b"]], "use_muon": False, "betas": (1.0, 0.9)}],
                                r"Invalid beta parameter at index 0: 1.0"),
}


@pytest.mark.parametrize("case", list(BAD_GROUPS))
def test_ambiguous_groups_are_refused_in_one_line(case):
    ps = {"w": torch.nn.Parameter(torch.ones(4, 3)), "b": torch.nn.Parameter(torch.ones(4)),
          "s": torch.nn.Parameter(torch.ones(())), "z": torch.nn.Parameter(torch.ones(2, 2, dtype=torch.complex64))}
    make_params, words = BAD_GROUPS[case]
    with pytest.raises(ValueError, match=words) as err:
        Muon(make_params(ps))
    assert "\n" not in str(err.value)


def test_the_functional_entry_checks_before_writing():
    p, g, m = torch.ones(4), torch.ones(4), torch.zeros(4)
    with pytest.raises(ValueError, match=r"Invalid params\[0\]: torch.float32 of shape \(4,\)"):
        muon([p], [g], [m], lr=0.1, weight_decay=0.1, momentum=0.9)
    w, gw, mw = torch.ones(4, 3), torch.ones(4, 3), torch.zeros(4, 3)
    with pytest.raises(ValueError, match=r"Invalid split: 3 does not divide the 4 rows of params\[0\]"):
        muon([w], [gw], [mw], lr=0.1, weight_decay=0.1, momentum=0.9, split=3)
    assert torch.equal(w, torch.ones(4, 3)) and torch.equal(mw, torch.zeros(4, 3))
    # and it is the class's update
    (a,), (b,) = make([(6, 4)], twins=2)
    a.grad = b.grad = torch.randn(6, 4)
    buf = torch.zeros(6, 4)
    Muon([b], lr=0.02, ns_dtype=torch.float32).step()
    with torch.no_grad():  # (as an optimizer's step calls it)
        muon([a], [a.grad], [buf], lr=0.02, weight_decay=0.1, momentum=0.95, ns_dtype=torch.float32)
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------
# checkpoints and failing steps
# ---------------------------------------------------------------------------

def llama(dim=32):
    from optimizer.demo.llama import Llama

    torch.manual_seed(0)
    return Llama(vocab=64, dim=dim, layers=1, heads=2, max_seq=16)


def llama_steps(model, opt, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randint(0, 64, (4, 17), generator=gen)
        opt.zero_grad()
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def llama_groups(model):
    """The demo's model by hand: its hidden matrices to Muon, each fused QKV weight as three
    matrices (split), the embedding and the head to AdamW, the norms to AdamW without decay."""
    qkv = [b.attn.qkv.weight for b in model.blocks]
    hidden = [p for n, p in model.named_parameters() if p.dim() == 2 and n.startswith("blocks")
              and all(p is not q for q in qkv)]
    return [{"params": hidden}, {"params": qkv, "split": model.embed.embedding_dim},
            {"params": [model.embed.weight, model.head.weight], "use_muon": False},
            {"params": [p for p in model.parameters() if p.dim() == 1], "use_muon": False, "weight_decay": 0.0}]


@pytest.mark.parametrize("options", [dict(), dict(state_dtype=torch.uint8, min_8bit_size=64, foreach=True),
                                     dict(ns_dtype=torch.float32, fused=True)], ids=["default", "8bit", "fp32-ns"])
def test_save_load_save_and_bit_identical_continuation(options):
    model = llama()
    opt = Muon(llama_groups(model), lr=0.02, adamw_lr=3e-3, **options)
    llama_steps(model, opt, 3, seed=1)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), roundtrip(opt.state_dict())
    llama_steps(model, opt, 3, seed=2)

    twin = llama()
    twin.load_state_dict(saved_model)
    opt2 = Muon(llama_groups(twin), lr=0.02, adamw_lr=3e-3, **options)
    opt2.load_state_dict(saved_opt)
    assert_same_nested(roundtrip(opt2.state_dict()), saved_opt)
    llama_steps(twin, opt2, 3, seed=2)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    if "state_dtype" in options:
        assert opt.state[model.blocks[0].mlp.down.weight]["momentum_buffer"].dtype == torch.uint8


def test_a_checkpoint_of_other_groups_is_refused_and_nothing_changes():
    model = tiny_model()
    groups, _ = split_model(model)
    opt = Muon(groups)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    snap = snapshot(opt)
    swapped = copy.deepcopy(opt.state_dict())
    swapped["param_groups"].reverse()
    with pytest.raises(ValueError, match=r"param_groups\[0\] is updated by AdamW \(use_muon=False\), this "
                       r"optimizer's group 0 by Muon \(use_muon=True\)"):
        opt.load_state_dict(swapped)
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.ones(2, 2))], lr=0.1, momentum=0.9)
    one = Muon([torch.nn.Parameter(torch.ones(2, 2))])
    with pytest.raises(ValueError, match=r"lacks \['ns_coefficients', 'ns_steps'\] .*another optimizer"):
        one.load_state_dict(sgd.state_dict())
    assert_unchanged(opt, snap)


def three_groups(backend, **last):
    """Muon, AdamW, then ``last`` (a Muon group unless it says otherwise), each with state."""
    torch.manual_seed(0)
    params = [[torch.nn.Parameter(torch.randn(6, 4))], [torch.nn.Parameter(torch.randn(5))],
              [torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(3, 2, 2))]]
    opt = Muon([{"params": params[0]}, {"params": params[1], "use_muon": False}, {"params": params[2], **last}],
               **backend)
    for _ in range(2):
        for p in sum(params, []):
            p.grad = torch.randn_like(p)
        opt.step()
    for p in sum(params, []):
        p.grad = torch.randn_like(p)
    return opt, params[2]


def _data(p, value):
    p.data = value


FAILURES = {  # name -> (settings of the last group, inject(opt, last params), exception, words)
    "a bad momentum": ({}, lambda o, ps: o.param_groups[-1].update(momentum=-0.5), ValueError,
                       "Invalid momentum: -0.5"),
    "a matrix made a vector": ({}, lambda o, ps: _data(ps[0], torch.ones(16)) or setattr(ps[0], "grad",
                                                                                          torch.ones(16)),
                               ValueError, "has 1 dimension(s)"),
    "a momentum of another shape": ({}, lambda o, ps: o.state[ps[1]].update(momentum_buffer=torch.zeros(3, 4)),
                                    RuntimeError, "state['momentum_buffer'] of shape (3, 4)"),
    "a gradient of another dtype": ({}, lambda o, ps: setattr(ps[1].grad, "data", torch.zeros(3, 2, 2).double()),
                                    RuntimeError, "gradient of shape (3, 2, 2), torch.float64"),
    "a bad ns_dtype": ({}, lambda o, ps: o.param_groups[-1].update(ns_dtype=torch.int32), ValueError,
                       "Invalid ns_dtype: torch.int32"),
    "an AdamW group's bad betas": ({"use_muon": False}, lambda o, ps: o.param_groups[-1].update(betas=(0.9, 1.0)),
                                   ValueError, "beta parameter at index 1: 1.0"),
    "an AdamW group's state": ({"use_muon": False}, lambda o, ps: o.state[ps[0]].pop("exp_avg_sq"), RuntimeError,
                               "without 'exp_avg_sq'"),
}


@pytest.mark.parametrize("backend", [dict(), REFERENCE], ids=["default", "reference"])
@pytest.mark.parametrize("case", list(FAILURES))
def test_a_step_that_raises_changes_nothing(case, backend):
    """Every group is checked before any is written (Note [two-phase step]): a failure in the last
    group, Muon's or AdamW's, leaves the groups before it (Muon's and AdamW's) as they were."""
    last, inject, exc, words = FAILURES[case]
    opt, ps = three_groups(backend, **last)
    inject(opt, ps)
    snap = snapshot(opt)
    with pytest.raises(exc) as err:
        opt.step()
    assert words in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert_unchanged(opt, snap)


def test_lr_times_the_scale_must_fit_float32():
    p = torch.nn.Parameter(torch.ones(100, 1))  # "original": scale sqrt(100) = 10
    opt = Muon([p], lr=1e38, weight_decay=0.0)
    p.grad = torch.ones(100, 1)
    with pytest.raises(ValueError, match=r"Invalid lr \* scale = 1e\+39"):
        opt.step()
    assert torch.equal(p.detach(), torch.ones(100, 1)) and not opt.state[p]


@pytest.fixture
def one_rank():
    """A gloo process group of one rank (this process), for DTensors on a 1-rank mesh."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not built")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", [REFERENCE, BATCHED], ids=["reference", "batched"])
@pytest.mark.parametrize("state_dtype", [None, torch.uint8])
def test_fsdp2_shards_on_one_rank_step_as_plain_tensors(one_rank, backend, state_dtype):
    """The FSDP2 path (Note [Muon under FSDP2]; several ranks: tests/test_distributed.py) on a
    mesh of one rank: the same steps as plain tensors, bit for bit, the momentum a DTensor."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    shapes = [(9, 4), (3, 5, 4), (6, 2, 2, 2), (4, 9)]
    plain, = make(shapes)
    sharded = [torch.nn.Parameter(distribute_tensor(p.detach().clone(), mesh, [Shard(0)])) for p in plain]

    def groups(ps):
        return [{"params": ps[:1], "split": [2, 7]}, {"params": ps[1:]}]

    opts = [Muon(groups(ps), lr=0.1, state_dtype=state_dtype, min_8bit_size=1, **backend) for ps in (plain, sharded)]
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for p, q, g in zip(plain, sharded, grads):
            p.grad, q.grad = g, distribute_tensor(g, mesh, [Shard(0)])
        for opt in opts:
            opt.step()
    for p, q in zip(plain, sharded):
        assert torch.equal(q.full_tensor(), p.detach())
        for key, value in opts[0].state[p].items():
            assert type(opts[1].state[q][key]).__name__ == "DTensor"
            assert torch.equal(opts[1].state[q][key].full_tensor(), value), key


def test_fsdp2_owners_share_the_iterations_flops():
    """Which rank orthogonalises which gathered matrix (Note [Muon under FSDP2]): every tensor once,
    the same lists from the same shapes, and the busiest rank near the mean share on a real model's
    matrices, where giving the k-th tensor to rank k mod world leaves one rank far busier."""
    from optimizer import bench
    from optimizer.muon import _owners, _work, ns_flops

    shapes = bench.MODELS["gpt2-30m"]()
    not_hidden = bench.NOT_HIDDEN["gpt2-30m"](len(shapes))
    mats = [s for i, s in enumerate(shapes) if len(s) == 2 and i not in not_hidden]
    assert len(mats) == 24
    work = [ns_flops(s) for s in mats]
    for world in (1, 2, 3, 4, 8):
        owned = _owners(work, world)
        assert sorted(k for ks in owned for k in ks) == list(range(len(work)))
        assert all(ks == sorted(ks) for ks in owned)
        mean = sum(work) / world
        busiest = max(sum(work[k] for k in ks) for ks in owned)
        round_robin = max(sum(work[r::world]) for r in range(world))
        assert busiest <= (1.1 if world == 8 else 1.03) * mean, world  # (8 ranks: 3 matrices each)
        assert busiest <= round_robin
        if world in (2, 4, 8):
            assert round_robin > 1.1 * mean  # (what the greedy rule is for)
    assert _owners([5, 5, 5], 4) == [[0], [1], [2], []]  # fewer tensors than ranks: the last ranks idle
    assert _owners([], 2) == [[], []]
    assert _owners([1, 9, 4, 4], 2) == [[1], [0, 2, 3]]  # 9 first, then each to the lighter rank
    # a tensor's work is its matrices': a split QKV weight is three, a conv kernel one flattened
    assert _work((96, 32), False, None) == ns_flops((96, 32))
    assert _work((96, 32), False, 32) == 3 * ns_flops((32, 32))
    assert _work((96, 32), False, [64, 32]) == ns_flops((64, 32)) + ns_flops((32, 32))
    assert _work((8, 4, 3, 3), False, None) == ns_flops((8, 36))
    assert _work((5, 8, 4), False, None) == 5 * ns_flops((8, 4))  # a stack of experts
    assert _work((5, 8, 4), True, None) == ns_flops((5, 32))


def test_tensor_parallel_dtensors_and_mixed_groups_are_refused_in_one_line(one_rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    for placement in (Shard(1), Replicate()):
        p = torch.nn.Parameter(distribute_tensor(torch.ones(4, 4), mesh, [placement]))
        with pytest.raises(ValueError, match=r"^Invalid params: parameter 0 of group 0 \(shape \(4, 4\)\) is a "
                           r"DTensor placed .* on a 1-D mesh: Muon gathers FSDP2 shards \(Shard\(0\) on a 1-D mesh\), "
                           r"not tensor-parallel ones; put it in an AdamW group \(use_muon=False\)$"):
            Muon([p])
    mesh2 = init_device_mesh("cpu", (1, 1))
    p = torch.nn.Parameter(distribute_tensor(torch.ones(4, 4), mesh2, [Shard(0), Shard(1)]))
    with pytest.raises(ValueError, match=r"parameter 0 of group 0 \(shape \(4, 4\)\) is a DTensor .* on a 2-D mesh"):
        Muon([p])
    shard = torch.nn.Parameter(distribute_tensor(torch.ones(4, 4), mesh, [Shard(0)]))
    with pytest.raises(ValueError, match=r"^Invalid params: parameter 1 of group 0 \(shape \(4, 4\)\) is a DTensor, "
                       "the first of its group a plain tensor: a Muon group holds FSDP2 shards only, or plain "
                       "tensors only$"):
        Muon([torch.nn.Parameter(torch.ones(4, 4)), shard])
    with pytest.raises(ValueError, match=r"^Invalid params: params\[1\] \(shape \(4, 4\)\) is a DTensor, the first"):
        muon([torch.ones(4, 4), shard], [torch.ones(4, 4), shard], [torch.zeros(4, 4), shard], lr=0.1,
             weight_decay=0.0, momentum=0.9)


# ---------------------------------------------------------------------------
# torch.compile, schedules, precision
# ---------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:Detected call of")
@pytest.mark.parametrize("backend", [REFERENCE, BATCHED], ids=["reference", "batched"])
@pytest.mark.parametrize("ns_dtype", [torch.float32, torch.bfloat16])
def test_compiled_muon_traces_without_a_graph_break(backend, ns_dtype):
    """torch.compile(opt.step) with matrices, a stack and a split weight, and a new lr at every
    step: one graph, no break, no recompile once the lr is seen to vary; float32 steps equal the
    eager ones to rounding (bf16 ones round otherwise in Inductor's matmuls: see the row's
    compile_kwargs in optim_table.py)."""
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        (params,) = make([(12, 8), (8, 12), (2, 6, 4), (9, 6)])
        opt = Muon([{"params": params[:3]}, {"params": params[3:], "split": 3}], lr=0.02, ns_dtype=ns_dtype,
                   **backend)
        step = torch.compile(opt.step) if compiled else opt.step
        gen = torch.Generator().manual_seed(10)
        frames = []
        for i in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            step()
            opt.param_groups[0]["lr"] = opt.param_groups[1]["lr"] = 0.02 * 0.8 ** (i + 1)
            frames.append(counters["frames"]["total"])
        results.append([p.detach().clone() for p in params])
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counters["stats"]["calls_captured"] > 0 and frames[2] == frames[-1], frames
    if ns_dtype == torch.float32:
        for a, b in zip(*results):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Detected call of")
def test_one_scheduler_drives_every_group_from_its_own_peak():
    from optimizer.scheduler import get_scheduler

    model = llama()
    opt = create_optimizer(model, "muon", lr=0.02, adamw_lr=3e-3)
    sched = get_scheduler("cosine", opt, warmup_steps=2, total_steps=10, min_lr_ratio=0.1)
    peaks = {g["group"]: g["initial_lr"] for g in opt.param_groups}
    assert peaks == {"muon": 0.02, "adamw_decay": 3e-3, "adamw_no_decay": 3e-3}
    for _ in range(6):
        llama_steps(model, opt, 1, seed=0)
        sched.step()
    ratios = [g["lr"] / g["initial_lr"] for g in opt.param_groups]
    assert max(ratios) - min(ratios) < 1e-12 and 0.1 < ratios[0] < 1
    sd = roundtrip(opt.state_dict())
    assert [g["initial_lr"] for g in sd["param_groups"]] == [0.02, 3e-3, 3e-3]


def test_8bit_momentum_is_the_float_step_between_a_decode_and_an_encode():
    """state_dtype=torch.uint8: matrices of at least min_8bit_size values keep their momentum in 8
    bits (Note [8-bit states]); each step decodes it, runs the float32 step, encodes it again (to
    nearest). The others keep a float32 one. Both backends keep the same momentum."""
    (big, small), (big2, small2), (big_b, small_b) = make([(64, 80), (4, 4)], twins=3)
    kw = dict(lr=0.02, ns_dtype=torch.float32)
    opt = Muon([big, small], state_dtype=torch.uint8, **kw, **REFERENCE)
    batched = Muon([big_b, small_b], state_dtype=torch.uint8, **kw, **BATCHED)
    gen = torch.Generator().manual_seed(11)
    for _ in range(3):
        codes, scale = opt.state[big].get("momentum_buffer"), opt.state[big].get("momentum_buffer_scale")
        m = (torch.zeros(64, 80) if codes is None
             else _8bit.decode_signed(codes.view(torch.int8), scale))  # the momentum before the step
        float_opt = Muon([big2], **kw, **REFERENCE)  # the float step from the same values
        big2.data.copy_(big.detach())
        float_opt.state[big2] = {"momentum_buffer": m.clone()}
        step_all([opt, float_opt, batched], [[big, small], [big2], [big_b, small_b]], gen)
        assert torch.equal(big, big2)
        want_codes, want_scale = _8bit.encode_signed(float_opt.state[big2]["momentum_buffer"])
        assert torch.equal(opt.state[big]["momentum_buffer"].view(torch.int8), want_codes)
        assert torch.equal(opt.state[big]["momentum_buffer_scale"], want_scale)
        assert opt.state[small]["momentum_buffer"].dtype == torch.float32
        for a, b in zip((big, small), (big_b, small_b)):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)  # (bmm and mm may round otherwise)
            assert_same_nested(opt.state[a], batched.state[b])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nesterov, maximize", [(True, False), (False, True)])
def test_8bit_momentum_c_loop_keeps_the_batched_paths_momentum_and_step(dtype, nesterov, maximize):
    """The C loop (the default on the CPU with 8-bit momentum) decodes, updates and encodes the
    momentum in one pass and hands the batched path the direction: the same codes and scales
    as the batched path (a value on a rounding boundary may take the neighbouring code), the same
    parameters; a 3-D stack and a matrix whose rows end mid-block included."""
    shapes = [(64, 80), (64, 80), (300, 77), (3, 16, 16)]
    ours, theirs = make(shapes, twins=2)
    ours, theirs = [[torch.nn.Parameter(p.detach().to(dtype)) for p in ps] for ps in (ours, theirs)]
    kw = dict(lr=0.02, state_dtype=torch.uint8, min_8bit_size=1, nesterov=nesterov, maximize=maximize,
              ns_dtype=torch.float32)
    fused, batched = Muon(ours, fused=True, **kw), Muon(theirs, **kw, **BATCHED)
    routes = []
    spy = _dispatch.route
    gen = torch.Generator().manual_seed(5)
    for step in range(4):
        grads = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        with unittest.mock.patch.object(_dispatch, "route", lambda *a, **k: routes.append(spy(*a, **k)) or routes[-1]):
            fused.step()
        batched.step()
        for p, q in zip(ours, theirs):
            a, b = fused.state[p], batched.state[q]
            assert (a["momentum_buffer"].view(torch.int8).int() - b["momentum_buffer"].view(torch.int8).int()
                    ).abs().max() <= 1
            torch.testing.assert_close(a["momentum_buffer_scale"], b["momentum_buffer_scale"], rtol=1e-6, atol=0)
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)
    assert routes and all(r == {"c": [0, 1, 2, 3]} for r in routes)


def test_8bit_momentum_checkpoints_convert_both_ways():
    (a,), (b,), (c,) = make([(64, 80)], twins=3)
    opt = Muon([a], state_dtype=torch.uint8)
    a.grad = torch.randn(64, 80)
    opt.step()
    to_float = Muon([b])
    to_float.load_state_dict(roundtrip(opt.state_dict()))
    m = to_float.state[b]["momentum_buffer"]
    assert m.dtype == torch.float32
    back = Muon([c], state_dtype=torch.uint8)
    back.load_state_dict(to_float.state_dict())
    assert torch.equal(back.state[c]["momentum_buffer"], opt.state[a]["momentum_buffer"])


def test_stochastic_rounding_of_bf16_parameters():
    """bf16 parameters with stochastic_rounding=True: the float32 step of the same values, rounded
    by _rounding.round_stochastic with the group's seeds; both backends; a resumed run goes on
    bit-identically (the count of rounded steps is saved)."""
    (ps, qs, fs) = make([(16, 8), (3, 4, 4)], dtype=torch.bfloat16, twins=3)
    kw = dict(lr=0.02, ns_dtype=torch.bfloat16, stochastic_rounding=True, seed=5)
    ref, bat = Muon(ps, **kw, **REFERENCE), Muon(qs, **kw, **BATCHED)
    gen = torch.Generator().manual_seed(12)
    for step in range(3):
        f32 = [torch.nn.Parameter(p.detach().float()) for p in ps]
        exact = Muon(f32, lr=0.02, ns_dtype=torch.bfloat16, **REFERENCE)
        for p, f in zip(ps, f32):
            if ref.state[p]:
                exact.state[f] = {"momentum_buffer": ref.state[p]["momentum_buffer"].clone()}
        step_all([ref, bat, exact], [ps, qs, f32], gen)
        seeds = _rounding.rounding_seeds(5, step, len(ps))
        for p, q, f, seed in zip(ps, qs, f32, seeds):
            assert torch.equal(p.detach(), _rounding.round_stochastic(f.detach(), torch.bfloat16, seed))
            assert torch.equal(p, q)
    assert ref.param_groups[0]["rounding_step"] == 3
    saved = roundtrip(ref.state_dict())
    resumed = Muon(fs, **kw, **REFERENCE)
    for f, p in zip(fs, ps):
        f.data.copy_(p.detach())
    resumed.load_state_dict(saved)
    step_all([ref, resumed], [ps, fs], gen)
    assert all(torch.equal(p, f) for p, f in zip(ps, fs))


def test_the_default_ns_dtype():
    """None: bf16 where this CPU multiplies bf16 in hardware, else float32; float64 for float64
    parameters; bf16 on other devices (CUDA)."""
    assert CPU_NS_DTYPE == (torch.bfloat16 if _fast_bf16_matmul() else torch.float32)
    assert ns_dtype_of(None, torch.ones(2, 2)) == CPU_NS_DTYPE
    assert ns_dtype_of(None, torch.ones(2, 2, dtype=torch.float64)) == torch.float64
    assert ns_dtype_of(None, torch.ones(2, 2, device="meta")) == torch.bfloat16
    assert ns_dtype_of(torch.float32, torch.ones(2, 2, device="meta")) == torch.float32


# ---------------------------------------------------------------------------
# create_optimizer(model, "muon")
# ---------------------------------------------------------------------------

def names_of(model, params):
    ids = {id(p) for p in params}
    return sorted(n for n, p in model.named_parameters() if id(p) in ids)


def test_create_optimizer_splits_a_llama(caplog):
    """Hidden Linear weights to Muon; the embedding and the output layer to AdamW with decay;
    norms to AdamW without; counts logged. dim == vocab (as the demo's 256 and 256): the output
    layer is still only the head."""
    model = llama(dim=64)
    with caplog.at_level("INFO", logger="optimizer"):
        opt = create_optimizer(model, "muon")
    groups = {g["group"]: g for g in opt.param_groups}
    assert list(groups) == ["muon", "adamw_decay", "adamw_no_decay"]
    assert names_of(model, groups["muon"]["params"]) == sorted(
        f"blocks.0.{m}.weight" for m in ("attn.qkv", "attn.out", "mlp.gate", "mlp.up", "mlp.down"))
    assert names_of(model, groups["adamw_decay"]["params"]) == ["embed.weight", "head.weight"]
    assert all(p.dim() == 1 for p in groups["adamw_no_decay"]["params"])
    assert groups["muon"]["lr"] == 0.02 and groups["adamw_decay"]["lr"] == 3e-3
    assert groups["adamw_no_decay"]["weight_decay"] == 0.0 and groups["adamw_decay"]["weight_decay"] == 0.1
    assert "muon split: 5 tensors to Muon, 5 to AdamW, of which matrices (embeddings, output layer): " \
           "embed.weight, head.weight" in caplog.text
    assert "muon: 5 tensors" in caplog.text and "adamw_no_decay: 3 tensors" in caplog.text


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3)
        self.norm = torch.nn.BatchNorm2d(8)
        self.conv1d = torch.nn.Conv1d(8, 8, 3, padding=1)
        self.hidden = torch.nn.Linear(8, 16)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x):
        x = self.norm(self.stem(x)).relu()
        x = self.conv1d(x.flatten(2)).mean(-1)
        return self.fc(self.hidden(x).relu())


def test_create_optimizer_splits_a_conv_net_and_it_learns():
    torch.manual_seed(0)
    model = ConvNet()
    opt = create_optimizer(model, "muon", lr=0.05, adamw_lr=1e-2)
    groups = {g["group"]: g for g in opt.param_groups}
    assert names_of(model, groups["muon"]["params"]) == ["hidden.weight"]
    assert names_of(model, groups["muon_conv"]["params"]) == ["conv1d.weight", "stem.weight"]
    assert groups["muon_conv"]["flatten"] is True
    assert names_of(model, groups["adamw_decay"]["params"]) == ["fc.weight"]  # the classifier head
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


class TiedLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(20, 8)
        self.hidden = torch.nn.Linear(8, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.head = torch.nn.Linear(8, 20, bias=False)
        self.head.weight = self.embed.weight  # tied


def test_create_optimizer_keeps_a_tied_output_layer_with_adamw():
    model = TiedLM()
    labels = muon_labels(model)
    assert labels == {"embed.weight": "adamw", "hidden.weight": "muon", "hidden.bias": "adamw",
                      "norm.weight": "adamw", "norm.bias": "adamw"}
    opt = create_optimizer(model, "muon")
    assert [g["group"] for g in opt.param_groups] == ["muon", "adamw_decay", "adamw_no_decay"]


def test_the_rule_can_be_replaced_and_is_checked():
    model = tiny_model()
    opt = create_optimizer(model, "muon", labels=lambda m: {n: "muon" if n == "4.weight" else "adamw"
                                                            for n, _ in m.named_parameters()})
    assert [g["group"] for g in opt.param_groups] == ["muon", "adamw_decay", "adamw_no_decay"]
    assert opt.param_groups[0]["params"] == [model[4].weight]
    with pytest.raises(ConfigError, match=r"Invalid labels: '0.weight': 'sgd'; every trainable parameter needs one"):
        create_optimizer(model, "muon", labels=lambda m: {n: "sgd" for n, _ in m.named_parameters()})
    with pytest.raises(ValueError, match=r"parameter 0 of group 1 \(shape \(16,\)\) has 1 dimension"):
        create_optimizer(model, "muon", labels=lambda m: {n: "muon" for n, _ in m.named_parameters()})
    with pytest.raises(ConfigError, match=r"Invalid argument for optimizer 'adamw': 'labels'"):
        create_optimizer(model, "adamw", labels=muon_labels)


def test_create_optimizer_with_a_plain_list_splits_by_shape():
    a, b = torch.nn.Parameter(torch.ones(3, 2)), torch.nn.Parameter(torch.ones(3))
    opt = create_optimizer([a, b], "muon")
    assert [(g["group"], g["use_muon"], len(g["params"])) for g in opt.param_groups] == [
        ("muon", True, 1), ("adamw_no_decay", False, 1)]


def test_muon_trains_the_llama_faster_than_its_start():
    """The loss goes down on a small LLaMA (the demo's model) under create_optimizer's split."""
    from optimizer.demo.data import Batches, load_text, split

    torch.manual_seed(0)
    from optimizer.demo.llama import Llama

    model = Llama(dim=32, layers=2, heads=2, max_seq=32)
    opt = create_optimizer(model, "muon")
    batches = Batches(split(load_text()[0])[0], 8, 32, 0)
    losses = []
    for _ in range(40):
        x, y = batches.next()
        opt.zero_grad()
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    assert math.isfinite(losses[-1])


class Attention(torch.nn.Module):
    """Two attention blocks of different widths, as torch.nn.MultiheadAttention stores them: one
    fused in_proj_weight [3 E, E] each (query, key, value stacked along the rows)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(30, 8)
        self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        self.up = torch.nn.Linear(8, 12)
        self.attn2 = torch.nn.MultiheadAttention(12, 3, batch_first=True)
        self.head = torch.nn.Linear(12, 30)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        h = self.up(h)
        return self.head(h + self.attn2(h, h, h, need_weights=False)[0])


def test_create_optimizer_splits_multihead_attentions_fused_qkv_into_its_three_matrices():
    torch.manual_seed(0)
    model = Attention()
    labels = muon_labels(model)
    assert labels["attn.in_proj_weight"] == labels["attn2.in_proj_weight"] == "muon_qkv"
    assert labels["attn.out_proj.weight"] == labels["up.weight"] == "muon" and labels["head.weight"] == "adamw"
    opt = create_optimizer(model, "muon", lr=0.02, momentum=0.0)
    groups = {g["group"]: g for g in opt.param_groups}
    assert groups["muon_qkv_8"]["params"] == [model.attn.in_proj_weight] and groups["muon_qkv_8"]["split"] == 8
    assert groups["muon_qkv_12"]["params"] == [model.attn2.in_proj_weight] and groups["muon_qkv_12"]["split"] == 12
    x = torch.randint(0, 30, (4, 6))
    torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
    before = model.attn.in_proj_weight.detach().clone()
    opt.step()
    # each of the three 8 x 8 blocks is orthogonalised on its own: its singular values (over lr)
    # land in the iteration's band around 1, which the 24 x 8 matrix orthogonalised whole cannot give
    # every block (its 8 singular directions are shared by all three)
    update = (before * (1 - 0.02 * 0.1) - model.attn.in_proj_weight.detach()) / 0.02
    for block in update.split(8):
        s = torch.linalg.svdvals(block)
        assert 0.6 < s.min() and s.max() < 1.25, s
    whole = torch.linalg.svdvals(update)
    assert whole.max() > 1.5  # three orthogonal-ish blocks stacked: sqrt(3) in the shared directions
    groups_again = {g["group"] for g in create_optimizer(Attention(), "muon").param_groups}
    assert {"muon_qkv_8", "muon_qkv_12"} <= groups_again


def test_a_muon_qkv_label_on_a_tensor_that_is_not_three_stacked_matrices_is_refused():
    model = tiny_model()
    with pytest.raises(ConfigError, match=r"Invalid labels: '0.weight' is 'muon_qkv' but has shape \(11, 8\)"):
        create_optimizer(model, "muon", labels=lambda m: {n: "muon_qkv" if n == "0.weight" else "adamw"
                                                          for n, _ in m.named_parameters()})
    one_width = torch.nn.Sequential(torch.nn.MultiheadAttention(6, 2))  # (out_proj: the last Linear, the output)
    assert [g["group"] for g in create_optimizer(one_width, "muon").param_groups][0] == "muon_qkv"


def test_the_other_algorithms_options_at_the_optimizers_own_values_are_dropped_others_refused():
    """torch's base class and ZeroRedundancyOptimizer fill every group with the keyword arguments they
    were given: an AdamW group that holds Muon's momentum at the optimizer's own value (and any group
    holding an adamw_* default) is that filling and keeps working; another value is still refused."""
    m, b = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4))
    opt = Muon([{"params": [m], "adamw_lr": 3e-3}, {"params": [b], "use_muon": False, "momentum": 0.9, "ns_steps": 5}],
               momentum=0.9, adamw_lr=3e-3)
    assert "momentum" not in opt.param_groups[1] and "ns_steps" not in opt.param_groups[1]
    assert "adamw_lr" not in opt.param_groups[0] and opt.param_groups[1]["lr"] == 3e-3
    with pytest.raises(ValueError, match=r"Invalid option 'momentum' in a group of AdamW"):
        Muon([{"params": [m]}, {"params": [b], "use_muon": False, "momentum": 0.8}], momentum=0.9)
    with pytest.raises(ValueError, match=r"Invalid option 'adamw_lr' in a group of Muon"):
        Muon([{"params": [m], "adamw_lr": 1e-2}], adamw_lr=3e-3)
    with pytest.raises(ValueError, match=r"Invalid option 'momentum' in a group of AdamW"):  # a tensor: never a default
        Muon([{"params": [m]}, {"params": [b], "use_muon": False, "momentum": torch.tensor(0.95)}])
