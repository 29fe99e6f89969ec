"""Run a function in N spawned gloo processes and collect what each rank returns."""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import traceback
from datetime import timedelta

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, out_dir: str, timeout_s: float, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      # Inductor's graph cache bakes in process-group names; another test's
                      # groups must not be found there.
                      TORCHINDUCTOR_CACHE_DIR=os.path.join(out_dir, "inductor"))
    # Two cores shared by several ranks: more intra-op threads only add contention.
    import torch

    torch.set_num_threads(1)
    # A rank that waits longer than this for its peers fails instead of hanging the test run.
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
    try:
        result = ("ok", fn(*args))
    except BaseException:  # reported to the parent, which raises
        result = ("error", traceback.format_exc())
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout_s: float = 120) -> list:
    """Call ``fn(*args)`` on ``world_size`` CPU ranks (gloo); return the per-rank results."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_entry, args=(world_size, _free_port(), out_dir, timeout_s, fn, args),
                           nprocs=world_size, start_method="spawn")
        results = []
        for rank in range(world_size):
            with open(os.path.join(out_dir, f"rank{rank}.pkl"), "rb") as f:
                status, value = pickle.load(f)
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results.append(value)
        return results
