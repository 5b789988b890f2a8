"""Issue 27, items 6-10: what real runs throw at the optimizers, beyond bad hyper-parameters.

* A checkpoint holding values no run can reach (a step count of -1 or NaN, a negative second
  moment, complex moments for a real parameter, containers of the wrong kind) is refused by
  ``load_state_dict`` with one line naming the parameter and key, and nothing changes; the
  unusual states runs do reach (an infinite ``exp_avg_sq``, NaNs, 8-bit special blocks,
  torch.optim checkpoints, Muon's momentum, SparseAdamW after sparse steps) still load.
* A parameter or state whose elements share memory (an expanded tensor) is refused before the
  step writes anything (Note [two-phase step]).
* GradScaler's ``found_inf`` is a sum over devices (2.0 when two GPUs overflowed): the step is
  skipped once and counted back once (Note [step counters]).
* Stochastic rounding is refused under CUDA graph capture (Note [stochastic rounding]).
* Every tensor of an optimizer has its own rounding stream, whatever its group.
"""

from __future__ import annotations

import collections
import copy
import io
import math
import warnings

import pytest
import torch
from helpers import BACKENDS, assert_same_nested, assert_unchanged, snapshot, tiny_model, train
from optim_table import TABLE, ids
from torch.utils._python_dispatch import TorchDispatchMode

from optimizer import AdamW, AdamW8bit, Lion, Muon, SparseAdamW, _dispatch
from optimizer.adamw import adamw

# ---------------------------------------------------------------------------------------------
# 6. load_state_dict refuses impossible states, loads the unusual possible ones
# ---------------------------------------------------------------------------------------------


def trained(cls=AdamW, **kwargs):
    model = tiny_model()
    opt = cls(model.parameters(), **kwargs)
    train(model, opt, 2)
    return model, opt


WEIGHT = 1  # the index in the checkpoint of tiny_model()'s model[1].weight, a (16, 8) parameter


def _set(key, value):
    def corrupt(sd):
        sd["state"][WEIGHT][key] = value(sd["state"][WEIGHT][key]) if callable(value) else value
    return corrupt


def _negative_once(v):
    v = v.clone()
    v.view(-1)[5] = -1e-12
    return v


def _negative_beside_a_nan(v):  # amin() meets the NaN first: the second pass must still see -1
    v = v.clone()
    v.view(-1)[0] = math.nan
    v.view(-1)[7] = -1.0
    return v


def _duplicate_index(sd):
    sd["param_groups"][0]["params"][1] = sd["param_groups"][0]["params"][0]


# name -> (corrupt(state_dict), words the one-line ValueError must contain)
IMPOSSIBLE = {
    "step -1": (_set("step", torch.tensor(-1.0)), ["state['step']", "saved parameter 1", "(16, 8)", "-1.0"]),
    "step NaN": (_set("step", torch.tensor(math.nan)), ["state['step']", "saved parameter 1", "nan"]),
    "step inf": (_set("step", math.inf), ["state['step']", "inf"]),
    "step 2.5": (_set("step", 2.5), ["state['step']", "2.5"]),
    "step -3 as an int": (_set("step", -3), ["state['step']", "-3"]),
    "step a bool": (_set("step", True), ["state['step']", "True"]),
    "step complex": (_set("step", torch.tensor(2 + 1j)), ["state['step']", "complex"]),
    "negative exp_avg_sq": (_set("exp_avg_sq", _negative_once), ["state['exp_avg_sq']", "negative"]),
    "negative exp_avg_sq beside a NaN": (_set("exp_avg_sq", _negative_beside_a_nan),
                                         ["state['exp_avg_sq']", "negative"]),
    "-inf exp_avg_sq": (_set("exp_avg_sq", lambda v: torch.full_like(v, -math.inf)), ["state['exp_avg_sq']"]),
    "complex exp_avg": (_set("exp_avg", lambda v: v.to(torch.complex64) * 1j), ["state['exp_avg']", "complex64"]),
    "integer exp_avg": (_set("exp_avg", lambda v: v.to(torch.int32)), ["state['exp_avg']", "int32"]),
    "meta exp_avg": (_set("exp_avg", lambda v: v.to("meta")), ["state['exp_avg']", "meta"]),
    "state a list": (lambda sd: sd.__setitem__("state", list(sd["state"].values())), ["'state' is a list"]),
    "a parameter's state a list": (lambda sd: sd["state"].__setitem__(WEIGHT, [1.0]), ["state[1] is a list"]),
    "param_groups a dict": (lambda sd: sd.__setitem__("param_groups", {"params": [0]}), ["'param_groups'"]),
    "a group without params": (lambda sd: sd["param_groups"][0].pop("params"), ["param_groups[0]"]),
    "an index twice": (_duplicate_index, ["param_groups[0]", "twice"]),
    "an unhashable index": (lambda sd: sd["param_groups"][0]["params"].__setitem__(0, [0]), ["param_groups[0]"]),
    "rounding_step -1": (lambda sd: sd["param_groups"][0].__setitem__("rounding_step", -1), ["rounding_step"]),
    "rounding_step 1.5": (lambda sd: sd["param_groups"][0].__setitem__("rounding_step", 1.5), ["rounding_step"]),
}


