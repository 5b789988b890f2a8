"""The Triton kernels' launch plans (Note [launch plans] in _fused_triton.py), the learning rate a
launch takes (Note [fused GPU]) and the vector accesses of tensors off a 16-byte boundary (Note
[alignment]).

Without a GPU the kernels run in Triton's interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1; the fixture triton_on_this_device sends CPU parameters to them, as in test_fused_triton.py)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from optim_table import OPTIMIZERS

triton = pytest.importorskip("triton")

from optimizer import AdamW, AdamW8bit, Lion8bit  # noqa: E402
from optimizer import _fused_triton as FT  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EIGHT_BIT = [AdamW8bit, Lion8bit]
ALL = [info.cls for info in OPTIMIZERS] + EIGHT_BIT


pytestmark = pytest.mark.usefixtures("triton_on_this_device")  # (conftest.py)


@pytest.fixture
def builds(monkeypatch):
    """The tables built (one per launch of a plan built; one launch a group in these tests): their
    rows, and weak references to the tensor table and the block table."""
    calls = []
    tables = FT._tables

    def counting(*args, **kwargs):
        out = tables(*args, **kwargs)
        calls.append((args[0], weakref.ref(out[0]), weakref.ref(out[1])))
        return out

    monkeypatch.setattr(FT, "_tables", counting)
    return calls


def layerwise(cls, n_groups, **kw):
    """An optimizer over ``n_groups`` groups of two small tensors each, the learning rate decaying
    by layer (as timm's ``layer_decay`` and LLRD fine-tuning make), gradients set once."""
    gen = torch.Generator().manual_seed(0)
    groups = []
    for i in range(n_groups):
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(DEVICE)) for s in ((2, 16), (3, 32))]
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(DEVICE)
        groups.append({"params": params, "lr": 1e-3 * 0.9 ** (n_groups - i)})
    if cls in EIGHT_BIT:
        kw["min_8bit_size"] = 1
    return cls(groups, fused=True, **kw)


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_forty_groups_build_their_plans_once_and_a_moved_gradient_rebuilds_its_group_alone(cls, builds):
    """40 groups build 40 plans at the first step and none after (a cache of the last 32 plans
    rebuilt all 40 every step); a new gradient in one group rebuilds that group's plan only, and
    of it the tensor table only: the block table depends on the sizes alone."""
    opt = layerwise(cls, 40)
    opt.step()
    assert len(builds) == 40
    for _ in range(2):
        opt.step()
        assert len(builds) == 40
    p = opt.param_groups[7]["params"][1]
    old = p.grad  # held: the new gradient cannot take its memory
    p.grad = old.clone()
    opt.step()
    assert len(builds) == 41 and builds[-1][0][1][1] == p.grad.data_ptr()  # rows: p, g, ... of group 7's tensors
    assert builds[-1][2]() is builds[7][2]() is not None
    opt.step()
    assert len(builds) == 41


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_a_groups_plan_goes_with_its_optimizer(cls, builds):
    """The tables live as long as the group's state, no longer."""
    before = set(FT._PLANS)
    opt = layerwise(cls, 3)
    opt.step()
    assert len(builds) == 3 and all(table() is not None and blocks() is not None for _, table, blocks in builds)
    del opt
    gc.collect()
    assert all(table() is None and blocks() is None for _, table, blocks in builds)
    assert set(FT._PLANS) <= before


@pytest.mark.parametrize("cls", [AdamW, Lion8bit], ids=lambda c: c.__name__)
def test_tables_a_captured_graph_reads_outlive_a_rebuild(cls, builds, monkeypatch):
    """A plan launched during CUDA graph capture is kept when its group's gradients move (the graph
    replays its tables); one launched outside capture is freed. (Capture simulated: the interpreter
    has no graphs.)"""
    capturing = [False]
    monkeypatch.setattr(FT, "_capturing", lambda device: capturing[0], raising=False)
    opt = layerwise(cls, 1)
    p = opt.param_groups[0]["params"][0]
    held = []  # the gradients replaced: held, so that no new one takes their memory

    def step_with_a_new_gradient(opt, p):
        held.append(p.grad)
        p.grad = p.grad.clone()
        opt.step()
        gc.collect()

    opt.step()
    capturing[0] = True
    step_with_a_new_gradient(opt, p)  # rebuilt, and launched under capture
    capturing[0] = False
    step_with_a_new_gradient(opt, p)
    step_with_a_new_gradient(opt, p)
    alive = [table() is not None for _, table, _ in builds]
    assert alive == [False, True, False, True]  # launched outside capture only: freed with its plan
    del opt, p
    gc.collect()
    assert all(table() is None for _, table, _ in builds)  # what a graph reads lives as long as its group's state


# ----- the learning rate a launch takes (Note [fused GPU]) ----------------------------------

