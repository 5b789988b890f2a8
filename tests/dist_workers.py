"""What each process of the multi-process tests (test_distributed.py) runs: gloo on
loopback, CPU, float64 (so that a different order of summation in an all-reduce cannot
flip a sign in Lion). Every check compares against a single-process run of the same
global batch, computed in each worker; a mismatch raises, which fails the spawn. Each
optimizer runs with its table row's ``dist_hyper``; Muon, which the table's OPTIMIZERS leaves
out (no element-wise fused kernel), with its own model and groups (the end of this file)."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from helpers import BACKENDS as ALL_BACKENDS
from optim_table import OPTIMIZERS

from optimizer import AdamW8bit, Lion8bit, Muon

BACKENDS = {name: kw for name, kw in ALL_BACKENDS.items() if name != "default"}
STEPS = 4
# 8-bit states (float32 parameters; min_8bit_size=1 so that every matrix is quantised). Every
# rank trains on the whole batch: the averaged gradient is then exactly the single process's,
# and a sharded step can be compared bit for bit with the unsharded one.
EIGHT_BIT = [("AdamW8bit", AdamW8bit, dict(lr=1e-2, weight_decay=0.1, min_8bit_size=1)),
        ("Lion8bit", Lion8bit, dict(lr=1e-3, weight_decay=0.1, min_8bit_size=1))]


def setup(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)


def finish() -> None:
    """Leave the process group and exit at once. Gloo's worker threads may still hold work
    objects when the interpreter finalises, which can abort the process (SIGABRT, "terminate
    called without an active exception"; pytorch/pytorch#179291): every check has passed by
    now, so skip the finalisation."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def make_model(eight_bit: bool = False) -> torch.nn.Module:
    """Small, with sizes that do not divide by 4 (uneven FSDP2 shards, some of them empty); the
    8-bit runs' model is float32, with a row longer than one block of 256."""
    torch.manual_seed(0)
    if eight_bit:
        return torch.nn.Sequential(torch.nn.Linear(6, 301), torch.nn.GELU(), torch.nn.Linear(301, 3))
    return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.GELU(), torch.nn.Linear(10, 3)).double()


def runs(which: str) -> list[tuple[str, type, dict, bool]]:
    """(name, class, hyper-parameters, 8-bit or not) of the table's optimizers or of the 8-bit ones."""
    if which == "8bit":
        return [(name, cls, hyper, True) for name, cls, hyper in EIGHT_BIT]
    return [(info.name, info.cls, info.dist_hyper, False) for info in OPTIMIZERS]


def batches(
    n: int = STEPS, size: int = 8, dtype: torch.dtype = torch.float64
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 6, generator=gen, dtype=torch.float64).to(dtype),
             torch.randn(size, 3, generator=gen, dtype=torch.float64).to(dtype)) for _ in range(n)]


def eight_bit_train(model: torch.nn.Module, opt: torch.optim.Optimizer, data) -> None:
    """Every rank the whole batch (see EIGHT_BIT)."""
    train(model, opt, data)


def eight_bit_reference(cls, hyper, data, backend: dict) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The single-process run with the same backend: sharding must not change one bit (each
    backend is tied to the reference in test_8bit_c.py and test_8bit_triton.py)."""
    model = make_model(eight_bit=True)
    opt = cls(model.parameters(), **hyper, **backend)
    train(model, opt, data)
    return model, opt


def assert_same_state(opt, ref_opt, model, ref, what: str) -> None:
    for p, q in zip(model.parameters(), ref.parameters()):
        assert sorted(opt.state[p]) == sorted(ref_opt.state[q]), what
        for key, value in ref_opt.state[q].items():  # float states: torch's fused kernel may round a
            # shard's elements 1 ulp apart from the whole tensor's (other vector chunks)
            torch.testing.assert_close(full(opt.state[p][key]), value, rtol=1e-6, atol=1e-12,
                                       msg=lambda m: f"{what} {key}: {m}")


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, data, rank: int = 0, world: int = 1) -> None:
    for x, y in data:
        xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
        torch.nn.functional.mse_loss(model(xs), ys).backward()
        opt.step()
        opt.zero_grad()


def reference(info, data) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The single-process run of the same global batches, with the reference backend."""
    model = make_model()
    opt = info.cls(model.parameters(), **info.dist_hyper, foreach=False, fused=False)
    train(model, opt, data)
    return model, opt


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if type(t).__name__ == "DTensor" else t