@pytest.mark.parametrize("name", list(IMPOSSIBLE))
def test_an_impossible_checkpoint_is_refused_in_one_line_and_changes_nothing(name):
    corrupt, words = IMPOSSIBLE[name]
    model, opt = trained()
    assert opt.param_groups[0]["params"][WEIGHT] is model[1].weight
    bad = copy.deepcopy(opt.state_dict())
    corrupt(bad)
    snap, groups = snapshot(opt), copy.deepcopy(opt.param_groups)
    with pytest.raises(ValueError) as err:
        opt.load_state_dict(bad)
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message
    assert_unchanged(opt, snap)
    assert_same_nested(opt.param_groups, groups)
    train(model, opt, 1)  # and it goes on as it was


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def test_values_are_read_once_at_load_with_one_reduction_per_tensor_and_never_by_a_step():
    model, opt = trained()
    saved = opt.state_dict()
    with CountOps() as load:
        opt.load_state_dict(saved)
    assert load.ops["amin"] == len(saved["state"])  # one per exp_avg_sq, none for exp_avg (any value)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with CountOps() as step:
        opt.step()
    assert step.ops["amin"] == 0


def test_the_8bit_checkpoints_impossible_values_are_refused():
    """A scale of -inf (a negative scale marks a special block, its largest finite magnitude
    negated: never -inf) and complex scales are refused; so are 8-bit states for a complex parameter."""
    model = torch.nn.Linear(64, 64)
    opt = AdamW8bit(model.parameters(), min_8bit_size=1)
    for _ in range(2):
        model(torch.randn(4, 64)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    saved = opt.state_dict()
    for key, value, words in [("exp_avg_sq_scale", lambda s: s.clone().fill_(-math.inf), "-inf"),
                              ("exp_avg_scale", lambda s: s.to(torch.complex64), "float scales")]:
        bad = copy.deepcopy(saved)
        bad["state"][0][key] = value(bad["state"][0][key])
        snap = snapshot(opt)
        with pytest.raises(ValueError, match=words) as err:
            opt.load_state_dict(bad)
        assert "saved parameter 0" in str(err.value) and "\n" not in str(err.value)
        assert_unchanged(opt, snap)
    z = torch.nn.Parameter(torch.zeros(64, 64, dtype=torch.complex64))
    with pytest.raises(ValueError, match="8-bit states are kept for real parameters"):
        AdamW([z]).load_state_dict({"state": {0: saved["state"][0]},
                                    "param_groups": [{**saved["param_groups"][0], "params": [0]}]})


def test_an_overflowed_run_and_other_unusual_states_load_and_go_on():
    """What float32 AdamW holds after an overflowing gradient (exp_avg_sq +inf, its update 0) and
    after a NaN one (NaNs), step counts as tensors of any real dtype or as numbers, and a
    torch.optim.AdamW checkpoint of such a run: all load, and the next step runs."""
    model, opt = trained()
    ours = opt.state_dict()
    ours["state"][WEIGHT]["exp_avg_sq"].view(-1)[0] = math.inf
    ours["state"][WEIGHT]["exp_avg_sq"].view(-1)[1] = math.nan
    ours["state"][WEIGHT]["exp_avg_sq"].view(-1)[2] = -0.0
    ours["state"][WEIGHT]["exp_avg"].view(-1)[:2] = torch.tensor([-math.inf, math.nan])
    for step in (7, 7.0, torch.tensor(7), torch.tensor(7.0, dtype=torch.float64), torch.tensor([7.0])):
        sd = copy.deepcopy(ours)
        sd["state"][WEIGHT]["step"] = step
        other_model, other = trained()
        other.load_state_dict(sd)
        assert other.state[other_model[1].weight]["step"].item() == 7
        train(other_model, other, 1)
    reference = tiny_model()
    theirs = torch.optim.AdamW(reference.parameters())
    x = torch.randint(0, 11, (16,))
    reference(x).sum().backward()
    reference[1].weight.grad[0, 0] = 1e30  # g^2 overflows float32: exp_avg_sq = inf, as ours would hold
    theirs.step()
    assert theirs.state[reference[1].weight]["exp_avg_sq"][0, 0] == math.inf
    model, opt = trained()
    opt.load_state_dict(theirs.state_dict())
    train(model, opt, 1)
    assert opt.state[model[1].weight]["exp_avg_sq"][0, 0] == math.inf
    assert model[1].weight.isfinite().all()


def test_8bit_special_blocks_muon_and_sparse_checkpoints_load():
    """Negative scales (special blocks) with the codes of infinities and NaNs, Muon's momentum of
    any sign, and SparseAdamW after sparse steps: checkpoints of valid runs load."""
    p = torch.nn.Parameter(torch.randn(64, 64))
    opt = AdamW8bit([p], lr=1e-3, min_8bit_size=1)
    for _ in range(3):
        p.grad = (torch.randn(4096) * torch.tensor([1e-20, 1e30]).repeat(2048)).reshape(64, 64)
        opt.step()
    state = opt.state[p]
    assert (state["exp_avg_sq_scale"] < 0).any() and (state["exp_avg_sq"] == 255).any()  # special blocks, inf codes
    q = torch.nn.Parameter(p.detach().clone())
    again = AdamW8bit([q], lr=1e-3, min_8bit_size=1)
    again.load_state_dict(opt.state_dict())
    assert_same_nested(again.state_dict(), opt.state_dict())

    m = torch.nn.Parameter(torch.randn(8, 8))
    muon = Muon([m])
    m.grad = torch.randn(8, 8)
    muon.step()
    assert (muon.state[m]["momentum_buffer"] < 0).any()
    Muon([torch.nn.Parameter(torch.randn(8, 8))]).load_state_dict(muon.state_dict())

    table = torch.nn.Embedding(20, 4, sparse=True)
    sparse = SparseAdamW(table.parameters(), weight_decay=0.1)
    for rows in ([1, 2], [2, 5]):
        table(torch.tensor(rows)).sum().backward()
        sparse.step()
        sparse.zero_grad()
    SparseAdamW(torch.nn.Embedding(20, 4, sparse=True).parameters()).load_state_dict(sparse.state_dict())


# ---------------------------------------------------------------------------------------------
# 7. tensors whose elements share memory are refused before the step writes anything
# ---------------------------------------------------------------------------------------------


def two_groups(info, backend):
    """An optimizer with state in two groups; the last group's last tensor is a matrix (a Muon
    group's, for Muon's row)."""
    torch.manual_seed(0)
    first = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    last = [torch.nn.Parameter(torch.randn(2)), torch.nn.Parameter(torch.randn(3, 4))]
    opt = info.cls([{"params": first}, {"params": last}], weight_decay=0.1, **BACKENDS[backend])
    for _ in range(2):
        for p in first + last:
            p.grad = torch.randn_like(p)
        opt.step()
    for p in first + last:
        p.grad = torch.randn_like(p)
    return opt, first + last


def values(opt, params):
    """Every number of the optimizer, as contiguous copies (an expanded tensor's snapshot would
    differ from it in strides alone)."""
    return ([p.detach().contiguous().clone() for p in params],
            [{k: v.contiguous().clone() for k, v in opt.state[p].items()} for p in params])


def _bits(t):
    """A tensor's bits (NaN equals itself, -0.0 differs from 0.0)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.view(ints[t.element_size()]) if t.is_floating_point() else t


def assert_same_values(a, b):
    for x, y in zip(a[0], b[0]):
        assert x.dtype == y.dtype and torch.equal(_bits(x), _bits(y))
    for s, t in zip(a[1], b[1]):
        assert set(s) == set(t) and all(s[k].dtype == t[k].dtype and torch.equal(_bits(s[k]), _bits(t[k])) for k in s)


def _expanded(t):
    """A tensor of t's values' first row/element, expanded: each row shares its memory."""
    return t.detach()[..., :1].expand(t.shape) if t.dim() else t


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("what", ["parameter", "state"])
@pytest.mark.parametrize("info", TABLE, ids=ids(TABLE))
def test_a_tensor_sharing_memory_between_its_elements_is_refused_before_anything_changed(info, what, backend):
    opt, params = two_groups(info, backend)
    p = params[-1]
    if what == "parameter":
        p.data = _expanded(p)
        words = "shares memory between its elements"
    else:
        key = info.keys_of(p)[0]
        opt.state[p][key] = _expanded(opt.state[p][key])
        words = f"state[{key!r}] whose elements share memory"
    before = values(opt, params)
    with pytest.raises(RuntimeError, match=r"parameter \d of group \d") as err:
        opt.step()
    assert words in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert_same_values(values(opt, params), before)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_8bit_states_and_sparse_rows_sharing_memory_are_refused_before_anything_changed(backend):
    torch.manual_seed(0)
    first, last = torch.nn.Parameter(torch.randn(64, 64)), torch.nn.Parameter(torch.randn(64, 64))
    opt = AdamW8bit([{"params": [first]}, {"params": [last]}], min_8bit_size=1, **BACKENDS[backend])
    for p in (first, last):
        p.grad = torch.randn_like(p)
    opt.step()
    opt.state[last]["exp_avg_sq"] = opt.state[last]["exp_avg_sq"][:1].expand(64, 64)
    before = values(opt, [first, last])
    with pytest.raises(RuntimeError, match=r"parameter 0 of group 1 .* state\['exp_avg_sq'\] whose elements share"):
        opt.step()
    assert_same_values(values(opt, [first, last]), before)

    dense, table = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(20, 1).expand(20, 4))
    sparse = SparseAdamW([dense, table], **BACKENDS[backend])
    dense.grad = torch.randn(5)
    table.grad = torch.sparse_coo_tensor(torch.tensor([[1, 3]]), torch.ones(2, 4), (20, 4), check_invariants=True)
    before = values(sparse, [dense, table])
    with pytest.raises(RuntimeError, match=r"parameter 1 of group 0 \(shape \(20, 4\)\) shares memory"):
        sparse.step()
    assert_same_values(values(sparse, [dense, table]), before)


def test_the_functional_entry_refuses_a_parameter_sharing_memory_before_writing():
    params = [torch.ones(4, 3), torch.ones(4, 1).expand(4, 3)]
    grads = [torch.ones(4, 3), torch.ones(4, 3)]
    m, v, steps = [torch.zeros(4, 3), torch.zeros(4, 3)], [torch.zeros(4, 3), torch.zeros(4, 3)], [torch.zeros(())] * 2
    with pytest.raises(ValueError, match=r"Invalid params\[1\]: its elements share memory"):
        adamw(params, grads, m, v, steps, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)
    assert torch.equal(params[0], torch.ones(4, 3)) and steps[0].item() == 0


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_a_gradient_sharing_memory_is_only_read_and_steps_as_its_copy(backend):
    a = torch.nn.Parameter(torch.randn(4, 3))
    b = torch.nn.Parameter(a.detach().clone())
    opt_a, opt_b = AdamW([a], **BACKENDS[backend]), AdamW([b], **BACKENDS[backend])
    a.grad = torch.randn(4, 1).expand(4, 3)
    b.grad = a.grad.contiguous()
    opt_a.step()
    opt_b.step()
    torch.testing.assert_close(a, b)  # (the contiguous one may take a fused kernel, the other foreach)


# ---------------------------------------------------------------------------------------------
# 8. GradScaler's found_inf summed over two GPUs: the step is skipped, and counted back once
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["triton", "reference", "foreach", "fused"])
@pytest.mark.parametrize("cls", [AdamW, AdamW8bit], ids=["AdamW", "AdamW8bit"])
def test_found_inf_summed_over_devices_skips_the_step_and_counts_it_back_once(cls, backend, monkeypatch):
    """found_inf = 2.0 (GradScaler's sum when both GPUs overflowed): nothing changes, the step
    count included; then a normal step equals the reference's first step. The Triton kernels run
    in Triton's interpreter on CPU tensors (the counters go back on the device there)."""
    kwargs = dict(fused=True) if backend in ("triton", "fused") else BACKENDS[backend]
    if backend == "triton":
        pytest.importorskip("triton")
        monkeypatch.setattr(_dispatch, "TRITON_DEVICES", {"cuda", "cpu"})
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 300))
    q = torch.nn.Parameter(p.detach().clone())
    opt = cls([p], lr=1e-2, min_8bit_size=1, **kwargs)
    ref = cls([q], lr=1e-2, min_8bit_size=1, foreach=False, fused=False)
    opt.grad_scale, opt.found_inf = torch.tensor(4.0), torch.tensor(2.0)
    p.grad = torch.full_like(p, math.inf)
    opt.step()
    assert torch.equal(p, q) and all(int(v.abs().sum()) == 0 for v in opt.state[p].values())
    opt.found_inf = torch.tensor(0.0)
    q.grad = torch.randn_like(q)
    p.grad = q.grad * 4.0
    opt.step()
    ref.step()
    assert opt.state[p]["step"].item() == 1
    assert p.isfinite().all()
    torch.testing.assert_close(p, q)