@pytest.mark.parametrize("args", [FT._lr_args, FT._lr_args_8bit], ids=["float kernels", "8-bit kernels"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_a_cpu_tensor_lr_reaches_a_gpu_launch_as_a_float_lr_does(args, dtype, monkeypatch):
    """``lr=torch.tensor(1e-3)`` (torch.compile's recipe) for a launch on a GPU: its value read on
    the host, where no device waits, and passed as the float lr of that value is, so the launch
    is the same and its results the same bits. (Copying it there was a blocking copy every
    launch; here, without a GPU, the copy itself fails.)"""
    monkeypatch.setattr(FT, "_capturing", lambda device: False, raising=False)  # no graph (and no GPU to ask)
    lr = torch.tensor(1e-3, dtype=dtype)
    cuda = torch.device("cuda", 0)
    got = args(lr, cuda)
    assert got == args(float(lr), cuda) and type(got[1]) is float
    assert got == (None, float(lr), False)


def test_a_tensor_lr_on_the_launchs_device_is_loaded_there():
    """A tensor lr on the launch's device is what the kernel loads (a scheduler may write it under a
    CUDA graph); the interpreter's CPU launches take a CPU tensor so, which keeps that path tested."""
    lr = torch.tensor(1e-3, device=DEVICE)
    for args in (FT._lr_args, FT._lr_args_8bit):
        t, _, is_tensor = args(lr, lr.device)
        assert is_tensor and t.device == lr.device and t.item() == lr.item()


def test_a_cpu_tensor_lr_under_cuda_graph_capture_is_refused_in_one_line(monkeypatch):
    """A graph would replay the value read at capture, whatever a scheduler writes later."""
    monkeypatch.setattr(FT, "_capturing", lambda device: device.type == "cuda", raising=False)
    for args in (FT._lr_args, FT._lr_args_8bit):
        with pytest.raises(RuntimeError, match=r"^lr is a CPU tensor.*device='cuda:0'\)$"):
            args(torch.tensor(1e-3), torch.device("cuda", 0))
        assert args(1e-3, torch.device("cuda", 0)) == (None, 1e-3, False)  # a float is what the user chose


# ----- tensors off a 16-byte boundary (Note [alignment]) ------------------------------------

def bucket_view(t, offset):
    """``t``'s values in a view of a flat buffer at ``offset`` elements, as DDP's gradient buckets."""
    flat = torch.zeros(offset + t.numel() + 3, dtype=t.dtype, device=t.device)
    view = flat[offset:offset + t.numel()].view(t.shape)
    view.copy_(t)
    return view


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_a_gradient_off_a_16_byte_boundary_leaves_the_other_streams_vectors(cls, monkeypatch):
    """A gradient at an odd offset of a bucket: the parameter and states keep 16-byte vector accesses
    (the launch's ALIGNED mask, or the tensor's column in an 8-bit table, has every stream's bit but
    the gradient's; before, none), and the step is the one an aligned gradient gives, bit for bit."""
    eight = cls in EIGHT_BIT
    seen = []
    name = "_adamw8bit_kernel" if cls is AdamW8bit else "_lion8bit_kernel" if cls is Lion8bit else \
        next(info.triton_kernel for info in OPTIMIZERS if info.cls is cls)
    kernel = getattr(FT, name)

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(args[0][:, -1].tolist() if eight else kwargs["ALIGNED"])
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(FT, name, Spy())
    gen = torch.Generator().manual_seed(1)
    start = torch.randn(2, 512, generator=gen).to(DEVICE)
    grads = [torch.randn(2, 512, generator=gen).to(DEVICE) for _ in range(3)]
    kw = dict(min_8bit_size=1) if eight else {}
    params = {k: torch.nn.Parameter(start.clone()) for k in ("aligned", "view")}
    opts = {k: cls([p], lr=1e-2, weight_decay=0.1, fused=True, **kw) for k, p in params.items()}
    for g in grads:
        params["aligned"].grad = g.clone()
        params["view"].grad = bucket_view(g, 1)
        for k in ("aligned", "view"):
            opts[k].step()
        assert torch.equal(params["view"], params["aligned"])
        for key, v in opts["aligned"].state[params["aligned"]].items():
            assert torch.equal(opts["view"].state[params["view"]][key], v), key
    streams = 4 if cls in (AdamW, AdamW8bit) else 3
    every = (1 << streams) - 1
    assert params["view"].grad.data_ptr() % 16 != 0
    expected = [[every], [every - 2]] if eight else [every, every - 2]  # the aligned run's launch, the view's
    assert seen[-2:] == expected


def test_8bit_rows_off_16_elements_take_the_scalar_variant():
    """An 8-bit tensor whose rows do not start at multiples of 16 elements has no vector variant,
    whatever its addresses; its other patterns are those the kernels compile (Note [alignment])."""
    assert FT._aligned_8bit(100, [0, 0, 0, 0]) == 0
    assert FT._aligned_8bit(512, [0, 0, 0, 0]) == 15 and FT._aligned_8bit(512, [0, 4, 0, 0]) == 13
    assert FT._aligned_8bit(512, [4, 0, 0, 0]) == 0 and FT._aligned_8bit(512, [0, 4, 0]) == 5
