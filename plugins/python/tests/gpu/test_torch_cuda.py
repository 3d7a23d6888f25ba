"""bps.torch on CUDA tensors, run by every worker of a job: one process per GPU.

Start it with ``ci/gpu.d/torch-tests N`` (N processes, one host), or by hand::

    bps-launch --workers 4 --local-size 4 -- python -m pytest -q -p no:cacheprovider \\
        plugins/python/tests/gpu/test_torch_cuda.py
    python -m torch.distributed.run --nproc_per_node=4 -m pytest -q -p no:cacheprovider \\
        plugins/python/tests/gpu/test_torch_cuda.py

A plain ``python -m pytest`` on it runs one worker (size 1). Every worker runs every test in the
same order (the runtime keys tensors by declaration order), so select tests (``-k``) alike on
every worker. Without a GPU that torch can use, the whole module is skipped with the reason.

Values are small integers, so every sum is exact in float16 and bfloat16 whatever the order in
which the runtime adds them: results are compared bit for bit.
"""

import copy

import pytest

torch = pytest.importorskip("torch")

import bps.torch as bps  # noqa: E402

# Every test skips, with the reason, where torch has no GPU (the exit status stays 0).
pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="torch %s sees no usable CUDA GPU (torch.cuda.is_available() is False%s)"
    % (torch.__version__, "; this torch has no CUDA support" if torch.version.cuda is None else ""),
)

FLOATS = [torch.float32, torch.float16, torch.bfloat16]
# 5 MiB + 1 elements: several partitions, an odd tail
SIZES = [1, 3, 1023, 5 * (1 << 20) + 1]
# Every worker must use the same names: a per-test prefix and a counter.
_seq = {}


def uniq(prefix):
    _seq[prefix] = _seq.get(prefix, -1) + 1
    return "%s.%d" % (prefix, _seq[prefix])


def tag(dt):
    return str(dt).replace("torch.", "")


@pytest.fixture(scope="module", autouse=True)
def gpu_job():
    """Join the job and take this worker's GPU (local rank); leave the job at the end."""
    bps.init()
    visible = torch.cuda.device_count()
    if bps.local_size() > visible:
        pytest.fail(
            "%d workers on this host but torch sees %d GPUs: bps needs one GPU per worker"
            % (bps.local_size(), visible)
        )
    torch.cuda.set_device(bps.local_rank())
    print(
        "rank %d of %d, local %d of %d, %s, torch %s (CUDA %s)"
        % (
            bps.rank(),
            bps.size(),
            bps.local_rank(),
            bps.local_size(),
            torch.cuda.get_device_name(),
            torch.__version__,
            torch.version.cuda,
        )
    )
    yield
    torch.cuda.synchronize()
    bps.shutdown()


def R():
    return bps.rank()


def N():
    return bps.size()


def dev():
    return torch.device("cuda", torch.cuda.current_device())


def pattern(n, rank, dtype):
    """Small integers depending on the element and the rank: (i % 5) + (rank % 3)."""
    i = torch.arange(n, device=dev(), dtype=torch.int64)
    return ((i % 5) + (rank % 3)).to(dtype)


def pattern_sum(n, dtype):
    i = torch.arange(n, device=dev(), dtype=torch.int64)
    return (N() * (i % 5) + sum(r % 3 for r in range(N()))).to(dtype)


def test_gpu_path_available():
    assert bps.cuda_built(), "this build of bps has no CUDA path (built without the `cuda` feature)"
    gpus = bps.gpus()
    assert len(gpus) == torch.cuda.device_count(), (gpus, torch.cuda.device_count())
    mine = gpus[torch.cuda.current_device()]
    assert mine["index"] == torch.cuda.current_device()
    assert mine["memory"] > 0 and mine["name"], mine


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dt", FLOATS, ids=tag)
def test_push_pull_sum(dt, n):
    t = pattern(n, R(), dt)
    before = t.clone()
    want = pattern_sum(n, dt)
    out = bps.push_pull(t, average=False, name=uniq("sum.%s.%d" % (tag(dt), n)))
    assert out.is_cuda and out.device == t.device and out.dtype == dt and out.shape == t.shape
    assert torch.equal(out, want), "first differences: %s vs %s" % (out[out != want][:5], want[out != want][:5])
    assert torch.equal(t, before), "out-of-place push_pull changed its input"
    # in place: the same tensor, the same memory (zero-copy)
    ptr = t.data_ptr()
    h = bps.push_pull_async_inplace(t, average=False, name=uniq("inplace.%s.%d" % (tag(dt), n)))
    got = bps.synchronize(h)
    assert got is t and t.data_ptr() == ptr
    assert torch.equal(t, want)


