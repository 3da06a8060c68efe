"""Training-step throughput of a network on this machine, without data or a whole run.

    python bench/throughput.py                                # SmallCifarNet's widths, fp32, batch 2000
    python bench/throughput.py --widths 64,256,256 --precision bf16
    python bench/throughput.py --widths 32,128,128 32,96,128 48,192,192
    python bench/throughput.py --models ResNet18 ResNet34 ResNet50 --batch-size 256
    python bench/throughput.py --frozen-stem                  # the steps after the stem bias freezes

Times the training step the trainer runs (forward, label-smoothed loss, backward, Muon step) on random
images, after warm-up steps, on the CPU with one thread per core, then the optimiser update alone (as long at any
batch: budget.at_batch). Use it to compare widths and precisions in a minute instead of a whole run; accuracy
needs bench.py. Never part of the test suite.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train  # noqa: E402
from models import CifarNet, build_model, count_macs  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", nargs="+", default=["32,128,128"], help="channel widths of CifarNet's three groups")
    p.add_argument("--models", nargs="+", default=[], help="networks of models.py by name, instead of --widths")
    p.add_argument("--batch-size", type=int, default=train.BATCH_SIZE)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--steps", type=int, default=6, help="timed steps, after 2 warm-up steps")
    p.add_argument("--frozen-stem", action="store_true",
                   help="time the steps of the epochs after the stem bias freezes (train.STEM_BIAS_EPOCHS)")
    return p.parse_args()


def images_per_second(net, plan, steps):
    net = net.to(memory_format=torch.channels_last)
    optimizer = train.make_optimizer(net, plan)
    train.set_learning_rates(optimizer, plan, plan["batch_size"], step=0, steps_per_epoch=1)  # the peak rates
    autocast_dtype, scaler = train.make_precision(plan["precision"], torch.device("cpu"))
    inputs = torch.randn(plan["batch_size"], 3, 32, 32).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (plan["batch_size"],))
    for _ in range(2):  # first steps allocate memory and pick kernels
        train.training_step(net, optimizer, scaler, inputs, labels, autocast_dtype)
    start = time.perf_counter()
    for _ in range(steps):
        train.training_step(net, optimizer, scaler, inputs, labels, autocast_dtype)
    rate = plan["batch_size"] * steps / (time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(steps):  # the optimiser update alone, on the last step's gradients: as long at any batch
        scaler.step(optimizer)
        scaler.update()
    return rate, (time.perf_counter() - start) / steps, count_macs(net)


def main():
    args = parse_args()
    # The trainer's own plan for this CPU supplies the recipe, rates, threads and precision (overridden as given).
    hw = train.Hardware((), os.cpu_count() or 1, cpu_bf16=train.cpu_has_bf16())
    networks = [(name, build_model(name), dict(model=name)) for name in args.models] or \
        [(f"widths {spec.replace(',', '/')}", CifarNet([int(w) for w in spec.split(",")]), {}) for spec in args.widths]
    train.keep_freed_memory()  # as the trainer does on the CPU
    stem = ", stem bias frozen" if args.frozen_stem else ""
    print(f"batch {args.batch_size}, {args.precision}{stem}, torch {torch.__version__}")
    for label, net, model in networks:
        plan = train.make_plan(hw, batch_size=args.batch_size, precision=args.precision, **model)
        torch.set_num_threads(plan["threads"])
        stem_bias = net.parameter_groups()["stem_bias"]
        for parameter in stem_bias:  # as train_one_epoch sets it
            parameter.requires_grad = not args.frozen_stem
        rate, update_seconds, macs = images_per_second(net, plan, args.steps)
        no_stem = " (it has no stem bias to freeze)" if args.frozen_stem and not stem_bias else ""
        print(f"{label:>20}: {rate:6.0f} images/s, {update_seconds * 1000:5.1f} ms of it a step the optimiser "
              f"update, {macs / 1e6:6.1f}M multiply-adds per image ({rate * macs / 1e9:4.1f} G/s in the forward pass), "
              f"{plan['recipe']} recipe, {plan['threads']} threads{no_stem}")

if __name__ == "__main__":
    main()
