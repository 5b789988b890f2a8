"""Multi-process training on this machine: 2 and 4 processes, gloo over loopback, each
spawn bounded in time. The workers (dist_workers.py) check every backend of every
optimizer of the table against a single-process run of the same global batch, and Muon
(its own model and groups: every kind of matrix it takes) the same way."""

from __future__ import annotations

import socket
import time

import dist_workers
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

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


@pytest.mark.parametrize("world", [2, 4])
def test_8bit_states_shard_with_fsdp2_and_zero_bit_identically(world):
    spawn(dist_workers.eight_bit, world)


@pytest.mark.parametrize(("save_world", "load_world"), [(2, 1), (1, 2)])
def test_dcp_checkpoint_of_8bit_states_reshards_and_training_continues_identically(tmp_path, save_world, load_world):
    spawn(dist_workers.dcp_save, save_world, str(tmp_path), 2, "8bit")
    spawn(dist_workers.dcp_load, load_world, str(tmp_path), 2, "8bit")


def test_muon_under_ddp_equals_one_process():
    spawn(dist_workers.muon_ddp, 2)


@pytest.mark.parametrize("world", [2, 4])
def test_muon_under_fsdp2_orthogonalises_whole_matrices_and_equals_one_process_bit_for_bit(world):
    spawn(dist_workers.muon_fsdp2, world)


def test_muon_as_zero_redundancy_optimizer_class_keeps_its_groups_and_equals_one_process():
    spawn(dist_workers.muon_zero, 2)


def test_muon_dcp_checkpoint_saved_at_2_ranks_resumes_at_1_and_4_identically(tmp_path):
    spawn(dist_workers.muon_dcp_save, 2, str(tmp_path), 2)
    spawn(dist_workers.muon_dcp_load, 1, str(tmp_path), 2)
    spawn(dist_workers.muon_dcp_load, 4, str(tmp_path), 2)


def test_workers_reference_is_deterministic():
    """The workers compare against a reference each computes itself: it must not depend on
    the process (same data, same initialisation)."""
    info = dist_workers.OPTIMIZERS[0]
    a, _ = dist_workers.reference(info, dist_workers.batches())
    b, _ = dist_workers.reference(info, dist_workers.batches())
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


TINY = ["--steps", "6", "--dim", "32", "--layers", "1", "--heads", "2", "--seq-len", "32", "--batch-size", "8",
        "--eval-every", "3", "--checkpoint-every", "3", "--warmup-steps", "2", "--no-progress"]


def demo(tmp_path, name: str, mode: str, *extra: str) -> dict:
    import json
    import subprocess
    import sys

    launcher = [sys.executable, "-m", "optimizer"] if mode == "none" else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "optimizer"]
    out = tmp_path / name
    done = subprocess.run([*launcher, "demo", "--distributed", mode, *TINY, "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}


def test_demo_under_torchrun_follows_the_single_process_run_and_resumes_across_modes(tmp_path):
    """`torchrun --nproc_per_node 2 -m optimizer demo --distributed ddp|fsdp2`: each rank trains on
    its half of the same global batches, so the losses are those of one process; a run stopped
    under FSDP2 resumes under DDP (checkpoints are unsharded) and ends where it would have."""
    single = demo(tmp_path, "single", "none")
    for mode in ("ddp", "fsdp2"):
        run = demo(tmp_path, mode, mode)
        assert run["world_size"] == 2
        for name, r in single["results"].items():
            ours = run["results"][name]["history"]
            for key in ("loss", "held_out"):
                torch.testing.assert_close(
                    torch.tensor(ours[key]), torch.tensor(r["history"][key]), rtol=1e-4, atol=1e-5
                )
    demo(tmp_path, "resumed", "fsdp2", "--stop-after", "4")
    resumed = demo(tmp_path, "resumed", "ddp", "--resume")
    for name, r in single["results"].items():
        torch.testing.assert_close(torch.tensor(resumed["results"][name]["history"]["loss"]),
                                   torch.tensor(r["history"]["loss"]), rtol=1e-4, atol=1e-5)


def test_demo_distributed_without_torchrun_says_how():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run([sys.executable, "-m", "optimizer", "demo", "--distributed", "fsdp2", *TINY],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2
    assert "Invalid --distributed: 'fsdp2' needs torchrun" in done.stderr and "Traceback" not in done.stderr