@pytest.mark.parametrize("dt", FLOATS, ids=tag)
def test_push_pull_average(dt):
    n = 4099
    t = pattern(n, R(), dt)
    out = bps.push_pull(t, average=True, name=uniq("avg.%s" % tag(dt)))
    want = pattern_sum(n, torch.float64) / N()
    torch.testing.assert_close(out, want.to(dt))
    # a 2-D tensor in place, averaged: the mean of 1..N
    m = torch.full((33, 17), float(R() + 1), device=dev(), dtype=dt)
    bps.push_pull_inplace(m, average=True, name=uniq("avg2d.%s" % tag(dt)))
    torch.testing.assert_close(m, torch.full_like(m, (N() + 1) / 2.0))


def test_integer_dtypes():
    for dt in (torch.int32, torch.int64, torch.uint8):
        t = pattern(777, R(), dt)
        assert torch.equal(bps.push_pull(t, average=False, name=uniq("int.%s" % tag(dt))), pattern_sum(777, dt))


def test_many_in_flight():
    sizes = [1, 3, 1023, 4096, 65537, 1 << 20, 3 * (1 << 20) + 7]
    ts, hs = [], []
    for k in range(48):
        n = sizes[k % len(sizes)]
        dt = FLOATS[k % 3]
        t = pattern(n, R() + k, dt)
        ts.append((t, n, dt, k))
        if k % 2:
            hs.append(bps.push_pull_async_inplace(t, average=False, name="flight.%d" % k, priority=k % 5))
        else:
            hs.append(bps.push_pull_async(t, average=False, name="flight.%d" % k, priority=-k))
    # synchronize in reverse order, polling some first
    for (t, n, dt, k), h in reversed(list(zip(ts, hs))):
        if k % 3 == 0:
            while not bps.poll(h):
                pass
        out = bps.synchronize(h)
        want = sum(pattern(n, r + k, torch.int64) for r in range(N())).to(dt)
        assert torch.equal(out, want), "tensor %d (%d x %s) wrong" % (k, n, tag(dt))
        if k % 2:
            assert out is t


def test_producer_stream_is_honoured():
    """The data comes from kernels still queued on the current stream when push_pull is
    called: the runtime must wait for them (no torch.cuda.synchronize() in between)."""
    n = 1 << 20
    t = torch.zeros(n, device=dev())
    torch.cuda._sleep(200_000_000)  # ~0.1 s of spinning on the current stream
    t.fill_(float(R() + 1))
    out = bps.push_pull(t, average=False, name=uniq("stream.default"))
    assert torch.equal(out, torch.full_like(t, N() * (N() + 1) / 2.0))
    # a side stream as the current stream: its work is what the runtime waits for
    side = torch.cuda.Stream()
    u = torch.zeros(n, device=dev())
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)
        u.fill_(float(2 * R() + 1))
        h = bps.push_pull_async_inplace(u, average=False, name=uniq("stream.side"))
    got = bps.synchronize(h)
    # the result is complete when synchronize returns: read it from yet another stream
    other = torch.cuda.Stream()
    with torch.cuda.stream(other):
        copy_ = got.clone()
    other.synchronize()
    assert torch.equal(copy_, torch.full_like(u, float(N() * N())))


def test_autograd_through_push_pull():
    x = torch.full((5,), float(R() + 1), device=dev(), requires_grad=True)
    y = bps.push_pull(x, average=False, name=uniq("autograd"))
    assert y.requires_grad and y.is_cuda
    (y * (R() + 1)).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, N() * (N() + 1) / 2.0))


def test_fp16_compression_on_gpu():
    t = torch.full((1001,), float(R() + 1), device=dev()) / 4
    out = bps.push_pull(t, average=False, name=uniq("fp16"), compression=bps.Compression.fp16)
    assert out.dtype == torch.float32 and out.is_cuda
    assert torch.equal(out, torch.full_like(t, N() * (N() + 1) / 8.0))


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(20, 32)
        self.bn = torch.nn.BatchNorm1d(32)  # buffers: float running stats, an int64 counter
        self.fc2 = torch.nn.Linear(32, 16)
        self.out = torch.nn.Linear(16, 4)
        self.unused = torch.nn.Linear(3, 3)  # never in the graph: gets zero gradients

    def forward(self, x):
        return self.out(torch.relu(self.fc2(torch.relu(self.bn(self.fc1(x))))))


def model_of(seed):
    torch.manual_seed(seed)
    m = Net().to(dev())
    with torch.no_grad():
        m.bn.running_mean.add_(seed)
        m.bn.num_batches_tracked.add_(seed)
    return m


def test_broadcast_parameters_from_root():
    for root in sorted({0, N() - 1}):
        model = model_of(100 + R())
        model.fc1.weight.data = model.fc1.weight.data.t().contiguous().t()  # non-contiguous
        assert not model.fc1.weight.is_contiguous()
        bps.broadcast_parameters(model.state_dict(), root_rank=root, prefix=uniq("bcast") + ".")
        want = model_of(100 + root)
        for (k, a), (_, b) in zip(model.state_dict().items(), want.state_dict().items()):
            assert a.is_cuda and torch.equal(a, b), "%s differs from root %d's" % (k, root)
    # a tensor broadcast on its own, any dtype (bool goes as bytes)
    flags = torch.tensor([R() % 2 == 0, True, R() == 0], device=dev())
    got = bps.broadcast(flags, root_rank=0, name=uniq("bcast.bool"))
    assert got.is_cuda and torch.equal(got.cpu(), torch.tensor([True, True, True]))


