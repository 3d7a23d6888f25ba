"""One worker of a bps.mxnet test job (started by bps-launch from test_mxnet.py).

Runs the checks named on the command line and prints "CHECK <name> ok" after each; a failure
raises (non-zero exit fails the job). The checks:

  kvstore    mx.kv.create('bps'): pushpull and broadcast (single values, lists, out / in place)
  dtypes     byteps_push_pull on every dtype MXNet and bps share; broadcast_parameters
  gluon      gluon.Trainer with the bps kvstore (two CPU contexts per worker) vs one process
  trainer    bps.mxnet.DistributedTrainer vs one process
  baduse     clear errors: dtypes, non-NDArray, optimizer on the kvstore
  mismatch   the same name with another shape on one worker: MismatchError
"""

import sys

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

import bps.mxnet as bps

bps.init()
R, N = bps.rank(), bps.size()


def ok(name):
    print("CHECK %s ok" % name, flush=True)


def expect_raises(cls, fn, *needles):
    try:
        fn()
    except cls as e:
        for n in needles:
            assert n in str(e), "message %r lacks %r" % (str(e), n)
        return e
    raise AssertionError("expected %s" % cls.__name__)


def check_kvstore():
    for name in ("bps", "dist_sync_bps"):
        kv = mx.kv.create(name)
        assert isinstance(kv, bps.BPS)
        assert kv.rank == R and kv.num_workers == N and kv.local_rank == bps.local_rank()
        assert "dist" in kv.type and kv.is_capable("optimizer") is False
    shape = (2, 3)
    # pushpull into out
    out = mx.nd.zeros(shape)
    kv.pushpull("3", mx.nd.ones(shape) * (R + 1) * 8, out=out)
    assert (out.asnumpy() == 8 * N * (N + 1) / 2).all(), out
    # in place, int key
    v = mx.nd.ones(shape) * (R + 1)
    kv.pushpull(7, v)
    assert (v.asnumpy() == N * (N + 1) / 2).all()
    # a list of per-device values (two CPU contexts): summed locally, then across workers
    vals = [mx.nd.ones(shape, ctx=mx.cpu(0)) * (R + 1), mx.nd.ones(shape, ctx=mx.cpu(1)) * 10]
    outs = [mx.nd.zeros(shape, ctx=mx.cpu(0)), mx.nd.zeros(shape, ctx=mx.cpu(1))]
    kv.pushpull("list", vals, out=outs)
    for o in outs:
        assert (o.asnumpy() == N * (N + 1) / 2 + 10 * N).all(), o
    assert (vals[1].asnumpy() == 10).all(), "pushpull with out changed its value"
    kv.pushpull("list.inplace", vals)
    for x in vals:
        assert (x.asnumpy() == N * (N + 1) / 2 + 10 * N).all()
    # value left as it was when out is another array
    val = mx.nd.ones(shape) * (R + 1)
    kv.pushpull("keep", val, out=mx.nd.zeros(shape))
    assert (val.asnumpy() == R + 1).all()
    # broadcast (rank 0's value)
    b = mx.nd.zeros(shape)
    kv.broadcast("4", mx.nd.ones(shape) * (R + 2), out=b)
    assert (b.asnumpy() == 2).all()
    bl = [mx.nd.zeros(shape, ctx=mx.cpu(0)), mx.nd.zeros(shape, ctx=mx.cpu(1))]
    kv.broadcast("5", mx.nd.ones(shape) * (R + 3), out=bl)
    for o in bl:
        assert (o.asnumpy() == 3).all()
    same = mx.nd.ones(shape) * (R + 4)
    kv.broadcast("6", same, out=same)
    assert (same.asnumpy() == 4).all()
    ival = mx.nd.array([R, 1, 2], dtype="int32")
    kv.broadcast("int", ival, out=ival)
    assert ival.asnumpy().tolist() == [0, 1, 2]
    # bigger than one partition
    big = mx.nd.ones((3 << 20,)) * (R + 1)
    kv.pushpull("big", big)
    assert (big.asnumpy() == N * (N + 1) / 2).all()
    ok("kvstore")


