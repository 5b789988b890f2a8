"""Multi-process training on this machine: 2 and 4 processes, gloo over loopback, each
spawn bounded in time. The workers (dist_workers.py) check every backend of every
optimizer of the table against a single-process run of the same global batch."""

from __future__ import annotations

import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dist_workers

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")
TIMEOUT = 300  # seconds for one spawn, all processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world: int, *args) -> None:
    """Run ``fn(rank, world, port, *args)`` in ``world`` processes; re-raise the first failure."""
    context = mp.start_processes(fn, args=(world, free_port(), *args), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + TIMEOUT
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"{fn.__name__} at world size {world} did not finish in {TIMEOUT} s")


@pytest.mark.parametrize("world", [2, 4])
def test_ddp_equals_one_process(world):
    spawn(dist_workers.ddp, world)


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp2_sharded_steps_equal_the_unsharded_step(world):
    spawn(dist_workers.fsdp2, world)


def test_zero_redundancy_optimizer_takes_ours_and_its_state_equals_the_unsharded_one():
    spawn(dist_workers.zero, 2)


@pytest.mark.parametrize(("save_world", "load_world"), [(2, 1), (1, 2)])
def test_dcp_checkpoint_reshards_and_training_continues_identically(tmp_path, save_world, load_world):
    spawn(dist_workers.dcp_save, save_world, str(tmp_path), 2)
    spawn(dist_workers.dcp_load, load_world, str(tmp_path), 2)


def test_workers_reference_is_deterministic():
    """The workers compare against a reference each computes itself: it must not depend on
    the process (same data, same initialisation)."""
    info = dist_workers.OPTIMIZERS[0]
    a, _ = dist_workers.reference(info, dist_workers.batches())
    b, _ = dist_workers.reference(info, dist_workers.batches())
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
