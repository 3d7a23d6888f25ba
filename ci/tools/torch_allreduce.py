#!/usr/bin/env python3
"""NCCL all_reduce through torch.distributed, timed the way `bps-bench gpu` times push_pull:
per size, warm-up, then --iters all_reduce calls back to back on one CUDA tensor and one
synchronize at the end. Run one process per GPU:

    torchrun --nproc_per_node 4 ci/tools/torch_allreduce.py --sizes 256M,1G --json out.json

busbw = algbw * 2(n-1)/n, as nccl-tests and bps-bench report it.
"""
import argparse
import json
import os
import time

import torch
import torch.distributed as dist


def size(s):
    s = s.strip()
    m = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1].upper())
    return int(s[:-1]) * m if m else int(s)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="256M,1G")
    p.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16"])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json")
    a = p.parse_args()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    n = dist.get_world_size()
    dt = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    esz = torch.tensor([], dtype=dt).element_size()
    rows = []
    if dist.get_rank() == 0:
        print(f"# torch {torch.__version__} NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}, {n} GPUs: {torch.cuda.get_device_name(local)}")
        print(f"{'size(B)':>12} {'count':>12} {'type':>6} {'time(us)':>12} {'algbw':>9} {'busbw':>9}")
    for s in a.sizes.split(","):
        count = size(s) // esz
        t = torch.ones(count, dtype=dt, device="cuda")
        for _ in range(a.warmup):
            dist.all_reduce(t)
        torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(a.iters):
            dist.all_reduce(t)
        torch.cuda.synchronize()
        secs = (time.perf_counter() - t0) / a.iters
        dist.barrier()
        b = count * esz
        alg = b / secs / 1e9
        bus = alg * 2 * (n - 1) / n
        rows.append({"bytes": b, "dtype": a.dtype, "time_us": secs * 1e6, "algbw_gbs": alg, "busbw_gbs": bus, "workers": n})
        if dist.get_rank() == 0:
            print(f"{b:>12} {count:>12} {a.dtype:>6} {secs * 1e6:>12.1f} {alg:>9.2f} {bus:>9.2f}")
        del t
    if dist.get_rank() == 0 and a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
