"""One worker of a bps.torch test job (started by bps-launch from test_torch.py).

Runs the checks named on the command line, in order, and prints "CHECK <name> ok" after each;
any failure raises (non-zero exit, which fails the job). The checks:

  dtypes     push_pull (sum, average, in place, out of place) and broadcast on every dtype
             torch and bps share, plus bool/int8/complex broadcast as bytes
  async      push_pull_async + poll + synchronize, several in flight, out of order; tensors
             kept alive while pending; waits release the GIL; autograd through push_pull
  object     broadcast_object from the last rank
  train      DistributedOptimizer vs one process on the union of the batches
  fp16       Compression.fp16: push_pull and DistributedOptimizer
  accum      backward_passes_per_step=2
  baduse     non-contiguous, unsupported dtype, non-CPU device, double synchronize
  mismatch   the same name with another shape on one worker: MismatchError, then recovery
"""

import copy
import gc
import sys
import threading
import time

import torch

import bps.torch as bps

bps.init()
R, N = bps.rank(), bps.size()
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.uint8]


def ok(name):
    print("CHECK %s ok" % name, flush=True)


def expect_raises(cls, fn, *needles):
    try:
        fn()
    except cls as e:
        msg = str(e)
        for n in needles:
            assert n in msg, "message %r lacks %r" % (msg, n)
        return e
    raise AssertionError("expected %s" % cls.__name__)


def check_dtypes():
    for dt in DTYPES:
        tag = str(dt).replace("torch.", "")
        # values small enough to be exact in every dtype, sums included
        base = torch.arange(10) % 7
        t = (base + R).to(dt)
        want_sum = (base * N + sum(range(N))).to(dt)
        s = bps.push_pull(t, average=False, name="dt.sum." + tag)
        assert s.dtype == dt and s.shape == t.shape
        assert torch.equal(s, want_sum), (dt, s, want_sum)
        assert torch.equal(t, (base + R).to(dt)), "out-of-place push_pull changed its input"
        if dt.is_floating_point:
            a = bps.push_pull(t, average=True, name="dt.avg." + tag)
            want = (base * N + sum(range(N))).double() / N
            assert torch.allclose(a.double(), want, atol=1e-2), (dt, a, want)
        u = t.clone()
        r = bps.push_pull_inplace(u, average=False, name="dt.inplace." + tag)
        assert r is u and torch.equal(u, want_sum)
        # a 2-D tensor and a 0-d one
        m = torch.full((3, 4), R + 1).to(dt)
        assert torch.equal(bps.push_pull(m, average=False, name="dt.2d." + tag), torch.full((3, 4), N * (N + 1) // 2).to(dt))
        z = torch.tensor(R + 1).to(dt)
        assert bps.push_pull(z, average=False, name="dt.0d." + tag).item() == N * (N + 1) // 2
        # broadcast from the last rank
        root = N - 1
        b = ((base + 1) * (R + 1)).to(dt)
        got = bps.broadcast(b, root_rank=root, name="dt.bcast." + tag)
        assert torch.equal(got, ((base + 1) * N).to(dt)), (dt, got)
        bps.broadcast_(b, root_rank=root, name="dt.bcast_." + tag)
        assert torch.equal(b, ((base + 1) * N).to(dt))
    # dtypes the runtime does not sum still broadcast (as bytes), non-contiguous included
    for t, name in [
        (torch.tensor([R % 2 == 0, True, R == 0]), "bool"),
        (torch.tensor([-3, R, 5], dtype=torch.int8), "int8"),
        (torch.tensor([1 + R * 1j, 2 - R * 1j]), "complex"),
    ]:
        got = bps.broadcast(t, root_rank=0, name="bcast.bytes." + name)
        assert got.dtype == t.dtype
        if R == 0:
            assert torch.equal(got, t)
        ref = bps.broadcast_object(got, root_rank=0)
        assert torch.equal(got, ref)
    nc = torch.full((4, 6), float(R)).t()
    assert not nc.is_contiguous()
    bps.broadcast_(nc, root_rank=N - 1, name="bcast.noncontig")
    assert torch.equal(nc, torch.full((6, 4), float(N - 1)))
    # zero elements
    e = bps.push_pull(torch.zeros(0), name="empty")
    assert e.numel() == 0
    ok("dtypes")


def check_async():
    ts = [torch.full((1000 * (i + 1),), float(R + i)) for i in range(6)]
    hs = [bps.push_pull_async(t, average=False, name="async.%d" % i, priority=i) for i, t in enumerate(ts)]
    inplace = torch.full((77,), float(R))
    hi = bps.push_pull_async_inplace(inplace, average=True, name="async.inplace")
    # synchronize out of order
    for i in reversed(range(6)):
        out = bps.synchronize(hs[i])
        want = sum(float(r + i) for r in range(N))
        assert torch.all(out == want), (i, out[:3], want)
    while not bps.poll(hi):
        pass
    assert bps.synchronize(hi) is inplace
    assert torch.allclose(inplace, torch.full((77,), (N - 1) / 2.0))
    # auto names: identical on every worker as every worker makes the same calls
    for _ in range(3):
        assert torch.equal(bps.push_pull(torch.ones(5), average=False), torch.full((5,), float(N)))
    # many small tensors in flight
    small = [torch.full((3,), float(i)) for i in range(200)]
    hs = [bps.push_pull_async(t, average=True, name="small.%d" % i) for i, t in enumerate(small)]
    for i, h in enumerate(hs):
        assert torch.equal(bps.synchronize(h), torch.full((3,), float(i)))
    # the tensors of a pending operation stay alive though the caller dropped them
    h = bps.push_pull_async(torch.full((1 << 18,), float(R)), average=False, name="async.dropped")
    gc.collect()
    junk = [torch.full((1 << 18,), -1.0) for _ in range(4)]  # reuse freed memory, if any
    assert torch.equal(bps.synchronize(h), torch.full((1 << 18,), float(sum(range(N)))))
    del junk
    # waiting releases the GIL: a Python thread keeps running while this worker waits on a
    # push_pull that the last worker joins 1 s late
    counter = [0]
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            counter[0] += 1

    th = threading.Thread(target=spin)
    th.start()
    if R == N - 1:
        time.sleep(1.0)
    t0 = time.monotonic()
    before = counter[0]
    bps.push_pull(torch.ones(4), name="async.gil")
    waited, progressed = time.monotonic() - t0, counter[0] - before
    stop.set()
    th.join()
    if R != N - 1:
        assert waited > 0.5, waited
        assert progressed > 10000, "the Python thread made %d steps in %.2f s of waiting" % (progressed, waited)
    # autograd through push_pull: the gradient is push_pulled back
    x = torch.full((3,), float(R + 1), requires_grad=True)
    y = bps.push_pull(x, average=False, name="async.autograd")
    assert y.requires_grad
    (y * (R + 1)).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), float(N * (N + 1) / 2))), x.grad
    ok("async")


