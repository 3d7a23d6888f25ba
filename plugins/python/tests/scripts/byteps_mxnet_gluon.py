"""A BytePS MXNet gluon example, kept as BytePS's examples are written (``import
byteps.mxnet as bps``), on synthetic data and CPU: it must run unchanged under bps-launch."""
import argparse
import logging

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon, nd

import byteps.mxnet as bps

logging.basicConfig(level=logging.INFO)

parser = argparse.ArgumentParser(description='MXNet MNIST Example')
parser.add_argument('--batch-size', type=int, default=32, help='training batch size (default: 32)')
parser.add_argument('--epochs', type=int, default=1, help='number of training epochs (default: 1)')
parser.add_argument('--lr', type=float, default=0.01, help='learning rate (default: 0.01)')
parser.add_argument('--momentum', type=float, default=0.9, help='SGD momentum (default: 0.9)')
parser.add_argument('--no-cuda', action='store_true', default=True, help='disable training on GPU (default: True)')
args = parser.parse_args()

# Initialize BytePS
bps.init()

# BytePS: pin context to local rank
context = mx.cpu(bps.local_rank()) if args.no_cuda else mx.gpu(bps.local_rank())
num_workers = bps.size()

# synthetic data in place of MNIST
rs = np.random.RandomState(42)
images = rs.randn(1024, 1, 28, 28).astype('float32')
labels = rs.randint(0, 10, size=(1024,)).astype('float32')
dataset = gluon.data.ArrayDataset(images[bps.rank()::num_workers], labels[bps.rank()::num_workers])
train_data = gluon.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, last_batch='discard')


def conv_nets():
    net = gluon.nn.HybridSequential()
    with net.name_scope():
        net.add(gluon.nn.Conv2D(channels=20, kernel_size=5, activation='relu'))
        net.add(gluon.nn.MaxPool2D(pool_size=2, strides=2))
        net.add(gluon.nn.Conv2D(channels=50, kernel_size=5, activation='relu'))
        net.add(gluon.nn.MaxPool2D(pool_size=2, strides=2))
        net.add(gluon.nn.Flatten())
        net.add(gluon.nn.Dense(512, activation="relu"))
        net.add(gluon.nn.Dense(10))
    return net


model = conv_nets()
model.cast('float32')
model.hybridize()

# Initialize parameters (deferred: the trainer broadcasts them at the first step)
initializer = mx.init.Xavier(rnd_type='gaussian', factor_type="in", magnitude=2)
model.initialize(initializer, ctx=context)

# BytePS: fetch and broadcast parameters
params = model.collect_params()

# BytePS: create DistributedTrainer, a subclass of gluon.Trainer
optimizer_params = {'momentum': args.momentum, 'learning_rate': args.lr * num_workers}
trainer = bps.DistributedTrainer(params, "sgd", optimizer_params)

loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
metric = mx.metric.Accuracy()

for epoch in range(args.epochs):
    metric.reset()
    for i, (data, label) in enumerate(train_data):
        data = data.as_in_context(context)
        label = label.as_in_context(context)
        with autograd.record():
            output = model(data)
            loss = loss_fn(output, label)
        loss.backward()
        trainer.step(args.batch_size)
        metric.update([label], [output])
        if i % 8 == 0:
            name, acc = metric.get()
            logging.info('[Epoch %d Batch %d] Training: %s=%f' % (epoch, i, name, acc))

# every worker ends with the same weights
w = list(params.values())[-1].data().copy()
root = w.copy()
kv = mx.kv.create('bps')
kv.broadcast('check', root, out=root)
assert (root.asnumpy() == w.asnumpy()).all(), "weights differ across workers"
print('rank %d of %d: OK' % (bps.rank(), bps.size()))