def assert_same_params(model: torch.nn.Module, ref: torch.nn.Module, what: str, rtol: float = 1e-9) -> None:
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(
            full(p.detach()), q.detach(), rtol=rtol, atol=1e-12, msg=lambda m: f"{what}, {name}: {m}"
        )


def shard(model: torch.nn.Module, world: int) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def ddp(rank: int, world: int, port: int) -> None:
    """DDP: every rank ends with the parameters of the single-process run."""
    from torch.nn.parallel import DistributedDataParallel

    setup(rank, world, port)
    data = batches()
    for info in OPTIMIZERS:
        ref, _ = reference(info, data)
        for backend, kw in BACKENDS.items():
            model = DistributedDataParallel(make_model())
            train(model, info.cls(model.parameters(), **info.dist_hyper, **kw), data, rank, world)
            assert_same_params(model.module, ref, f"DDP {info.name} {backend} rank {rank}/{world}")
    finish()


def fsdp2(rank: int, world: int, port: int) -> None:
    """FSDP2: DTensor parameters, each rank updating its local shard, equal the unsharded run."""
    setup(rank, world, port)
    data = batches()
    for info in OPTIMIZERS:
        ref, ref_opt = reference(info, data)
        for backend, kw in BACKENDS.items():
            model = shard(make_model(), world)
            opt = info.cls(model.parameters(), **info.dist_hyper, **kw)
            train(model, opt, data, rank, world)
            assert_same_params(model, ref, f"FSDP2 {info.name} {backend} rank {rank}/{world}")
            for p, q in zip(model.parameters(), ref.parameters()):
                assert type(p).__name__ == "DTensor"
                for key, value in ref_opt.state[q].items():
                    torch.testing.assert_close(full(opt.state[p][key]), value, rtol=1e-9, atol=1e-12)
    finish()


def zero(rank: int, world: int, port: int) -> None:
    """ZeroRedundancyOptimizer with our optimizers as optimizer_class: the same parameters, and
    the consolidated (unsharded) state equals the single-process optimizer's state."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    setup(rank, world, port)
    data = batches()
    for info in OPTIMIZERS:
        ref, ref_opt = reference(info, data)
        for backend, kw in BACKENDS.items():
            model = DistributedDataParallel(make_model())
            opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=info.cls, **info.dist_hyper, **kw)
            train(model, opt, data, rank, world)
            assert_same_params(model.module, ref, f"ZeRO {info.name} {backend} rank {rank}/{world}")
            assert len(opt.optim.state) < len(list(model.parameters()))  # each rank holds a part of the state
            opt.consolidate_state_dict(to=0)
            if rank == 0:
                state = opt.state_dict()["state"]
                expected = ref_opt.state_dict()["state"]
                assert sorted(state) == sorted(expected)
                for i, s in expected.items():
                    for key, value in s.items():
                        torch.testing.assert_close(state[i][key], value, rtol=1e-9, atol=1e-12)
    finish()


def eight_bit(rank: int, world: int, port: int) -> None:
    """8-bit states under FSDP2 (codes and scales sharded by rows as the parameter) and under
    ZeroRedundancyOptimizer: parameters and states bit-identical to the unsharded run."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    setup(rank, world, port)
    data = batches(dtype=torch.float32)
    for name, cls, hyper, _ in runs("8bit"):
        for backend, kw in BACKENDS.items():
            ref, ref_opt = eight_bit_reference(cls, hyper, data, kw)
            model = shard(make_model(eight_bit=True), world)
            opt = cls(model.parameters(), **hyper, **kw)
            eight_bit_train(model, opt, data)
            assert_same_params(model, ref, f"FSDP2 {name} {backend} rank {rank}/{world}", rtol=1e-6)
            assert_same_state(opt, ref_opt, model, ref, f"FSDP2 {name} {backend} rank {rank}/{world}")
            for p in model.parameters():
                for key, value in opt.state[p].items():
                    if key.endswith("_scale"):  # sharded as the parameter: a shard's scales are its rows'
                        assert type(value).__name__ == "DTensor" and value.placements == p.placements, key
                        assert value.to_local().shape[0] == p.to_local().shape[0], key

            model = DistributedDataParallel(make_model(eight_bit=True))
            opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=cls, **hyper, **kw)
            eight_bit_train(model, opt, data)
            assert_same_params(model.module, ref, f"ZeRO {name} {backend} rank {rank}/{world}", rtol=1e-6)
            opt.consolidate_state_dict(to=0)
            if rank == 0:
                state, expected = opt.state_dict()["state"], ref_opt.state_dict()["state"]
                assert sorted(state) == sorted(expected)
                for i, s in expected.items():
                    for key, value in s.items():
                        torch.testing.assert_close(state[i][key], value, rtol=1e-6, atol=1e-12)
    finish()


