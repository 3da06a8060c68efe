"""Training-step throughput of a network on this machine, without data or a whole run.

    python bench/throughput.py                                # SmallCifarNet's widths, fp32, batch 2000
    python bench/throughput.py --widths 64,256,256 --precision bf16
    python bench/throughput.py --widths 32,128,128 32,96,128 48,192,192

Times the training step the trainer runs (forward, label-smoothed loss, backward, Muon step) on random
images, after warm-up steps, on the CPU with one thread per core. Use it to compare widths and precisions
in a minute instead of a whole run; accuracy needs bench.py. Never part of the test suite.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train  # noqa: E402
from models import CifarNet, count_flops  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", nargs="+", default=["32,128,128"], help="channel widths of the three groups")
    p.add_argument("--batch-size", type=int, default=train.BATCH_SIZE)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--steps", type=int, default=6, help="timed steps, after 2 warm-up steps")
    return p.parse_args()


def images_per_second(widths, batch_size, precision, steps):
    net = CifarNet(widths).to(memory_format=torch.channels_last)
    plan = dict(weight_decay=train.WEIGHT_DECAY_PER_EXAMPLE, lr=train.MUON_LR, batch_size=batch_size, epochs=10)
    optimizer = train.make_optimizer(net, plan)
    autocast_dtype, _ = train.make_precision(precision, torch.device("cpu"))
    inputs = torch.randn(batch_size, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (batch_size,))

    def step():
        train.set_learning_rates(optimizer, plan, step=0, steps_per_epoch=25)  # the peak rates
        with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = F.cross_entropy(net(inputs), labels, label_smoothing=train.LABEL_SMOOTHING)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(2):  # first steps allocate memory and pick kernels
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch_size * steps / (time.perf_counter() - start), count_flops(net)


def main():
    args = parse_args()
    train.keep_freed_memory()  # as the trainer does on the CPU
    torch.set_num_threads(os.cpu_count())
    print(f"{os.cpu_count()} threads, batch {args.batch_size}, {args.precision}, torch {torch.__version__}")
    for spec in args.widths:
        widths = tuple(int(w) for w in spec.split(","))
        rate, macs = images_per_second(widths, args.batch_size, args.precision, args.steps)
        print(f"widths {'/'.join(map(str, widths)):>12}: {rate:6.0f} images/s, {macs / 1e6:5.1f}M multiply-adds "
              f"per image ({rate * macs / 1e9:4.1f} G/s in the forward pass)")


if __name__ == "__main__":
    main()