# ---------------------------------------------------------------------------------------------
# 9. stochastic rounding is refused under CUDA graph capture
# ---------------------------------------------------------------------------------------------


def _capturing(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("cls", [AdamW, Lion, Muon], ids=["AdamW", "Lion", "Muon"])
def test_stochastic_rounding_under_graph_capture_is_refused_before_anything_changed(cls, backend, monkeypatch):
    torch.manual_seed(0)
    first = torch.nn.Parameter(torch.randn(8, 8))
    last = torch.nn.Parameter(torch.randn(8, 8).to(torch.bfloat16))
    opt = cls([{"params": [first]}, {"params": [last], "stochastic_rounding": True}], **BACKENDS[backend])
    for p in (first, last):
        p.grad = torch.randn_like(p)
    opt.step()  # eager: allowed
    before = values(opt, [first, last])
    _capturing(monkeypatch)
    with pytest.raises(RuntimeError, match="stochastic rounding cannot be captured in a CUDA graph") as err:
        opt.step()
    assert "\n" not in str(err.value)
    assert_same_values(values(opt, [first, last]), before)
    assert opt.param_groups[1]["rounding_step"] == 1
    last.data, last.grad = last.data.float(), last.grad.float()  # nothing to round stochastically: captured
    opt.step()
    assert not torch.equal(first, before[0][0])


def test_the_functional_entry_refuses_rounding_seeds_under_graph_capture(monkeypatch):
    p, g = torch.ones(8, dtype=torch.bfloat16), torch.ones(8, dtype=torch.bfloat16)
    _capturing(monkeypatch)
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        adamw([p], [g], [torch.zeros(8)], [torch.zeros(8)], [torch.zeros(())], lr=1e-4, beta1=0.9, beta2=0.999,
              eps=1e-8, weight_decay=0.0, rounding_seeds=[1])
    assert torch.equal(p, torch.ones(8, dtype=torch.bfloat16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_capturing_a_step_with_stochastic_rounding_in_a_cuda_graph_is_refused():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 64, device="cuda").to(torch.bfloat16))
    opt = AdamW([p], stochastic_rounding=True)
    p.grad = torch.randn_like(p)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        opt.step()  # warm up eagerly, as capture wants
    torch.cuda.current_stream().wait_stream(side)
    before = values(opt, [p])
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="stochastic rounding cannot be captured in a CUDA graph"):
        with torch.cuda.graph(graph):
            opt.step()
    torch.cuda.synchronize()
    assert_same_values(values(opt, [p]), before)


