"""What each process of the multi-process tests (test_distributed.py) runs: gloo on
loopback, CPU, float64 (so that a different order of summation in an all-reduce cannot
flip a sign in Lion). Every check compares against a single-process run of the same
global batch, computed in each worker; a mismatch raises, which fails the spawn. Each
optimizer runs with its table row's ``dist_hyper``."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from helpers import BACKENDS as ALL_BACKENDS
from optim_table import OPTIMIZERS

from optimizer import AdamW8bit, Lion8bit

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