def check_dtypes():
    for dt in ["float32", "float64", "float16", "int32", "int64", "uint8"]:
        base = np.arange(10) % 7
        a = mx.nd.array(base + R, dtype=dt)
        bps.byteps_declare_tensor("dt." + dt)
        bps.byteps_push_pull(a, name="dt." + dt, is_average=False)
        assert a.dtype == np.dtype(dt)
        assert (a.asnumpy() == (base * N + N * (N - 1) // 2).astype(dt)).all(), (dt, a)
        if dt.startswith("float"):
            f = mx.nd.array(base + R, dtype=dt)
            bps.byteps_push_pull(f, name="avg." + dt, is_average=True)
            assert np.allclose(f.asnumpy(), base + (N - 1) / 2.0, atol=1e-2)
    # a computation pending in the engine is waited for before the push
    x = mx.nd.ones((1000,)) * (R + 1)
    y = mx.nd.dot(x.reshape((1, -1)), mx.nd.ones((1000, 1))) + x.sum()  # lazily computed
    bps.byteps_push_pull(y, name="pending", is_average=False)
    assert y.asscalar() == 2000 * N * (N + 1) / 2
    # broadcast_parameters on a dict of arrays and on a ParameterDict
    params = {"w": mx.nd.ones((3, 3)) * R, "b": mx.nd.array([R, R + 1], dtype="int64")}
    bps.broadcast_parameters(params, root_rank=N - 1)
    assert (params["w"].asnumpy() == N - 1).all() and params["b"].asnumpy().tolist() == [N - 1, N]
    net = gluon.nn.Dense(3, in_units=4)
    mx.random.seed(100 + R)
    net.initialize(mx.init.Uniform())
    bps.broadcast_parameters(net.collect_params(), root_rank=0)
    got = net.weight.data().asnumpy()
    root_w = mx.nd.array(got)
    bps.broadcast_(root_w, root_rank=0, name="check.bcast")
    assert (root_w.asnumpy() == got).all()
    ok("dtypes")


def make_net(ctx):
    net = gluon.nn.HybridSequential()
    with net.name_scope():
        net.add(gluon.nn.Dense(16, in_units=10, activation="relu"))
        net.add(gluon.nn.Dense(4, in_units=16))
    mx.random.seed(42)
    net.initialize(mx.init.Xavier(), ctx=ctx)
    return net


def batch(step, rank, per_worker=8):
    rs = np.random.RandomState(1000 * step + rank)
    return rs.randn(per_worker, 10).astype("float32"), rs.randn(per_worker, 4).astype("float32")


def weights(net):
    return [p.data(p.list_ctx()[0]).asnumpy() for _, p in sorted(net.collect_params().items())]


def compare(net, ref, tag, tol=1e-5):
    worst = 0.0
    for i, (a, b) in enumerate(zip(weights(net), weights(ref))):
        worst = max(worst, float(np.abs(a - b).max()))
        assert np.allclose(a, b, rtol=tol, atol=tol), "%s: parameter %d differs by %g" % (tag, i, np.abs(a - b).max())
        root = mx.nd.array(a)
        bps.broadcast_(root, root_rank=0, name="check.%s.%d" % (tag, i))
        assert (root.asnumpy() == a).all(), "%s: parameter %d differs across workers" % (tag, i)
    print("%s: max |distributed - single| = %.3g" % (tag, worst), flush=True)


def train_reference(steps, per_worker, lr):
    ref = make_net(mx.cpu())
    tr = gluon.Trainer(ref.collect_params(), "sgd", {"learning_rate": lr, "momentum": 0.9}, kvstore=None)
    loss_fn = gluon.loss.L2Loss()
    for step in range(steps):
        xs, ys = zip(*[batch(step, r, per_worker) for r in range(N)])
        x, y = mx.nd.array(np.concatenate(xs)), mx.nd.array(np.concatenate(ys))
        with autograd.record():
            loss = loss_fn(ref(x), y)
        loss.backward()
        tr.step(per_worker * N)
    return ref


def check_gluon():
    steps, per_worker, lr = 5, 8, 0.1
    ctxs = [mx.cpu(0), mx.cpu(1)]
    net = make_net(ctxs)
    kv = mx.kv.create("bps")
    tr = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": lr, "momentum": 0.9}, kvstore=kv)
    loss_fn = gluon.loss.L2Loss()
    for step in range(steps):
        x, y = batch(step, R, per_worker)
        xs = gluon.utils.split_and_load(mx.nd.array(x), ctxs)
        ys = gluon.utils.split_and_load(mx.nd.array(y), ctxs)
        with autograd.record():
            losses = [loss_fn(net(a), b) for a, b in zip(xs, ys)]
        for l_ in losses:
            l_.backward()
        tr.step(per_worker * N)  # kvstore sums across workers (dist_sync semantics)
    assert tr._kvstore is kv and tr._update_on_kvstore is False
    compare(net, train_reference(steps, per_worker, lr), "gluon+kvstore")
    # the same through the kvstore *name* (gluon only creates named stores containing "dist")
    net2 = make_net(mx.cpu())
    tr2 = gluon.Trainer(net2.collect_params(), "sgd", {"learning_rate": lr}, kvstore="dist_sync_bps")
    x, y = batch(0, R, per_worker)
    with autograd.record():
        loss = loss_fn(net2(mx.nd.array(x)), mx.nd.array(y))
    loss.backward()
    tr2.step(per_worker * N)
    assert isinstance(tr2._kvstore, bps.BPS)
    ok("gluon")


def check_trainer():
    steps, per_worker, lr = 5, 8, 0.1
    mx.random.seed(7 + R)  # different init on each worker: the trainer broadcasts rank 0's
    net = gluon.nn.HybridSequential()
    with net.name_scope():
        net.add(gluon.nn.Dense(16, in_units=10, activation="relu"))
        net.add(gluon.nn.Dense(4, in_units=16))
    net.initialize(mx.init.Xavier())
    tr = bps.DistributedTrainer(net.collect_params(), "sgd", {"learning_rate": lr, "momentum": 0.9})
    ref = make_net(mx.cpu())
    # start the reference from rank 0's (broadcast) weights
    for (_, p), (_, q) in zip(sorted(net.collect_params().items()), sorted(ref.collect_params().items())):
        q.set_data(p.data())
    loss_fn = gluon.loss.L2Loss()
    rtr = gluon.Trainer(ref.collect_params(), "sgd", {"learning_rate": lr, "momentum": 0.9}, kvstore=None)
    for step in range(steps):
        x, y = batch(step, R, per_worker)
        with autograd.record():
            loss = loss_fn(net(mx.nd.array(x)), mx.nd.array(y))
        loss.backward()
        tr.step(per_worker)  # gradients are averaged across workers
        xs, ys = zip(*[batch(step, r, per_worker) for r in range(N)])
        with autograd.record():
            rl = loss_fn(ref(mx.nd.array(np.concatenate(xs))), mx.nd.array(np.concatenate(ys)))
        rl.backward()
        rtr.step(per_worker * N)
    compare(net, ref, "DistributedTrainer")
    ok("trainer")


def check_baduse():
    expect_raises(bps.DtypeError, lambda: bps.byteps_push_pull(mx.nd.ones((2,), dtype="int8")), "int8", "float32")
    expect_raises(TypeError, lambda: bps.byteps_push_pull(np.ones(3)), "NDArray")
    kv = mx.kv.create("bps")
    expect_raises(NotImplementedError, lambda: kv.set_optimizer(mx.optimizer.SGD()), "DistributedTrainer", "no optimizer state")
    expect_raises(bps.UnsupportedError, lambda: kv.save_optimizer_states("x"), "save_states")
    expect_raises(bps.UnsupportedError, lambda: kv.load_optimizer_states("x"), "load_states")
    expect_raises(TypeError, lambda: kv.pushpull(["a", "b"], [mx.nd.ones(1), mx.nd.ones(1)]), "one key")
    net = make_net(mx.cpu())
    tr = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1}, kvstore=kv, update_on_kvstore=True)
    with autograd.record():
        loss = net(mx.nd.ones((2, 10))).sum()
    loss.backward()
    expect_raises(ValueError, lambda: tr.step(2), "update_on_kvstore=False")
    ok("baduse")


def check_mismatch():
    shape = (4,) if R != N - 1 else (5,)
    e = expect_raises(bps.MismatchError, lambda: bps.byteps_push_pull(mx.nd.ones(shape), name="mismatch"), "mismatch")
    assert isinstance(e, ValueError)
    a = mx.nd.ones((3,))
    bps.byteps_push_pull(a, name="after.mismatch", is_average=False)
    assert (a.asnumpy() == N).all()
    ok("mismatch")


CHECKS = {
    "kvstore": check_kvstore,
    "dtypes": check_dtypes,
    "gluon": check_gluon,
    "trainer": check_trainer,
    "baduse": check_baduse,
    "mismatch": check_mismatch,
}

if __name__ == "__main__":
    for name in sys.argv[1:] or list(CHECKS):
        CHECKS[name]()
    bps.shutdown()
    print("WORKER %d DONE" % R, flush=True)