def check_object():
    obj = {"rank": R, "list": list(range(R + 3)), "t": torch.arange(R + 2)}
    got = bps.broadcast_object(obj, root_rank=N - 1)
    assert got["rank"] == N - 1 and got["list"] == list(range(N + 2))
    assert torch.equal(got["t"], torch.arange(N + 1))
    big = bps.broadcast_object("x" * (100000 + R), root_rank=0)
    assert big == "x" * 100000
    ok("object")


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(20, 32)
        self.fc2 = torch.nn.Linear(32, 16)
        self.out = torch.nn.Linear(16, 4)
        self.unused = torch.nn.Linear(3, 3)  # never in the graph: gets zero gradients

    def forward(self, x):
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def batch(step, rank, per_worker=8):
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(per_worker, 20, generator=g)
    y = torch.randn(per_worker, 4, generator=g)
    return x, y


def make_opt(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def train(compression, steps, accum, tol, tag):
    torch.manual_seed(1234 + R)  # different on each worker: broadcast_parameters must fix it
    model = MLP()
    opt = make_opt(model)
    # a step on the root only, so there is optimizer state to broadcast
    torch.manual_seed(1234)
    ref = MLP()
    ref_opt = make_opt(ref)
    x0, y0 = batch(999, 0)
    ref_opt.zero_grad()
    torch.nn.functional.mse_loss(ref(x0), y0).backward()
    ref_opt.step()
    if R == 0:  # deep copies: load_state_dict would share ref_opt's momentum buffers
        model.load_state_dict(copy.deepcopy(ref.state_dict()))
        opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))
    bps.broadcast_parameters(model.state_dict(), root_rank=0)
    bps.broadcast_optimizer_state(opt, root_rank=0)
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.equal(p1, p2), "broadcast_parameters: %s differs" % n1
    assert torch.equal(opt.state_dict()["state"][0]["momentum_buffer"], ref_opt.state_dict()["state"][0]["momentum_buffer"])
    dopt = bps.DistributedOptimizer(
        opt, named_parameters=model.named_parameters(), compression=compression, backward_passes_per_step=accum
    )
    for step in range(steps):
        dopt.zero_grad()
        for k in range(accum):
            x, y = batch(step * accum + k, R)
            torch.nn.functional.mse_loss(model(x), y).backward()
        dopt.step()
        # reference: one process, the union of every worker's batches, same schedule
        ref_opt.zero_grad()
        for k in range(accum):
            xs, ys = zip(*[batch(step * accum + k, r) for r in range(N)])
            torch.nn.functional.mse_loss(ref(torch.cat(xs)), torch.cat(ys)).backward()
        ref_opt.step()
    worst = 0.0
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        d = (p - q).abs().max().item()
        worst = max(worst, d)
        assert torch.allclose(p, q, rtol=tol, atol=tol), "%s: %s differs from one process by %g" % (tag, name, d)
        # identical on every worker
        root = bps.broadcast(p.detach(), root_rank=0, name="check.%s.%s" % (tag, name))
        assert torch.equal(root, p.detach()), "%s: %s differs across workers" % (tag, name)
    print("train %s: %d steps, max |distributed - single| = %.3g" % (tag, steps, worst), flush=True)


