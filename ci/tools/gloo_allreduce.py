"""torch.distributed Gloo all_reduce on CPU tensors, one process per rank: the peer bps is
compared with. Prints one line per size in the nccl-tests convention:
busbw = algbw * 2(n-1)/n. Usage: gloo_allreduce.py --ranks 4 --sizes 64M [--iters 10]
(rank processes are spawned here; MASTER_ADDR/PORT chosen locally)."""
import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def parse_size(s):
    m = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * m[s[-1]] if s[-1] in m else int(s)


def run(rank, world, port, sizes, iters, warmup, out):
    os.environ["MASTER_ADDR"] = os.environ.get("GLOO_MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rows = []
    for size in sizes:
        t = torch.ones(size // 4, dtype=torch.float32) * (rank + 1)
        times = []
        for i in range(warmup + iters):
            t.fill_(rank + 1)
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(t)
            dt = time.perf_counter() - t0
            if i >= warmup:
                times.append(dt)
            expect = world * (world + 1) / 2
            assert float(t[0]) == expect and float(t[-1]) == expect, "wrong all_reduce result"
        med = statistics.median(times)
        algbw = size / med / 1e9
        rows.append((size, med * 1e6, algbw, algbw * 2 * (world - 1) / world))
    if rank == 0:
        for size, us, alg, bus in rows:
            out.append(f"gloo all_reduce ranks={world} bytes={size} time_us={us:.1f} algbw={alg:.3f} busbw={bus:.3f}")
            print(out[-1], flush=True)
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--sizes", default="64M")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    a = p.parse_args()
    sizes = [parse_size(s) for s in a.sizes.split(",")]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(run, args=(a.ranks, port, sizes, a.iters, a.warmup, []), nprocs=a.ranks, join=True)


if __name__ == "__main__":
    main()