# ---------------------------------------------------------------------------------------------
# 10. every tensor of an optimizer has its own rounding stream
# ---------------------------------------------------------------------------------------------

ROUNDING_BACKENDS = ["reference", "fused", "triton"]


def twin_groups(cls, backend, monkeypatch, **kwargs):
    """Two groups left at the default seed, each with the same bf16 tensors; the same gradients."""
    if backend == "triton":
        pytest.importorskip("triton")
        monkeypatch.setattr(_dispatch, "TRITON_DEVICES", {"cuda", "cpu"})
    torch.manual_seed(0)
    start = [torch.randn(16, 64).to(torch.bfloat16), torch.randn(300).to(torch.bfloat16)]
    groups = [[torch.nn.Parameter(v.clone()) for v in start] for _ in range(2)]
    backend_kwargs = dict(fused=True) if backend in ("fused", "triton") else BACKENDS[backend]
    opt = cls([{"params": g} for g in groups], lr=1e-3, stochastic_rounding=True, **backend_kwargs, **kwargs)
    return opt, groups


def step_twins(opt, groups, gen):
    grads = [torch.randn(p.shape, generator=gen).to(torch.bfloat16) for p in groups[0]]
    for group in groups:
        for p, g in zip(group, grads):
            p.grad = g.clone()
    opt.step()