def dcp_save(rank: int, world: int, port: int, where: str, first: int, which: str = "table") -> None:
    """Train ``first`` steps (FSDP2 if world > 1, else a plain model) and save with DCP."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    setup(rank, world, port)
    for name, cls, hyper, is_8bit in runs(which):
        data = batches(dtype=torch.float32 if is_8bit else torch.float64)[:first]
        for backend, kw in BACKENDS.items():
            model = shard(make_model(is_8bit), world) if world > 1 else make_model(is_8bit)
            opt = cls(model.parameters(), **hyper, **kw)
            if is_8bit:
                eight_bit_train(model, opt, data)
            else:
                train(model, opt, data, rank, world)
            state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
            dcp.save(state, checkpoint_id=os.path.join(where, f"{name}-{backend}"))
    finish()


def dcp_load(rank: int, world: int, port: int, where: str, first: int, which: str = "table") -> None:
    """Load the checkpoint at another world size, train the remaining steps, and end where a
    single uninterrupted run ends."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    setup(rank, world, port)
    for name, cls, hyper, is_8bit in runs(which):
        data = batches(dtype=torch.float32 if is_8bit else torch.float64)
        for backend, kw in BACKENDS.items():
            ref, _ = eight_bit_reference(cls, hyper, data, kw) if is_8bit else reference(
                next(i for i in OPTIMIZERS if i.name == name), data)
            model = shard(make_model(is_8bit), world) if world > 1 else make_model(is_8bit)
            opt = cls(model.parameters(), **hyper, **kw)
            state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
            dcp.load(state, checkpoint_id=os.path.join(where, f"{name}-{backend}"))
            set_model_state_dict(model, state["model"])
            set_optimizer_state_dict(model, opt, state["optim"])
            if is_8bit:
                eight_bit_train(model, opt, data[first:])
            else:
                train(model, opt, data[first:], rank, world)
            assert_same_params(
                model, ref, f"DCP {name} {backend}, resumed at world {world}", rtol=1e-6 if is_8bit else 1e-9
            )
    finish()


# ----- Muon (Note [Muon under FSDP2] in optimizer/muon.py) -----------------------------------
# Muon's matrices are orthogonalised whole: under FSDP2 each rank's rows are gathered on an
# owner rank and sent back. Its runs use a model of every kind of Muon matrix, and (as the
# 8-bit runs) every rank trains on the whole batch, so that the averaged gradient is exactly
# the single process's and a sharded step can be compared bit for bit with the unsharded one.
MUON_STEPS = 20
MUON_HYPER = dict(lr=0.02, weight_decay=0.1)  # what every group takes (ZeRO copies these into every group)
MUON_DCP_RUNS = [("float", torch.float64, {}),
                 ("8bit", torch.float32, dict(state_dtype=torch.uint8, min_8bit_size=1))]


class MuonNet(torch.nn.Module):
    """A fused QKV weight cut by ``split`` into blocks of 7, 8 and 6 rows (each with its own lr
    scale; the blocks cross the shard boundaries), a stack of 3 experts, a tall matrix, a Conv2d
    kernel (4-D: one flattened matrix), a Conv1d kernel (a group with ``flatten=True``) and a
    wide output matrix; the biases in an AdamW group. Row counts 21, 3, 11, 4, 3, 3: the shards
    are uneven, and at 4 ranks the last shard of the stack and of three matrices is empty."""

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.qkv = torch.nn.Linear(6, 21)
        self.experts = torch.nn.Parameter(torch.randn(3, 5, 21) / 5)
        self.tall = torch.nn.Linear(5, 11)
        self.conv2d = torch.nn.Conv2d(1, 4, 2)
        self.conv1d = torch.nn.Conv1d(1, 3, 3)
        self.out = torch.nn.Linear(11 + 8 + 9, 3)
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gelu = torch.nn.functional.gelu
        h = gelu(self.qkv(x))
        z = gelu(torch.einsum("bi,eoi->bo", h, self.experts))
        c2 = gelu(self.conv2d(x.reshape(-1, 1, 2, 3))).flatten(1)
        c1 = gelu(self.conv1d(z.unsqueeze(1))).flatten(1)
        return self.out(torch.cat([gelu(self.tall(z)), c2, c1], 1))


