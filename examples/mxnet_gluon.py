"""A gluon MLP trained data-parallel with bps.mxnet's DistributedTrainer (MXNet 1.x, CPU).

    bps-launch --workers 2 -- python examples/mxnet_gluon.py
    bps-launch --workers 2 -- python examples/mxnet_gluon.py --kvstore   # gluon.Trainer + mx.kv.create('bps')

Each worker trains on its own shard of a synthetic data set; rank 0 prints the loss averaged
over all workers.
"""

import argparse
import time

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

import bps.mxnet as bps


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64, help="per worker")
    p.add_argument("--samples", type=int, default=8192)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--kvstore", action="store_true", help="gluon.Trainer with mx.kv.create('bps')")
    return p.parse_args()


def main():
    args = parse_args()
    bps.init()
    rank, size = bps.rank(), bps.size()
    ctx = mx.cpu()

    rs = np.random.RandomState(42)
    x = rs.randn(args.samples, 100).astype("float32")
    w = rs.randn(100, 10).astype("float32")
    y = (x @ w + 0.5 * rs.randn(args.samples, 10)).argmax(1).astype("float32")
    x, y = x[rank::size], y[rank::size]

    net = gluon.nn.HybridSequential()
    with net.name_scope():
        net.add(gluon.nn.Dense(128, in_units=100, activation="relu"))
        net.add(gluon.nn.Dense(64, in_units=128, activation="relu"))
        net.add(gluon.nn.Dense(10, in_units=64))
    mx.random.seed(rank)  # different on purpose: rank 0's weights are broadcast
    net.initialize(mx.init.Xavier(), ctx=ctx)
    net.hybridize()

    opt_params = {"learning_rate": args.lr, "momentum": 0.9}
    if args.kvstore:
        # The kvstore sums gradients across workers: normalise by the global batch.
        trainer = gluon.Trainer(net.collect_params(), "sgd", opt_params, kvstore=mx.kv.create("bps"))
        step_batch = args.batch_size * size
    else:
        # DistributedTrainer averages gradients across workers.
        trainer = bps.DistributedTrainer(net.collect_params(), "sgd", opt_params)
        step_batch = args.batch_size

    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    steps = len(x) // args.batch_size
    for epoch in range(args.epochs):
        start = time.time()
        total = 0.0
        for i in range(steps):
            xb = mx.nd.array(x[i * args.batch_size:(i + 1) * args.batch_size], ctx=ctx)
            yb = mx.nd.array(y[i * args.batch_size:(i + 1) * args.batch_size], ctx=ctx)
            with autograd.record():
                loss = loss_fn(net(xb), yb)
            loss.backward()
            trainer.step(step_batch)
            total += loss.mean().asscalar()
        avg = mx.nd.array([total / steps])
        bps.byteps_push_pull(avg, name="avg_loss", is_average=True)
        if rank == 0:
            print(
                "epoch %d: loss %.4f  (%d workers, %d steps, %.1f s)"
                % (epoch, avg.asscalar(), size, steps, time.time() - start),
                flush=True,
            )
    bps.shutdown()


if __name__ == "__main__":
    main()
