"""A small MLP trained data-parallel with bps.torch on synthetic MNIST-shaped data (CPU).

    bps-launch --workers 2 -- python examples/torch_mnist_like.py
    bps-launch --workers 4 --servers 2 -- python examples/torch_mnist_like.py --epochs 3
    torchrun --nproc_per_node=2 examples/torch_mnist_like.py

Each worker trains on its own shard of a fixed synthetic data set (28x28 "images" whose class
is a linear function of the pixels, plus noise); gradients are averaged by
DistributedOptimizer, and rank 0 prints the loss and accuracy averaged over all workers.
"""

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import bps.torch as bps


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64, help="per worker")
    p.add_argument("--samples", type=int, default=8192, help="size of the whole data set")
    p.add_argument("--lr", type=float, default=0.05, help="per worker; scaled by the number of workers")
    p.add_argument("--fp16-pushpull", action="store_true", help="send gradients as float16")
    p.add_argument("--seed", type=int, default=42)
    return p.parse_args()


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(28 * 28, 256)
        self.fc2 = nn.Linear(256, 128)
        self.fc3 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.relu(self.fc1(x.flatten(1)))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def synthetic_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, generator=g)
    w = torch.randn(28 * 28, 10, generator=g)
    y = (x.flatten(1) @ w + 0.5 * torch.randn(n, 10, generator=g)).argmax(1)
    return x, y


def metric_average(value, name):
    return bps.push_pull(torch.tensor(float(value)), average=True, name=name).item()


def main():
    args = parse_args()
    bps.init()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)

    x, y = synthetic_data(args.samples, args.seed)
    shard = slice(bps.rank(), args.samples, bps.size())  # this worker's share
    x, y = x[shard], y[shard]

    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr * bps.size(), momentum=0.9)
    bps.broadcast_parameters(model.state_dict(), root_rank=0)
    bps.broadcast_optimizer_state(optimizer, root_rank=0)
    compression = bps.Compression.fp16 if args.fp16_pushpull else bps.Compression.none
    optimizer = bps.DistributedOptimizer(
        optimizer, named_parameters=model.named_parameters(), compression=compression
    )

    steps = len(x) // args.batch_size
    for epoch in range(args.epochs):
        start = time.time()
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        total, correct = 0.0, 0
        for i in range(steps):
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
            optimizer.zero_grad()
            out = model(x[idx])
            loss = F.cross_entropy(out, y[idx])
            loss.backward()
            optimizer.step()
            total += loss.item()
            correct += (out.argmax(1) == y[idx]).sum().item()
        loss = metric_average(total / steps, "avg_loss")
        acc = metric_average(correct / (steps * args.batch_size), "avg_accuracy")
        if bps.rank() == 0:
            print(
                "epoch %d: loss %.4f  accuracy %.3f  (%d workers, %d steps, %.1f s)"
                % (epoch, loss, acc, bps.size(), steps, time.time() - start),
                flush=True,
            )
    bps.shutdown()


if __name__ == "__main__":
    main()