def muon_groups(model: torch.nn.Module) -> list[dict]:
    """Muon's groups: the fused weight (``split``), the Conv1d kernel (``flatten``), the other
    matrices, the biases (AdamW). (Under ZeRO the one-tensor groups are empty on every rank but
    one: empty groups are kept, as torch.optim keeps them.)"""
    m = model.module if hasattr(model, "module") else model
    others = {"params": [m.experts, m.tall.weight, m.conv2d.weight, m.out.weight], "adjust_lr_fn": "match_rms_adamw",
              "nesterov": False}
    biases = {"params": [m.qkv.bias, m.tall.bias, m.conv2d.bias, m.conv1d.bias, m.out.bias], "use_muon": False,
              "lr": 3e-3, "betas": (0.9, 0.99)}
    return [{"params": [m.qkv.weight], "split": [7, 8, 6]}, {"params": [m.conv1d.weight], "flatten": True},
            others, biases]


def muon_shard(model: torch.nn.Module, world: int) -> torch.nn.Module:
    """FSDP2 on the whole model: every parameter a DTensor sharded along dim 0."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    return fully_shard(model, mesh=init_device_mesh("cpu", (world,)))


def muon_reference(data, backend: dict, dtype: torch.dtype = torch.float64, **extra):
    """The single-process run, with the same backend."""
    model = MuonNet(dtype)
    opt = Muon(muon_groups(model), **MUON_HYPER, **extra, **backend)
    train(model, opt, data)
    return model, opt


def assert_identical(model: torch.nn.Module, opt, ref: torch.nn.Module, ref_opt, what: str) -> None:
    """Parameters and states bit for bit; states sharded as their parameter."""
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(full(p.detach()), q.detach()), f"{what}, {name}: {(full(p.detach()) - q).abs().max()}"
        assert sorted(opt.state[p]) == sorted(ref_opt.state[q]), f"{what}, {name}"
        for key, value in ref_opt.state[q].items():
            assert torch.equal(full(opt.state[p][key]), value), f"{what}, {name} state[{key!r}]"
            if type(p).__name__ == "DTensor" and value.dim() > 0:  # sharded as the parameter
                state = opt.state[p][key]
                assert type(state).__name__ == "DTensor" and state.placements == p.placements, f"{what}, {key}"
                assert state.to_local().shape[0] == p.to_local().shape[0], f"{what}, {key}"


def assert_muon_run(model: torch.nn.Module, opt, ref: torch.nn.Module, ref_opt, backend: str, what: str) -> None:
    """:func:`assert_identical`; with ``fused=True`` to rounding: the AdamW groups' fused kernel
    may round a shard's elements 1 ulp apart from the whole tensor's (see assert_same_state), and
    the gradients carry that into the matrices."""
    if backend != "fused":
        assert_identical(model, opt, ref, ref_opt, what)
        return
    assert_same_params(model, ref, what, rtol=1e-9 if next(ref.parameters()).dtype == torch.float64 else 1e-6)
    assert_same_state(opt, ref_opt, model, ref, what)


def muon_ddp(rank: int, world: int, port: int) -> None:
    """DDP needs nothing: every rank ends with the single-process run's parameters."""
    from torch.nn.parallel import DistributedDataParallel

    setup(rank, world, port)
    data = batches(STEPS)
    for backend, kw in BACKENDS.items():
        ref, _ = muon_reference(data, kw)
        model = DistributedDataParallel(MuonNet())
        train(model, Muon(muon_groups(model), **MUON_HYPER, **kw), data, rank, world)
        assert_same_params(model.module, ref, f"DDP Muon {backend} rank {rank}/{world}")
    finish()