@pytest.mark.parametrize("backend", ROUNDING_BACKENDS)
@pytest.mark.parametrize("cls", [AdamW, Lion], ids=["AdamW", "Lion"])
def test_groups_at_the_default_seed_round_differently_and_every_backend_as_the_reference(cls, backend, monkeypatch):
    opt, groups = twin_groups(cls, backend, monkeypatch)
    ref, ref_groups = twin_groups(cls, "reference", monkeypatch)
    gen, ref_gen = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for _ in range(3):
        step_twins(opt, groups, gen)
        step_twins(ref, ref_groups, ref_gen)
        for a, b in zip(*groups):
            assert not torch.equal(a, b)  # the same values and gradients, other random bits
        for group, ref_group in zip(groups, ref_groups):
            for p, q in zip(group, ref_group):
                assert torch.equal(p, q)  # the same bits as the reference's


def test_a_tensors_rounding_does_not_depend_on_which_others_have_gradients():
    """A tensor's stream is its place in the optimizer, not in this step's list of tensors."""
    results = []
    for first_has_grad in (True, False):
        torch.manual_seed(0)
        a, b = (torch.nn.Parameter(torch.randn(300).to(torch.bfloat16)) for _ in range(2))
        opt = AdamW([a, b], lr=1e-3, stochastic_rounding=True)
        a.grad = torch.ones_like(a) if first_has_grad else None
        b.grad = torch.full_like(b, 0.5)
        opt.step()
        results.append(b.detach().clone())
    assert torch.equal(*results)


