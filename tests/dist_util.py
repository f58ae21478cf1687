"""Run a function in several gloo processes on the CPU (the 2-process vs 1-process tests)."""
import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, fn, args, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_world(fn, world=2, args=()):
    """Call fn(rank, world, *args) in `world` gloo processes; return the list of their results.
    fn must be a module-level function; results are saved with torch.save (tensors, dicts). A gloo
    connection reset between the local processes (seen once in a CI dry run with other jobs on the
    machine, never alone) is retried once on a new port; any other error fails the test."""
    for attempt in (0, 1):
        with tempfile.TemporaryDirectory() as d:
            try:
                mp.spawn(_worker, args=(world, _free_port(), fn, args, d), nprocs=world, join=True)
            except mp.ProcessRaisedException as e:
                if attempt or "Connection reset by peer" not in str(e):
                    raise
                continue
            return [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=False) for r in range(world)]