def check_train():
    train(bps.Compression.none, steps=6, accum=1, tol=1e-5, tag="none")
    ok("train")


def check_fp16():
    t = torch.full((100,), float(R + 1)) / 4
    out = bps.push_pull(t, average=False, name="fp16.direct", compression=bps.Compression.fp16)
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.full((100,), N * (N + 1) / 8.0))
    train(bps.Compression.fp16, steps=4, accum=1, tol=5e-3, tag="fp16")
    ok("fp16")


def check_accum():
    train(bps.Compression.none, steps=3, accum=2, tol=1e-5, tag="accum")
    ok("accum")


def check_baduse():
    expect_raises(bps.InvalidArgumentError, lambda: bps.push_pull(torch.ones(4, 3).t()), ".contiguous()", "not contiguous")
    expect_raises(ValueError, lambda: bps.push_pull(torch.ones(4, 3)[:, 1]), ".contiguous()")
    e = expect_raises(bps.DtypeError, lambda: bps.push_pull(torch.ones(3, dtype=torch.int8)), "torch.int8", "torch.float32", "torch.bfloat16", "torch.uint8")
    assert isinstance(e, TypeError)
    expect_raises(bps.DtypeError, lambda: bps.push_pull(torch.ones(3, dtype=torch.bool)), "torch.bool")
    expect_raises(bps.UnsupportedError, lambda: bps.push_pull(torch.ones(3, device="meta")), "CUDA", "CPU")
    expect_raises(TypeError, lambda: bps.push_pull([1.0, 2.0]), "torch.Tensor")
    h = bps.push_pull_async(torch.ones(3), name="bad.twice")
    bps.synchronize(h)
    expect_raises(bps.InvalidArgumentError, lambda: bps.synchronize(h), "unknown handle")
    expect_raises(bps.InvalidArgumentError, lambda: bps.broadcast(torch.ones(2), root_rank=N + 5, name="bad.root"), "root")
    ok("baduse")


def check_mismatch():
    # the same name with another shape on one worker: every worker gets a MismatchError, soon
    # (not after BPS_TIMEOUT, which the tests set to 60 s)
    bps.barrier()
    t0 = time.monotonic()
    shape = (4,) if R != N - 1 else (5,)
    e = expect_raises(bps.MismatchError, lambda: bps.push_pull(torch.ones(shape), name="mismatch.shape"), "mismatch.shape")
    assert isinstance(e, ValueError)
    # and a dtype mismatch
    dt = torch.float32 if R != 0 else torch.float64
    expect_raises(bps.MismatchError, lambda: bps.push_pull(torch.ones(4, dtype=dt), name="mismatch.dtype"), "mismatch.dtype")
    took = time.monotonic() - t0
    assert took < 20, "the mismatches took %.1f s to surface" % took
    # this worker reusing a name with another size
    bps.push_pull(torch.ones(3), name="mismatch.local")
    expect_raises(bps.MismatchError, lambda: bps.push_pull(torch.ones(6), name="mismatch.local"), "mismatch.local")
    # the job goes on
    assert torch.equal(bps.push_pull(torch.ones(3), average=False, name="after.mismatch"), torch.full((3,), float(N)))
    ok("mismatch")


CHECKS = {
    "dtypes": check_dtypes,
    "async": check_async,
    "object": check_object,
    "train": check_train,
    "fp16": check_fp16,
    "accum": check_accum,
    "baduse": check_baduse,
    "mismatch": check_mismatch,
}

if __name__ == "__main__":
    for name in sys.argv[1:] or list(CHECKS):
        CHECKS[name]()
    bps.shutdown()
    print("WORKER %d DONE" % R, flush=True)
