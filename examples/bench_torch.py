"""Overhead of the bps.torch layer: push_pull through bps.torch against the native module
called directly with raw pointers (no torch wrapping), for sizes 4 B ... 64 MiB.

    bps-launch --workers 2 -- python examples/bench_torch.py
    bps-launch --workers 2 -- python examples/bench_torch.py --max-size 4M --rounds 3

Methods, all averaging float32 in place and waiting for the result:
  native     bps._native.push_pull_async(name, dtype, ptr, ptr, nbytes, ...) + bps._native.wait
             on addresses computed once (the floor the plugin can reach)
  inplace    bps.torch.push_pull_inplace(tensor, name=...)
  outplace   bps.torch.push_pull(tensor, name=...)   (allocates the output tensor per call)

For each size the three methods run --rounds rounds of N calls each (N fixed per size,
identical on every worker, as push_pull is collective): below --block-below (1 MiB) as one
timed block per method and round (the figure is the median block mean), from there on
interleaved call by call (the figure is the median single call), so that load bursts on a
shared machine hit every method alike. Rank 0 prints the table, the per-call overhead for small
tensors (<= 4 KiB) and the time ratio plugin/native at >= 4 MiB.
"""

import argparse
import json
import statistics
import time

import torch

import bps.torch as bps
from bps import _native


def parse_size(s):
    s = s.strip().upper()
    mult = 1
    for suffix, m in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30)):
        if s.endswith(suffix):
            s, mult = s[:-1], m
            break
    return int(s) * mult


def human(n):
    for unit, m in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= m:
            return "%d %s" % (n // m, unit)
    return "%d B" % n


def calls_for(nbytes, budget):
    # about `budget` bytes per round, at least 3 and at most 400 calls
    return max(3, min(400, budget // max(nbytes, 16 << 10)))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--min-size", default="4")
    p.add_argument("--max-size", default="64M")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--budget", default="96M", help="bytes moved per method per round and size")
    p.add_argument("--block-below", type=parse_size, default=parse_size("1M"),
                   help="sizes below this are timed in blocks of calls, larger ones call by call")
    p.add_argument("--json", action="store_true", help="print one JSON line per size (rank 0)")
    args = p.parse_args()

    bps.init()
    torch.set_num_threads(1)
    rank = bps.rank()
    sizes = []
    s = parse_size(args.min_size)
    while s <= parse_size(args.max_size):
        sizes.append(s)
        s *= 4
    budget = parse_size(args.budget)
    code = _native.FLOAT32
    rows = []
    for nbytes in sizes:
        n = max(1, nbytes // 4)
        t_native = torch.ones(n)
        t_in = torch.ones(n)
        t_out = torch.ones(n)
        ptr, nb = t_native.data_ptr(), n * 4
        names = {m: "bench.%s.%d" % (m, nbytes) for m in ("native", "inplace", "outplace")}
        calls = calls_for(nbytes, budget)

        def run_native():
            _native.wait(_native.push_pull_async(names["native"], code, ptr, ptr, nb, True, 0, t_native))

        def run_inplace():
            bps.push_pull_inplace(t_in, name=names["inplace"])

        def run_outplace():
            bps.push_pull(t_out, name=names["outplace"])

        methods = [("native", run_native), ("inplace", run_inplace), ("outplace", run_outplace)]
        for _, fn in methods:  # warm-up: placement, connections, first-touch of the buffers
            fn()
            fn()
        per_call = {m: [] for m, _ in methods}
        clock = time.perf_counter
        for r in range(args.rounds):
            if nbytes < args.block_below:
                # small: blocks of `calls` calls per method (rotating the order); a block's
                # mean averages the runtime's wake-up modes (busy-poll or sleep) alike
                k = r % 3
                for m, fn in methods[k:] + methods[:k]:
                    t0 = clock()
                    for _ in range(calls):
                        fn()
                    per_call[m].append((clock() - t0) / calls)
            else:
                # large: calls interleaved one by one (rotating the order), so load bursts on
                # a shared machine hit every method alike
                for i in range(calls):
                    k = (i + r) % 3
                    for m, fn in methods[k:] + methods[:k]:
                        t0 = clock()
                        fn()
                        per_call[m].append(clock() - t0)
        med = {m: statistics.median(v) for m, v in per_call.items()}
        row = {
            "bytes": nb,
            "calls": calls,
            "native_us": med["native"] * 1e6,
            "inplace_us": med["inplace"] * 1e6,
            "outplace_us": med["outplace"] * 1e6,
        }
        rows.append(row)
        if rank == 0:
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                if len(rows) == 1:
                    print(
                        "%10s %6s %12s %12s %12s %10s %10s"
                        % ("size", "calls", "native us", "inplace us", "outplace us", "in/native", "out/native"),
                        flush=True,
                    )
                print(
                    "%10s %6d %12.1f %12.1f %12.1f %10.3f %10.3f"
                    % (
                        human(nb),
                        calls,
                        row["native_us"],
                        row["inplace_us"],
                        row["outplace_us"],
                        row["inplace_us"] / row["native_us"],
                        row["outplace_us"] / row["native_us"],
                    ),
                    flush=True,
                )
    if rank == 0:
        small = [r for r in rows if r["bytes"] <= 4096]
        large = [r for r in rows if r["bytes"] >= 4 << 20]
        if small:
            oin = statistics.median(r["inplace_us"] - r["native_us"] for r in small)
            oout = statistics.median(r["outplace_us"] - r["native_us"] for r in small)
            print("per-call overhead, tensors <= 4 KiB (median): inplace %+.1f us, outplace %+.1f us" % (oin, oout))
        if large:
            rin = statistics.median(r["inplace_us"] / r["native_us"] for r in large)
            rout = statistics.median(r["outplace_us"] / r["native_us"] for r in large)
            print(
                "time ratio plugin/native, tensors >= 4 MiB (median): inplace %.3f, outplace %.3f (target <= 1.05)"
                % (rin, rout)
            )
    bps.shutdown()


if __name__ == "__main__":
    main()
