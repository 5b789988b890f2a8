"""The demo under ``torchrun``: DDP or FSDP2 (``--distributed ddp|fsdp2``).

Every rank draws the same global batch from the same seeded sampler and trains on its
slice of the rows, so a run on N processes follows the single-process run of the same
settings (to rounding); the logged loss is the mean over ranks. Checkpoints hold full,
unsharded state dicts (``torch.distributed.checkpoint.state_dict`` with
``full_state_dict``), written by rank 0, so they load at any world size. Only rank 0
prints and writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class World:
    mode: str = "none"
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def start(mode: str, device: str) -> tuple[World, torch.device]:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA); the device of this rank."""
    if mode == "none":
        return World(), torch.device(device)
    if "RANK" not in os.environ:
        raise ValueError(f"Invalid --distributed: {mode!r} needs torchrun, e.g. "
                         f"torchrun --nproc_per_node 2 -m optimizer demo --distributed {mode}")
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return World(mode, dist.get_rank(), dist.get_world_size()), dev


def stop(world: World) -> None:
    """Leave the process group once every rank is done and nothing holds its work objects
    (gloo aborts the process at exit if its threads still hold some: pytorch/pytorch#179291)."""
    if world.mode != "none" and dist.is_initialized():
        import gc

        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
        gc.collect()


def wrap(model: torch.nn.Module, world: World) -> torch.nn.Module:
    """DDP around the model, or FSDP2 on each block and the root (parameters become DTensor shards)."""
    if world.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    if world.mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        return fully_shard(model)
    return model


def rows(batch: torch.Tensor, world: World) -> torch.Tensor:
    """This rank's rows of the global batch."""
    if batch.shape[0] % world.size:
        raise ValueError(f"Invalid batch_size: {batch.shape[0]} does not split over {world.size} processes")
    return batch.chunk(world.size)[world.rank]


def mean(value: torch.Tensor, world: World) -> float:
    """The mean over ranks of a scalar."""
    if world.mode == "none":
        return value.item()
    value = value.detach().clone()
    dist.all_reduce(value)
    return value.item() / world.size


def any_rank(flag: bool, world: World, device: torch.device) -> bool:
    """Whether ``flag`` is set on any rank (a signal may reach the ranks between two different steps)."""
    if world.mode == "none":
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


_DTYPE_KEYS = ("state_dtype",)  # group options that hold a torch.dtype


def _dtypes_as_text(opt: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """An optimizer's ``state_dict`` post-hook: torch.distributed.checkpoint's full state dicts take
    no ``torch.dtype`` values (``ValueError: Unexpected value type``), so ``state_dtype`` is written
    as its name (``"torch.uint8"``) in the packed param_groups (copies: the optimizer keeps its own)."""
    for group in state_dict["param_groups"]:
        for key in _DTYPE_KEYS:
            if isinstance(group.get(key), torch.dtype):
                group[key] = str(group[key])
    return state_dict


def _dtypes_from_text(opt: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """The ``load_state_dict`` pre-hook that reads what :func:`_dtypes_as_text` wrote."""
    groups = []
    for group in state_dict["param_groups"]:
        group = dict(group)
        for key in _DTYPE_KEYS:
            value = group.get(key)
            if isinstance(value, str) and isinstance(getattr(torch, value.removeprefix("torch."), None), torch.dtype):
                group[key] = getattr(torch, value.removeprefix("torch."))
        groups.append(group)
    return {**state_dict, "param_groups": groups}


def prepare_optimizer(opt: torch.optim.Optimizer, world: World) -> torch.optim.Optimizer:
    """Under torchrun, let the optimizer's state dict pass through torch.distributed.checkpoint
    (:func:`full_state`, :func:`load_full_state`) with its dtype options."""
    if world.mode != "none":
        opt.register_state_dict_post_hook(_dtypes_as_text)
        opt.register_load_state_dict_pre_hook(_dtypes_from_text)
    return opt


def full_state(model: torch.nn.Module, opt: torch.optim.Optimizer, world: World) -> tuple[dict, dict]:
    """Model and optimizer state dicts, unsharded on the CPU (every rank must call this)."""
    if world.mode == "none":
        return model.state_dict(), opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model: torch.nn.Module, opt: torch.optim.Optimizer, model_sd: dict, opt_sd: dict,
                    world: World) -> None:
    if world.mode == "none":
        model.load_state_dict(model_sd)
        opt.load_state_dict(opt_sd)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=opt_sd,
                   options=StateDictOptions(full_state_dict=True))


def local_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state this rank holds (a DTensor counts its local shard)."""
    from .._tensors import local

    return sum(local(v).numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if torch.is_tensor(v))


def local_numel(model: torch.nn.Module) -> int:
    """Parameters this rank holds (a DTensor counts its local shard): what ``local_bytes`` is per."""
    from .._tensors import local

    return sum(local(p).numel() for p in model.parameters())


def describe(world: World) -> str:
    return "" if world.mode == "none" else f", {world.mode} on {world.size} processes"


def barrier(world: World) -> None:
    if world.mode != "none":
        dist.barrier()


__all__: list[Any] = ["World", "start", "stop", "wrap", "rows", "mean", "any_rank", "prepare_optimizer", "full_state",
                      "load_full_state", "local_bytes", "local_numel", "describe", "barrier"]
