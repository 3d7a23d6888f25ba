"""One rank of a torch.distributed Gloo all_reduce sweep (CPU tensors, f32).

ci/cluster starts one copy per emulated host (`ip netns exec HOST ... python gloo_rank.py`);
the rank comes from the environment, as torchrun sets it: RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT (and GLOO_SOCKET_IFNAME=eth0, the host's shaped link).

Every iteration: fill the tensor with rank-dependent integers, barrier, time one all_reduce,
then check the WHOLE result (outside the timed region) against the exact sum. Rank 0 prints a
table in bps-bench's layout (nccl-tests convention: busbw = algbw * 2(n-1)/n) and, with
--json, writes the rows in bps-bench's --json format, so `bps-bench --compare` and --plot read it.

Usage: gloo_rank.py --sizes 4K:64M|4K,1M [--iters 10] [--warmup 2] [--json FILE]
Exit status: 0 = every result right; 1 = a wrong result (or an error).
"""
import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist


def parse_size(s):
    s = s.strip()
    m = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if s and s[-1].upper() in m:
        return int(s[:-1]) * m[s[-1].upper()]
    return int(s)


def parse_sizes(s):
    """`A:B` doubling, or a comma list (as bps-bench --sizes)."""
    if ":" in s:
        a, b = (parse_size(x) for x in s.split(":", 1))
        out = []
        while a <= b:
            out.append(a)
            a *= 2
        return out
    return [parse_size(x) for x in s.split(",")]


def human(b):
    for shift, unit in ((30, "G"), (20, "M"), (10, "K")):
        if b >= 1 << shift and b % (1 << shift) == 0:
            return f"{b >> shift}{unit}"
    return str(b)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="4K:64M")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json")
    a = p.parse_args()

    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
    )
    rows = []
    wrong_total = 0
    for size in parse_sizes(a.sizes):
        n = size // 4
        t = torch.empty(n, dtype=torch.float32)
        # Small integers: every sum is exact in f32, whatever order Gloo adds in.
        base = torch.arange(n, dtype=torch.float32).remainder_(1024)
        times, wrong = [], 0
        for it in range(a.warmup + a.iters):
            torch.add(base, float((rank + 1) * (it % 7 + 1)), out=t)
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(t)
            dt = time.perf_counter() - t0
            if it >= a.warmup:
                times.append(dt)
            # sum over ranks r of (base + (r+1)(it%7+1)) = world*base + (it%7+1)*world(world+1)/2
            want = base * world + float((it % 7 + 1) * world * (world + 1) // 2)
            if n and not torch.equal(t, want):
                wrong += 1
                if wrong <= 3:
                    first = int((t != want).nonzero()[0])
                    print(
                        f"gloo_rank: rank {rank}: WRONG result for {size} bytes iteration {it} "
                        f"(first difference at element {first})",
                        file=sys.stderr,
                        flush=True,
                    )
        times.sort()
        med = times[len(times) // 2]
        p99 = times[max(0, -(-len(times) * 99 // 100) - 1)]
        algbw = size / med / 1e9
        busbw = algbw * 2 * (world - 1) / world if world > 1 else algbw
        rows.append((size, med * 1e6, p99 * 1e6, algbw, busbw, wrong))
        wrong_total += wrong

    if rank == 0:
        print(f"# gloo all_reduce (torch {torch.__version__}): {world} ranks, {a.iters} timed iterations")
        print(f"{'size':>10} {'count':>12} {'type':>6} {'time(us)':>12} {'p99(us)':>12} {'algbw':>10} {'busbw':>10} {'wrong':>7}")
        print(f"{'(B)':>10} {'(elements)':>12} {'':>6} {'median':>12} {'':>12} {'(GB/s)':>10} {'(GB/s)':>10} {'':>7}")
        for size, med, p99, alg, bus, wrong in rows:
            print(f"{human(size):>10} {size // 4:>12} {'f32':>6} {med:>12.1f} {p99:>12.1f} {alg:>10.3f} {bus:>10.3f} {wrong:>7}")
        sys.stdout.flush()
        if a.json:
            doc = {
                "version": f"torch {torch.__version__}",
                "commit": "-",
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "host": socket.gethostname(),
                "op": "AllReduce (gloo)",
                "workers": world,
                "servers": 0,
                "tensors": 1,
                "iters": a.iters,
                "warmup": a.warmup,
                "check": True,
                "transport": "gloo tcp",
                "rows": [
                    {"bytes": s, "count": s // 4, "dtype": "f32", "time_us_median": m,
                     "time_us_p99": q, "algbw_gbs": al, "busbw_gbs": bu, "wrong": w}
                    for s, m, q, al, bu, w in rows
                ],
            }
            with open(a.json, "w") as f:
                json.dump(doc, f, indent=2)
    dist.destroy_process_group()
    if wrong_total:
        print(f"gloo_rank: rank {rank}: {wrong_total} wrong results", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