def batch(step, rank, per_worker=8):
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(per_worker, 20, generator=g)
    y = torch.randn(per_worker, 4, generator=g)
    return x.to(dev()), y.to(dev())


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(20, 32)
        self.fc2 = torch.nn.Linear(32, 16)
        self.out = torch.nn.Linear(16, 4)
        self.unused = torch.nn.Linear(3, 3)

    def forward(self, x):
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


@pytest.mark.parametrize(
    "compression,accum,tol",
    [("none", 1, 1e-5), ("fp16", 1, 5e-3), ("none", 2, 1e-5)],
    ids=["plain", "fp16", "accum2"],
)
def test_distributed_optimizer_matches_one_process(compression, accum, tol):
    compression = getattr(bps.Compression, compression)
    steps = 5
    torch.manual_seed(1234 + R())  # different on each worker: broadcast_parameters fixes it
    model = MLP().to(dev())
    opt = sgd(model)
    # the reference: one process, seeded as the root; a step on it so that there is
    # optimizer state (momentum buffers on the GPU) to broadcast
    torch.manual_seed(1234)
    ref = MLP().to(dev())
    ref_opt = sgd(ref)
    x0, y0 = batch(999, 0)
    ref_opt.zero_grad()
    torch.nn.functional.mse_loss(ref(x0), y0).backward()
    ref_opt.step()
    if R() == 0:
        model.load_state_dict(copy.deepcopy(ref.state_dict()))
        opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))
    bps.broadcast_parameters(model.state_dict(), root_rank=0, prefix=uniq("train.params") + ".")
    bps.broadcast_optimizer_state(opt, root_rank=0)
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), "broadcast_parameters: %s differs" % name
    for i, s in opt.state_dict()["state"].items():
        buf = s["momentum_buffer"]
        assert buf.is_cuda and buf.device == dev(), "momentum buffer %d on %s" % (i, buf.device)
        assert torch.equal(buf, ref_opt.state_dict()["state"][i]["momentum_buffer"])
    prefix = uniq("train")
    dopt = bps.DistributedOptimizer(
        opt,
        named_parameters=[(prefix + "." + n, p) for n, p in model.named_parameters()],
        compression=compression,
        backward_passes_per_step=accum,
    )
    for step in range(steps):
        dopt.zero_grad()
        for k in range(accum):
            x, y = batch(step * accum + k, R())
            torch.nn.functional.mse_loss(model(x), y).backward()
        dopt.step()
        ref_opt.zero_grad()
        for k in range(accum):
            xs, ys = zip(*[batch(step * accum + k, r) for r in range(N())])
            torch.nn.functional.mse_loss(ref(torch.cat(xs)), torch.cat(ys)).backward()
        ref_opt.step()
    worst = 0.0
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert p.is_cuda
        worst = max(worst, (p - q).abs().max().item())
        torch.testing.assert_close(p, q, rtol=tol, atol=tol, msg=lambda m: "%s: %s" % (name, m))
        same = bps.broadcast(p.detach(), root_rank=0, name=uniq("train.check"))
        assert torch.equal(same, p.detach()), "%s differs across workers" % name
    print("train %s accum %d: max |distributed - one process| = %.3g" % (compression.__name__, accum, worst))


def test_cpu_tensor_still_works():
    t = torch.arange(10, dtype=torch.float32) + R()
    out = bps.push_pull(t, average=False, name=uniq("cpu"))
    assert out.device.type == "cpu"
    assert torch.equal(out, torch.arange(10, dtype=torch.float32) * N() + sum(range(N())))


def test_bad_uses_are_clear():
    t = torch.ones(4, 3, device=dev()).t()
    with pytest.raises(bps.InvalidArgumentError, match="contiguous"):
        bps.push_pull(t, name=uniq("bad.noncontig"))
    with pytest.raises(bps.DtypeError, match="torch.int8"):
        bps.push_pull(torch.ones(3, device=dev(), dtype=torch.int8), name=uniq("bad.dtype"))
    if torch.cuda.device_count() > 1:
        # this worker's GPU is fixed by its first GPU call (earlier tests)
        other = torch.device("cuda", (torch.cuda.current_device() + 1) % torch.cuda.device_count())
        with pytest.raises(bps.InvalidArgumentError, match="GPU"):
            bps.push_pull(torch.ones(3, device=other), name=uniq("bad.device"))
    # the job goes on
    ok = bps.push_pull(torch.ones(3, device=dev()), average=False, name=uniq("bad.after"))
    assert torch.equal(ok, torch.full_like(ok, float(N())))


def test_empty_tensor():
    e = bps.push_pull(torch.zeros(0, device=dev()), name=uniq("empty"))
    assert e.numel() == 0 and e.is_cuda

