"""Measure accuracy against epochs for one configuration and keep it in bench/accuracy_table.json.

    python bench/accuracy_table.py --model SmallCifarNet --precision fp32 --epochs 1 2 3 4
    python bench/accuracy_table.py --model PowerCifarNet --width-mult 1.0 --precision bf16 --epochs 4 8
    python bench/accuracy_table.py --model SmallCifarNet --precision fp32 --batch-size 1000 --backprop-fraction 0.5 \
        --epochs 3 6 8
    python bench/accuracy_table.py --model PowerCifarNet --width-mult 1.0 --precision fp32 --small-crop-epochs 2 \
        --epochs 4 6 8
    python bench/accuracy_table.py --model PowerCifarNet --width-mult 1.0 --precision bf16 --epochs 10 --seeds 1 2

Each point is one real `python train.py --seed S --epochs E` run on the full CIFAR-10 in --data-dir (on this
project's machines the JPEG copy), alone on the machine; a point already in the table for the same configuration,
epochs and seed is replaced. This table is what `train.py --budget` knows of accuracy: it interpolates between the
points (the mean of the seeds run for an epoch count) and never extrapolates past them. A configuration is its
network, precision, batch, backprop fraction, small-crop epochs and device type (cpu or cuda). CPU runs are deterministic, so the
accuracy does not depend on what else ran; the times are recorded for the reader only (the trainer measures its
own speed). Never part of the test suite.
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import DATA_LABEL, device_name, one_run, trainer_flags  # noqa: E402

TABLE = Path(__file__).resolve().parent / "accuracy_table.json"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, nargs="+", required=True, help="one run per epoch count and seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="train.py --seed of each run (default: 0)")
    p.add_argument("--model", required=True, help="passed to train.py --model")
    p.add_argument("--width-mult", type=float, default=None, help="passed to train.py --width-mult")
    p.add_argument("--precision", required=True, help="passed to train.py --precision")
    p.add_argument("--batch-size", type=int, default=None, help="passed to train.py --batch-size")
    p.add_argument("--backprop-fraction", type=float, default=None, help="passed to train.py --backprop-fraction")
    p.add_argument("--small-crop-epochs", type=int, default=None, help="passed to train.py --small-crop-epochs")
    p.add_argument("--device", choices=["auto", "cpu"], default="auto", help="passed to train.py --device")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--data-label", default=DATA_LABEL, help="how the data is named in the table")
    return p.parse_args()


def entry_for(table, plan, precision):
    """The table's entry of this configuration, made if missing."""
    # The device type is part of the key: the same network in bf16 is one configuration on a CPU and another on a
    # GPU, and --budget looks up only its own device's.
    key = {"model": plan["model"], "model_kwargs": plan["model_kwargs"], "precision": precision,
           "batch_size": plan["batch_size"], "backprop_fraction": plan["backprop_fraction"],
           "small_crop_epochs": plan["small_crop_epochs"], "device_type": plan["device"].split(":")[0]}
    for entry in table["configurations"]:
        if {k: entry[k] for k in key} == key:
            return entry
    entry = dict(key, source="measured", points=[])
    table["configurations"].append(entry)
    return entry


def main():
    args = parse_args()
    for epochs, seed in [(epochs, seed) for epochs in args.epochs for seed in args.seeds]:
        args.epochs = epochs  # trainer_flags reads it
        result = one_run(trainer_flags(args), seed=seed, nproc=1)
        plan = result["plan"]
        table = json.loads(TABLE.read_text())  # read after the run: it may have been edited meanwhile
        point = {"epochs": epochs, "test_acc": result["test_acc"], "test_acc_tta": result["test_acc_tta"],
                 "data": args.data_label, "device": device_name(plan), "date": time.strftime("%Y-%m-%d"),
                 "wall_s": round(result["wall_s"], 1), "train_s": round(result["train_s"], 1),
                 "images_per_s": round(result["images_per_s"]), "seed": seed}
        entry = entry_for(table, plan, plan["precision"])
        kept = [p for p in entry["points"] if (p["epochs"], p["seed"]) != (epochs, seed)]
        entry["points"] = sorted(kept + [point], key=lambda p: (p["epochs"], p["seed"]))
        TABLE.write_text(json.dumps(table, indent=1) + "\n")
        print(f"{plan['model']} {plan['model_kwargs']} {plan['precision']}, batch {plan['batch_size']}, backprop "
              f"fraction {plan['backprop_fraction']:g}, {epochs} epochs ({plan['small_crop_epochs']} on small crops), "
              f"seed {seed}: test {point['test_acc']:.2f}% "
              f"(TTA {point['test_acc_tta']:.2f}%), wall {point['wall_s']:.0f}s, train {point['train_s']:.0f}s",
              flush=True)


if __name__ == "__main__":
    main()