@pytest.mark.parametrize("cls", [AdamW, Lion], ids=["AdamW", "Lion"])
def test_a_resumed_run_of_two_groups_is_bit_identical(cls, monkeypatch):
    opt, groups = twin_groups(cls, "fused", monkeypatch, seed=3)
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        step_twins(opt, groups, gen)
    buf = io.BytesIO()
    torch.save({"params": [[p.detach() for p in g] for g in groups], "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed_groups = [[torch.nn.Parameter(t.clone()) for t in g] for g in saved["params"]]
    resumed = cls([{"params": g} for g in resumed_groups], lr=1e-3, stochastic_rounding=True, fused=True, seed=3)
    resumed.load_state_dict(saved["opt"])
    resumed_gen = torch.Generator().manual_seed(5)
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        step_twins(opt, groups, gen)
        step_twins(resumed, resumed_groups, resumed_gen)
    for g, h in zip(groups, resumed_groups):
        for p, q in zip(g, h):
            assert torch.equal(p, q)


def test_an_empty_state_read_into_being_loads_and_saves_again_as_it_was():
    """Reading ``opt.state[p]`` for a parameter without state creates an empty one (torch.optim's
    state is a defaultdict); its checkpoint loads (into torch.optim.AdamW too) and saves again the same."""
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = AdamW([a, b])
    a.grad = torch.ones(3)
    opt.step()
    assert opt.state[b] == {}
    saved = opt.state_dict()
    assert saved["state"][1] == {}
    again = AdamW([torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))])
    again.load_state_dict(saved)
    assert_same_nested(again.state_dict(), saved)
    again.param_groups[0]["params"][1].grad = torch.ones(3)
    again.step()


