"""Benchmark the trainer: accuracy, time to accuracy, throughput and memory over several runs.

    python bench/bench.py                        # the plan's defaults for this machine, 2 runs
    python bench/bench.py --runs 3 --width-mult 1.5 --epochs 12
    python bench/bench.py --device cpu --model SmallCifarNet
    python bench/bench.py --nproc 2 --epochs 1     # DistributedDataParallel under torchrun, 2 processes

Each run is a real `python train.py` process on the full CIFAR-10 in --data-dir, timed from
process start to its exit (data loading, whitening, every epoch's evaluation and the final TTA
evaluation included). The per-run rows and the mean ± std go to stdout, and one dated row per
invocation is appended to bench/RESULTS.md. Never part of the test suite.
"""
import argparse
import json
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from train import PRECISIONS, cpu_model  # noqa: E402
RESULTS = ROOT / "bench" / "RESULTS.md"
THRESHOLDS = [85, 90, 91, 92, 93, 94]
DATA_LABEL = "CIFAR-10 (JPEG copy)"  # the copy this project's machines build; say so beside every figure


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--model", default=None, help="passed to train.py --model")
    p.add_argument("--width-mult", type=float, default=None, help="passed to train.py --width-mult")
    p.add_argument("--epochs", type=int, default=None, help="passed to train.py --epochs")
    p.add_argument("--batch-size", type=int, default=None, help="passed to train.py --batch-size")
    p.add_argument("--backprop-fraction", type=float, default=None, help="passed to train.py --backprop-fraction")
    p.add_argument("--small-crop-epochs", type=int, default=None, help="passed to train.py --small-crop-epochs")
    p.add_argument("--precision", choices=PRECISIONS, default=None, help="passed to train.py --precision")
    p.add_argument("--device", choices=["auto", "cpu"], default="auto", help="passed to train.py --device")
    p.add_argument("--nproc", type=int, default=1, help="processes; above 1, train.py runs under torchrun (DDP)")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--data-label", default=DATA_LABEL, help="how the data is named in RESULTS.md")
    p.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    return p.parse_args()


def trainer_flags(args):
    flags = ["--data-dir", args.data_dir, "--device", args.device]
    for flag, value in [("--model", args.model), ("--width-mult", args.width_mult), ("--epochs", args.epochs),
                        ("--batch-size", args.batch_size), ("--backprop-fraction", args.backprop_fraction),
                        ("--small-crop-epochs", args.small_crop_epochs), ("--precision", args.precision)]:
        if value is not None:
            flags += [flag, str(value)]
    return flags


def one_run(flags, seed, nproc):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    with tempfile.TemporaryDirectory() as out:
        command = [*launcher, str(ROOT / "train.py"), *flags, "--seed", str(seed), "--out-dir", out]
        start = time.time()
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        wall = time.time() - start
        if result.returncode != 0:
            sys.exit(f"train.py failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
        history = json.loads((Path(out) / "training_history.json").read_text())
    rows, final = history["epochs"], history["final"]
    train_seconds, reached = 0.0, {}
    for row in rows:
        train_seconds += row["seconds"]
        for t in THRESHOLDS:
            if row["test_acc"] >= t and t not in reached:
                reached[t] = train_seconds
    return {
        "test_acc": final["test_acc"], "test_acc_tta": final["test_acc_tta"], "wall_s": wall,
        "train_s": final["train_seconds"], "reached": reached,
        "images_per_s": sum(r["images_per_s"] for r in rows) / len(rows),
        "peak_memory_gb": final["peak_memory_gb"], "plan": history["plan"],
        "log_tail": result.stdout.splitlines()[-8:],
    }


def mean_std(values):
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def device_name(plan):
    if plan["device"].startswith("cuda"):
        return f"{torch.cuda.get_device_name(plan['device'])} x{len(plan['device_ids'])}"
    return f"{platform.processor() or platform.machine()} CPU, {plan['threads']} threads ({cpu_model()})"


def main():
    args = parse_args()
    flags = trainer_flags(args)
    runs = []
    for i in range(args.runs):
        r = one_run(flags, seed=i, nproc=args.nproc)
        runs.append(r)
        reached = ", ".join(f"{t}%: {s:.0f}s" for t, s in r["reached"].items()) or "none"
        print(f"run {i + 1}: test {r['test_acc']:.2f}% (TTA {r['test_acc_tta']:.2f}%), wall {r['wall_s']:.0f}s, "
              f"train {r['train_s']:.0f}s, {r['images_per_s']:.0f} img/s, peak {r['peak_memory_gb']:.2f} GB, "
              f"train time to {reached}", flush=True)
        print("\n".join("    " + line for line in r["log_tail"]), flush=True)  # how the run itself ended
    plan = runs[0]["plan"]
    model = f"{plan['model']}({', '.join(f'{k}={v}' for k, v in plan['model_kwargs'].items())})"
    if plan["world_size"] > 1:
        model += f", DDP x{plan['world_size']}"
    summary = {
        "acc": mean_std([r["test_acc"] for r in runs]),
        "tta": mean_std([r["test_acc_tta"] for r in runs]),
        "wall": mean_std([r["wall_s"] for r in runs]),
        "train": mean_std([r["train_s"] for r in runs]),
        "ips": mean_std([r["images_per_s"] for r in runs]),
        "mem": mean_std([r["peak_memory_gb"] for r in runs]),
    }
    to_reach = []
    for t in THRESHOLDS:
        times = [r["reached"][t] for r in runs if t in r["reached"]]
        if times:
            to_reach.append(f"{t}%: {statistics.mean(times):.0f}s ({len(times)}/{len(runs)})")
    print(f"mean ± std over {len(runs)} runs: test {summary['acc']}%, TTA {summary['tta']}%, wall {summary['wall']}s, "
          f"train {summary['train']}s, {summary['ips']} img/s, peak {summary['mem']} GB; "
          f"train time to {', '.join(to_reach) or 'none'}")
    if args.no_record:
        return
    command = "python bench/bench.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    row = (f"| {time.strftime('%Y-%m-%d')} | {device_name(plan)} | torch {torch.__version__} | {args.data_label} | "
           f"{model}, batch {plan['batch_size']}, {plan['epochs']} epochs, {plan['precision']} | {len(runs)} | "
           f"{summary['acc']} | {summary['tta']} | {', '.join(to_reach) or '-'} | {summary['train']} | "
           f"{summary['wall']} | {summary['ips']} | {summary['mem']} | `{command}` |\n")
    if not RESULTS.exists():
        RESULTS.write_text(RESULTS_HEADER)
    with open(RESULTS, "a") as f:
        f.write(row)
    print(f"appended to {RESULTS}")


RESULTS_HEADER = """# Benchmark results

Rows are appended by `python bench/bench.py`; each is the mean ± std over its runs. Accuracy is on
the test split; "TTA" is with test-time augmentation level 2. "Time to X%" is training time (epochs
only, no evaluation or start-up) until the plain per-epoch test accuracy first reached X%, with how
many runs reached it. "Wall" is the whole `python train.py` process, start to exit, including data
loading and every evaluation. Memory is peak RSS on CPU, peak allocated memory on GPU.

| date | device | torch | data | plan | runs | test acc % | TTA acc % | train time to | train s | wall s | images/s | peak GB | command |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
"""

if __name__ == "__main__":
    main()