def muon_fsdp2(rank: int, world: int, port: int) -> None:
    """FSDP2: 20 steps of every backend, float momentum and 8-bit momentum, equal the single
    process's bit for bit (every rank on the whole batch); the state is sharded as the parameter.
    Then, each rank on its share of the batch as the other optimizers' runs, to rounding."""
    setup(rank, world, port)
    for dtype, extra in ((torch.float64, {}), (torch.float32, dict(state_dtype=torch.uint8, min_8bit_size=1))):
        data = batches(MUON_STEPS, dtype=dtype)
        for backend, kw in BACKENDS.items():
            what = f"FSDP2 Muon {backend} {extra or dtype} rank {rank}/{world}"
            ref, ref_opt = muon_reference(data, kw, dtype, **extra)
            model = muon_shard(MuonNet(dtype), world)
            opt = Muon(muon_groups(model), **MUON_HYPER, **extra, **kw)
            train(model, opt, data)
            assert_muon_run(model, opt, ref, ref_opt, backend, what)
            if extra:
                assert opt.state[model.qkv.weight]["momentum_buffer"].dtype == torch.uint8, what
    data = batches()
    for backend, kw in BACKENDS.items():
        ref, _ = muon_reference(data, kw)
        model = muon_shard(MuonNet(), world)
        train(model, Muon(muon_groups(model), **MUON_HYPER, **kw), data, rank, world)
        assert_same_params(model, ref, f"FSDP2 Muon {backend}, a share of the batch, rank {rank}/{world}")
    finish()


def muon_zero(rank: int, world: int, port: int) -> None:
    """ZeroRedundancyOptimizer with Muon as optimizer_class, its groups (use_muon, split...)
    carried through: the single process's parameters, and its state once consolidated."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    setup(rank, world, port)
    data = batches(STEPS)
    for backend, kw in BACKENDS.items():
        what = f"ZeRO Muon {backend} rank {rank}/{world}"
        ref, ref_opt = muon_reference(data, kw)
        model = DistributedDataParallel(MuonNet())
        # Muon's and AdamW's own options given to ZeRO, which copies them into every group
        opt = ZeroRedundancyOptimizer(muon_groups(model), optimizer_class=Muon, **MUON_HYPER, **kw, momentum=0.95,
                                      adamw_betas=(0.9, 0.95))
        assert [g["use_muon"] for g in opt.optim.param_groups] == [True, True, True, False], what
        assert [] in [g["params"] for g in opt.optim.param_groups], what  # a one-tensor group: empty here
        train(model, opt, data, rank, world)
        assert_same_params(model.module, ref, what)
        assert 0 < len(opt.optim.state) < len(list(model.parameters())), what  # each rank a part of the state
        opt.consolidate_state_dict(to=0)
        if rank == 0:
            state, expected = opt.state_dict()["state"], ref_opt.state_dict()["state"]
            assert sorted(state) == sorted(expected), what
            for i, s in expected.items():
                assert sorted(state[i]) == sorted(s), what
                for key, value in s.items():
                    torch.testing.assert_close(state[i][key], value, rtol=1e-9, atol=1e-12,
                                               msg=lambda m, key=key: f"{what} {key}: {m}")
    finish()


def muon_dcp_save(rank: int, world: int, port: int, where: str, first: int) -> None:
    """Train ``first`` steps under FSDP2 (a plain model at world 1), float and 8-bit momentum, and save with DCP."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    setup(rank, world, port)
    for name, dtype, extra in MUON_DCP_RUNS:
        data = batches(STEPS, dtype=dtype)[:first]
        for backend, kw in BACKENDS.items():
            model = muon_shard(MuonNet(dtype), world) if world > 1 else MuonNet(dtype)
            opt = Muon(muon_groups(model), **MUON_HYPER, **extra, **kw)
            train(model, opt, data)
            state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
            dcp.save(state, checkpoint_id=os.path.join(where, f"{name}-{backend}"))
    finish()


def muon_dcp_load(rank: int, world: int, port: int, where: str, first: int) -> None:
    """Load at another world size, train the remaining steps, end where one uninterrupted run
    ends, bit for bit."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    setup(rank, world, port)
    for name, dtype, extra in MUON_DCP_RUNS:
        data = batches(STEPS, dtype=dtype)
        for backend, kw in BACKENDS.items():
            ref, ref_opt = muon_reference(data, kw, dtype, **extra)
            model = muon_shard(MuonNet(dtype), world) if world > 1 else MuonNet(dtype)
            opt = Muon(muon_groups(model), **MUON_HYPER, **extra, **kw)
            state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
            dcp.load(state, checkpoint_id=os.path.join(where, f"{name}-{backend}"))
            set_model_state_dict(model, state["model"])
            set_optimizer_state_dict(model, opt, state["optim"])
            train(model, opt, data[first:])
            assert_muon_run(model, opt, ref, ref_opt, backend, f"DCP Muon {name} {backend}, resumed at world {world}")
    finish()