def test_complex_parameters_take_complex_moments_only():
    """torch.optim.AdamW's checkpoint of a complex parameter (complex moments, exp_avg_sq with real
    parts >= 0) loads; real moments for it are refused, as complex ones are for a real parameter."""
    z = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.complex64))
    theirs = torch.optim.AdamW([z])
    z.grad = torch.randn_like(z)
    theirs.step()
    saved = theirs.state_dict()
    ours = AdamW([torch.nn.Parameter(z.detach().clone())])
    ours.load_state_dict(saved)
    bad = copy.deepcopy(saved)
    bad["state"][0]["exp_avg"] = bad["state"][0]["exp_avg"].real.contiguous()
    with pytest.raises(ValueError, match=r"state\['exp_avg'\] .*torch.float32 values for a torch.complex64 parameter"):
        ours.load_state_dict(bad)


# ----- issue 27, item 13: a slow path taken for stochastic rounding is said once -----


@pytest.mark.parametrize("backend, contiguous, reason", [
    ("triton", False, "not contiguous (shape (6, 4), strides (1, 6))"),
    ("foreach", True, "the foreach backend does not round stochastically"),
])
def test_rounded_parameters_sent_to_the_reference_off_the_cpu_are_warned_about_once(backend, contiguous, reason,
                                                                                    monkeypatch):
    """A bf16 parameter off the CPU with stochastic rounding that its backend cannot round (a
    non-contiguous one for the fused kernels, any for foreach) runs the reference, whose AdamW
    reads each step count on the host: one warning per process says so, naming the tensor."""
    monkeypatch.setattr(_dispatch, "_warned_slow_rounding", False)
    monkeypatch.setattr(_dispatch, "_route", lambda *a, **k: {backend: [0, 1]})
    first = torch.empty(4, 6, dtype=torch.bfloat16, device="meta")
    params = [first.t() if not contiguous else first.reshape(6, 4), torch.empty(8, device="meta")]
    lists = [params, [torch.empty_like(p) for p in params],
             *[[torch.empty_like(p, dtype=torch.float32) for p in params] for _ in range(2)],
             [torch.zeros((), device="meta") for _ in params]]
    hyper = {"rounding_seeds": [1, 2]}
    with pytest.warns(RuntimeWarning, match="stochastic rounding on meta run the reference") as record:
        routes = _dispatch.route(AdamW.backends, lists, hyper, foreach=None, fused=None)
    assert routes == {backend: [1], "reference": [0]}  # the float32 tensor stays where it was
    assert len(record) == 1 and reason in str(record[0].message) and "shown once" in str(record[0].message)
    with warnings.catch_warnings(action="error", category=RuntimeWarning):
        assert _dispatch.route(AdamW.backends, lists, hyper, foreach=None, fused=None) == routes


def test_rounded_cpu_parameters_sent_to_the_reference_are_not_warned_about(monkeypatch):
    """On the CPU the reference costs no device sync: nothing to say."""
    monkeypatch.setattr(_dispatch, "_warned_slow_rounding", False)
    model = tiny_model().to(torch.bfloat16)
    opt = AdamW(model.parameters(), lr=1e-3, stochastic_rounding=True, foreach=True)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with warnings.catch_warnings(action="error", category=RuntimeWarning):
        opt.step()

