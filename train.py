"""Train a CIFAR classifier, fast, on whatever machine this runs on.

    python train.py                       # detect hardware, plan, train CIFAR-10, save to a new runs/cifar10-NNN/
    python train.py --dataset cifar100    # CIFAR-100, top-1 and top-5 accuracy
    python train.py --data-dir my_images  # your images: my_images/train/<class>/..., my_images/test/<class>/...
    python train.py --dry-run             # print the hardware, the plan and the data, touch nothing
    python train.py --help                # every flag

The story of a run, top to bottom: detect the hardware, make a plan (a pure function of the
hardware), load the data onto the training device, build the model, train, evaluate, save.
The training recipe follows airbench94_muon (Keller Jordan, 2024); each trick is commented where it is used.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import functools
import hashlib
import io
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import statistics
import sys
import time

STARTED = time.time()  # --budget counts the whole run from here: importing torch alone takes seconds
import zipfile
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import budget
from datasets import (CIFAR_IMAGE_SIZE, DATASETS, DataError, Dataset, check_image_size, choose_dataset, class_folders,
                      fetch_dataset, load_dataset)
import report
from models import MODELS, PowerCifarNet, build_model, count_macs, count_parameters

try:  # absent on Windows, where runs are still never overwritten but their folder is not locked
    import fcntl
except ImportError:
    fcntl = None
try:  # the process's peak memory on the CPU; absent on Windows, where it is reported as n/a
    import resource
except ImportError:
    resource = None

# ----------------------------------------------------------------------------------------------
# Configuration: the recipe's constants, visible in one place.

# Everything about each dataset (where it comes from, its files, labels, classes, normalisation) is one entry
# of datasets.DATASETS.
TOP5_MIN_CLASSES = 20  # top-5 accuracy is reported for datasets with this many classes or more
DEFAULT_TTA = 2  # the final evaluation's test-time augmentation: mirror + 1-pixel shifts (--tta)
# What --image-size accepts: CifarNet's three poolings need 16; memory grows with the square of the side
# (the whitening statistics of 128-pixel images alone take 8 GB), so 64 at most until the plan scales the batch.
IMAGE_SIZES = (16, 64)

# Optimiser (airbench94_muon). Conv filters: Muon, momentum whose update is orthogonalised, so every
# direction of a filter bank moves at the same rate; its step does not depend on the batch size.
# Biases and the head: Nesterov SGD with rates per example (the step is the rate times the batch).
# Every rate falls linearly from its peak to zero; no warm-up is needed.
BATCH_SIZE = 2000  # global, on every tier; on a 2-core CPU smaller batches train no more images a second (measured)
MUON_LR = 0.24  # --lr sets this; the SGD rates scale with it
MUON_MOMENTUM = 0.6
SGD_MOMENTUM = 0.85
BIAS_LR_PER_EXAMPLE = 0.053  # BatchNorm and whitening biases
HEAD_LR_PER_EXAMPLE = 0.67
WEIGHT_DECAY_PER_EXAMPLE = 2e-6  # on biases and head; Muon's filters are renormalised instead
# The ResNets' recipe (the model names its recipe: models.py): Nesterov SGD on every parameter, a linear
# warm-up, then cosine decay to zero, as the ResNet papers train them. The airbench rates above are tuned
# for CifarNet's scaled head and frozen BatchNorm scales; on a ResNet they diverge within steps (measured).
# Batch 128 at rate 0.1: the papers' CIFAR settings (He et al. 2016); on a CPU ResNet50 needed 23.3 GB at
# batch 500 (bench/RESULTS.md), and activation memory falls with the batch.
SGD_BATCH_SIZE = 128
SGD_LR = 0.1
SGD_NESTEROV_MOMENTUM = 0.9
SGD_WEIGHT_DECAY = 5e-4
SGD_WARMUP_FRACTION = 0.1  # of all steps: the large early steps need BatchNorm statistics to settle first
LABEL_SMOOTHING = 0.2  # softer targets regularise the short, high-learning-rate schedule (airbench); both recipes
STEM_BIAS_EPOCHS = 3  # a stem bias (the whitening layer's) trains only this long (its rate decays to 0), then freezes
TRANSLATE_PIXELS = 2  # random translation of up to 2 pixels (reflect padding)
# --small-crop-epochs: the first epochs train on crops of this share of the image's side (24x24 of 32x32), whose
# steps take less time; objects keep their size, so the network sees them as later whole images show them
# (progressive resizing, as fast.ai's DAWNBench entries did). Measured gain in bench/RESULTS.md.
SMALL_CROP_SIDE = 0.75
EVAL_BATCH_SIZE = 2000
PRECISIONS = ("fp32", "bf16", "fp16")  # what --precision accepts; the plan picks one per device
MIN_FREE_DISK_MB = 50
DOWNLOAD_WAIT_S = 3600  # how long torchrun's other processes of a machine wait for its first one's download
MAX_NONFINITE_STEPS = 5  # consecutive NaN/inf losses before training is declared diverged
MIN_BATCH_SIZE = 32  # out-of-memory back-off gives up below this
MAX_SEED = 2**32 - 1

# training_curves.png is redrawn at most this often while training (and always at the end, or at a stop): a drawing
# takes about half a second, longer than a whole epoch on a big GPU.
CURVES_EVERY_SECONDS = 30
RUNS_DIR = "runs"  # each run without --out-dir gets a new folder here: runs/cifar10-001, runs/cifar100-001, ...
REPORT_FILES = ("report.json", "confusion_matrix.png", "misclassified.png")  # when a run finishes, or --evaluate
RUN_FILES = ("best_model.pth", "last.pth", "training_history.json", "training_curves.png", *REPORT_FILES)
# A --folds run's own files; each fold's run is in a sub-folder fold-1/ ... fold-K/ beside them (fold_folder).
CROSS_VALIDATION_STATE = "cross_validation.json"  # what --resume continues: the plan, the seed, each fold's result
CROSS_VALIDATION_TABLE = "cross_validation.md"
CROSS_VALIDATION_FILES = (CROSS_VALIDATION_STATE, CROSS_VALIDATION_TABLE)
CROSS_VALIDATION_KIND = "cifar-trainer-cross-validation"
CROSS_VALIDATION_FORMAT = 3  # cross_validation.json's layout
FOLD_FOLDER = re.compile(r"fold-\d+")
CHECKPOINT_KIND = "cifar-trainer-state"  # "cifar10-trainer-state" before format 4
CHECKPOINT_FORMAT = 8  # last.pth's layout; raised when it changes, so an older last.pth is refused clearly
DEFAULT_DATA_DIR = "data"
# What --disable-auto uses for anything the user does not give: the reference GPU recipe.
MANUAL_DEFAULTS = dict(model="PowerCifarNet", model_kwargs={"width_mult": 1.0}, epochs=8)

EXIT_BAD_INPUT = 2
EXIT_TRAINING_FAILED = 3
EXIT_SIGINT = 130
EXIT_SIGTERM = 143
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # as a shell reports a process whose output's reader stopped early (| head)
CPU_OUT_OF_MEMORY = "DefaultCPUAllocator: can't allocate memory"  # PyTorch's RuntimeError (not an OutOfMemoryError)


def exit_code_for(signum):
    """The shell's convention, 128 + the signal number."""
    return EXIT_SIGTERM if signum == signal.SIGTERM else EXIT_SIGINT


class UserError(Exception):
    """A problem the user can fix: printed as one paragraph, exit code 2, no traceback."""


class TrainingFailed(Exception):
    """Training cannot go on (diverged, out of memory at the smallest batch): exit code 3, outputs kept."""


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM where the run stops at once: after the last epoch is saved (nothing is left to finish), or
    SIGTERM before training starts (nothing is written yet)."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


# ----------------------------------------------------------------------------------------------
# 1. Hardware


@dataclass(frozen=True)
class GPU:
    index: int
    name: str
    memory_gb: float
    bf16: bool = True  # compute capability 8.0 or newer


@dataclass(frozen=True)
class Hardware:
    gpus: tuple
    cpu_count: int
    simulated: bool = False
    cpu_bf16: bool = False  # the CPU has bf16 dot-product units (AVX512-BF16 or AMX)


def detect_hardware(cuda=True):
    """This machine as the plan sees it; cuda=False (--device cpu) describes it as if it had no GPU."""
    gpus = []
    if cuda and torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append(GPU(i, props.name, props.total_memory / 2**30, props.major >= 8))
    return Hardware(tuple(gpus), os.cpu_count() or 1, cpu_bf16=cpu_has_bf16())


def cpu_has_bf16():
    """True where oneDNN runs bf16 convolutions natively (AVX512-BF16 or AMX), i.e. faster than fp32.

    torch's probes are private: a torch without them counts as no bf16 units (the fp32 plan), not as a crash.
    """
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe() for probe in probes if probe is not None)


def cpu_model():
    """Name, family/model and vector units: sessions land on different CPUs behind the same name."""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines() if ":" in line)
        info = {k.strip(): v.strip() for k, v in info.items()}
        name = f"{info['model name']}, family {info['cpu family']} model {info['model']}"
    except (OSError, KeyError):  # not Linux
        name = "unknown CPU"
    bf16 = " with bf16" if cpu_has_bf16() else ""
    return f"{name}, {torch.backends.cpu.get_cpu_capability()}{bf16}"


def parse_simulated_gpus(spec, machine):
    """'NAME:GiB[:CC],...' (e.g. 'NVIDIA GeForce RTX 3090:24') -> `machine` (a Hardware) with those GPUs instead."""
    gpus = []
    for index, item in enumerate(spec.split(",")):
        parts = item.strip().split(":")
        try:
            if len(parts) not in (2, 3) or not parts[0].strip():
                raise ValueError
            memory_gb = float(parts[1])
            capability = float(parts[2]) if len(parts) == 3 else 8.0
            if not (0 < memory_gb < 10_000) or not math.isfinite(capability):
                raise ValueError
        except ValueError:
            raise UserError(
                f"--simulate-gpus could not read {item.strip()!r}: each GPU is NAME:GiB or "
                f"NAME:GiB:COMPUTE_CAPABILITY with a positive memory size, comma separated, e.g. "
                f"--simulate-gpus \"NVIDIA RTX A6000:48,NVIDIA GeForce RTX 3090:24\"."
            ) from None
        gpus.append(GPU(index, parts[0].strip(), memory_gb, capability >= 8.0))
    return dataclasses.replace(machine, gpus=tuple(gpus), simulated=True)


def print_hardware(hw):
    print(f"[hardware] CPU cores: {hw.cpu_count}, bf16 units: {'yes' if hw.cpu_bf16 else 'no'}")
    print(f"[hardware] GPUs: {len(hw.gpus)}{' (simulated)' if hw.simulated else ''}")
    for gpu in hw.gpus:
        print(f"[hardware] GPU {gpu.index}: {gpu.name} ({gpu.memory_gb:.1f} GB)")


# ----------------------------------------------------------------------------------------------
# 2. Plan: a pure function of the hardware description and the user's overrides.


def make_plan(hw, *, epochs=None, batch_size=None, lr=None, weight_decay=None, disable_auto=False, model=None,
              width_mult=None, precision=None, val_split=None, patience=None, folds=None, budget_seconds=None,
              backprop_fraction=None, small_crop_epochs=None, world_size=1, local_rank=0, local_world_size=1,
              threads=None):
    """Decide devices, model, batch size, learning rate, epochs, precision and how the saved model is chosen,
    each with its reason.

    Under torchrun (world_size > 1) the plan is for one rank: its device is GPU local_rank (or the
    CPU), and batch_size is the global batch, split evenly over the ranks. Nothing changes a plan once made;
    with budget_seconds (--budget), plan_for_budget makes the plan that replaces it, once the data is loaded.
    """
    reasons = {}
    group, ignored, reasons["devices"] = choose_devices(hw, disable_auto)
    model_name, model_kwargs, tier_epochs, reasons["model"] = choose_model(group, hw.cpu_bf16, disable_auto, model,
                                                                           width_mult)
    recipe = MODELS[model_name].RECIPE
    defaults = RECIPE_DEFAULTS[recipe]
    tier_batch = defaults["batch_size"]
    if world_size > 1:
        group, ignored = check_rank_gpu(hw, group, local_rank), []
        reasons["devices"] = (f"torchrun: rank on GPU {local_rank}" if group else "torchrun: ranks on the CPU (gloo)") \
            + f", {world_size} ranks"
        tier_batch -= tier_batch % world_size
    plan = {
        **placement(group, world_size),
        "ignored_gpus": [f"GPU {g.index} {g.name}" for g in ignored],
        "model": model_name,
        "model_kwargs": model_kwargs,
        "recipe": recipe,
    }
    reasons["recipe"] = ("airbench94_muon: Muon on the conv filters, SGD with per-example rates on biases and head"
                         if recipe == "muon" else
                         "the ResNet papers': Nesterov SGD, warm-up and cosine decay (the airbench rates diverge on "
                         "ResNets)")
    plan["batch_size"], reasons["batch_size"] = _given_or(batch_size, tier_batch, "--batch-size",
                                                          "the recipe's global batch")
    plan["backprop_fraction"], reasons["backprop_fraction"] = _given_or(
        backprop_fraction, 1.0, "--backprop-fraction", "every example of each batch is backpropagated")
    plan["lr"], reasons["lr"] = _given_or(lr, defaults["lr"], "--lr", defaults["lr_reason"])
    plan["weight_decay"], reasons["weight_decay"] = _given_or(weight_decay, defaults["weight_decay"],
                                                              "--weight-decay", defaults["weight_decay_reason"])
    plan["epochs"], reasons["epochs"] = _given_or(epochs, tier_epochs, "--epochs", "the default for this tier")
    plan["small_crop_epochs"], reasons["small_crop_epochs"] = _given_or(
        small_crop_epochs, 0, "--small-crop-epochs", "every epoch trains on whole images")
    # The model is evaluated on whole images: some epoch must train on them.
    if budget_seconds and plan["small_crop_epochs"] >= budget.MAX_EPOCHS_BY_TIME:
        raise UserError(f"--small-crop-epochs {plan['small_crop_epochs']} leaves no epoch on whole images within the "
                        f"{budget.MAX_EPOCHS_BY_TIME} that --budget trains at most; give fewer.")
    if not budget_seconds and plan["small_crop_epochs"] >= plan["epochs"]:
        raise UserError(f"--small-crop-epochs {plan['small_crop_epochs']} leaves none of the {plan['epochs']} epochs "
                        f"on whole images, which the model is evaluated on; give fewer, or more --epochs.")
    plan["precision"], reasons["precision"] = choose_precision(group, hw.cpu_bf16, precision)
    plan["world_size"] = world_size
    if plan["batch_size"] % world_size:
        raise UserError(f"--batch-size {plan['batch_size']} is the global batch and must divide evenly over "
                        f"the {world_size} ranks. Choose a multiple of {world_size}.")
    plan["threads"], reasons["threads"] = plan_threads(hw, local_world_size, threads)
    plan["val_split"], plan["patience"], reasons["selection"] = choose_selection(val_split, patience, folds)
    plan["budget"] = {"seconds": budget_seconds} if budget_seconds else None
    if budget_seconds:
        reasons["epochs"] = "to be chosen by --budget from a throughput probe, once the data is loaded"
    plan["reasons"] = reasons
    return plan


def placement(group, world_size):
    """Where a plan trains, from its GPU group (none: the CPU): the same rules for a new plan and a resumed one."""
    return {"device": f"cuda:{group[0].index}" if group else "cpu", "device_ids": [g.index for g in group],
            "gpu_name": group[0].name if group else None,
            "parallel": "DistributedDataParallel" if world_size > 1 else "DataParallel" if len(group) > 1 else "none"}


def choose_selection(val_split, patience, folds=None):
    """(the validation split: 0 for none, a count or a fraction of train, or fold 1 of `folds`, {"fold": 1, "folds":
    K}, whose sibling plans cross_validate makes; patience; reason). The saved model is never chosen on the test set:
    by validation accuracy when there is a validation split, else the last epoch."""
    if patience is not None and not (val_split or folds):
        raise UserError(f"--patience {patience} stops when validation accuracy stops improving, and there is no "
                        f"validation split. Add one, e.g. --val-split 5000, or drop --patience.")
    stop = f"; stop after {patience} epochs without a gain" if patience else ""
    if folds:
        return {"fold": 1, "folds": folds}, patience, (
            f"per fold, the epoch of best validation accuracy ({folds}-fold cross-validation: fold k holds out the "
            f"k-th 1/{folds} of the training images, stratified by class{stop})")
    if not val_split:
        return 0, None, ("the last epoch (no validation split: the learning rate decays to zero at the end, and "
                         "the test set is only reported, never used to choose)")
    size = f"{val_split:.0%} of" if isinstance(val_split, float) else f"{val_split:,}"
    return val_split, patience, (f"the epoch of best validation accuracy ({size} training images held out, "
                                 f"stratified by class{stop})")


def folds_of(plan):
    """K for a plan of K-fold cross-validation, else 0."""
    return plan["val_split"]["folds"] if isinstance(plan["val_split"], dict) else 0


def choose_devices(hw, disable_auto):
    """The GPUs of this machine to train on (none: the CPU), the ones left out, and why. Under torchrun each
    rank takes its own one of them (check_rank_gpu); the model tier is still chosen for the machine's."""
    if not hw.gpus:
        return [], [], "no CUDA GPU found: training on the CPU"
    if disable_auto:
        return [hw.gpus[0]], [], "--disable-auto: the first GPU, no DataParallel"
    group, ignored = choose_gpu_group(hw.gpus)
    reason = f"{len(group)} x {group[0].name}, the most common model here"
    if ignored:
        reason += " (DataParallel runs at the pace of its slowest GPU, so others are left out)"
    return group, ignored, reason


def choose_gpu_group(gpus):
    """Keep the most common GPU model (ties: more total memory); DataParallel wants equal GPUs."""
    by_name = {}
    for gpu in gpus:
        by_name.setdefault(gpu.name, []).append(gpu)
    group = max(by_name.values(), key=lambda g: (len(g), sum(x.memory_gb for x in g)))
    ignored = [gpu for gpu in gpus if gpu not in group]
    return group, ignored


def choose_model(group, cpu_bf16, disable_auto=False, model=None, width_mult=None):
    """(name, kwargs, epochs, reason): the tier's network, or the one --model/--width-mult name."""
    if disable_auto:
        name, kwargs, epochs = MANUAL_DEFAULTS["model"], MANUAL_DEFAULTS["model_kwargs"], MANUAL_DEFAULTS["epochs"]
        reason = "--disable-auto: the documented default model"
    else:
        name, kwargs, epochs, reason = model_tier(group, cpu_bf16)
    if model is not None or width_mult is not None:
        name = model or ("PowerCifarNet" if width_mult is not None else name)
        kwargs = {"width_mult": width_mult or 1.0} if name == "PowerCifarNet" else {}
        reason = "set by --model/--width-mult"
    return name, dict(kwargs), epochs, reason


def model_tier(group, cpu_bf16):
    """The model tier, with the reason. group is empty for CPU training.

    Tiers (epochs are per-tier defaults; more GPU memory and more GPUs buy a wider network):
      CPU with bf16 units          PowerCifarNet(1.0)       bf16 makes the airbench94 network affordable on 2 cores
      other CPUs                   SmallCifarNet            3.3x the throughput of PowerCifarNet(1.0) on a CPU
      any GPU under 8 GB           SmallCifarNet            fits and stays fast on small cards
      1 GPU, 8-40 GB               PowerCifarNet(1.0)       the airbench94 network: 94% in seconds
      2+ GPUs or 40+ GB            PowerCifarNet(1.5)       2.2x the work per image for more accuracy
      3+ GPUs and 60+ GB in all    PowerCifarNet(2.5)       6x the work per image, the most accurate
    """
    if not group and cpu_bf16:
        return ("PowerCifarNet", {"width_mult": 1.0}, 8,
                "CPU with bf16 units: the airbench94 network in bf16, 90.6-90.8% on CIFAR-10 (JPEG copy) in 7 to 14 "
                "minutes on 2 cores")
    if not group:
        return ("SmallCifarNet", {}, 10,
                "CPU: the light network trains 3.3x faster than the GPU network on a CPU")
    total_gb = sum(g.memory_gb for g in group)
    if len(group) >= 3 and total_gb >= 60:
        return ("PowerCifarNet", {"width_mult": 2.5}, 16,
                f"{len(group)} GPUs with {total_gb:.0f} GB in all: the widest network pays for itself")
    if len(group) >= 2 or total_gb >= 40:
        return ("PowerCifarNet", {"width_mult": 1.5}, 10,
                f"{len(group)} GPU(s) with {total_gb:.0f} GB: a 1.5x wider network for more accuracy")
    if min(g.memory_gb for g in group) < 8:
        return ("SmallCifarNet", {}, 10,
                f"a {group[0].memory_gb:.0f} GB GPU: the light network keeps memory and time low")
    return ("PowerCifarNet", {"width_mult": 1.0}, 8,
            f"one {total_gb:.0f} GB GPU: the airbench94-sized network, 94% on the original CIFAR-10 in seconds")


RECIPE_DEFAULTS = {
    "muon": dict(batch_size=BATCH_SIZE, lr=MUON_LR, weight_decay=WEIGHT_DECAY_PER_EXAMPLE,
                 lr_reason="the recipe's Muon rate for the conv filters; the per-example SGD rates of biases and "
                           "head scale with it", weight_decay_reason="the recipe's, per example"),
    "sgd": dict(batch_size=SGD_BATCH_SIZE, lr=SGD_LR, weight_decay=SGD_WEIGHT_DECAY,
                lr_reason="the recipe's peak SGD rate (the papers' 0.1 at batch 128)",
                weight_decay_reason="the recipe's"),
}


def choose_precision(group, cpu_bf16, precision=None):
    """(precision, reason): --precision if this device can run it, else the fastest the device runs well."""
    if precision is not None:
        check_precision(precision, group)
        return precision, "set by --precision"
    if group and all(g.bf16 for g in group):
        return "bf16", "bf16 autocast: supported by these GPUs, no loss scaling needed"
    if group:
        return "fp16", "fp16 autocast with a gradient scaler: these GPUs lack fast bf16"
    if cpu_bf16:
        return "bf16", "bf16 autocast: this CPU's bf16 units run the convolutions 1.6x faster than fp32"
    return "fp32", "fp32: CPUs without bf16 units run half precision slower, not faster"


def check_precision(precision, group):
    """Refuse --precision values this device cannot run: fp16 needs a GPU, bf16 on a GPU needs Ampere or newer."""
    if precision == "fp16" and not group:
        raise UserError("--precision fp16 needs a CUDA GPU: on the CPU it is slow and its gradient scaling buys "
                        "nothing. Use --precision bf16 or fp32.")
    if precision == "bf16" and group and not all(g.bf16 for g in group):
        raise UserError(f"--precision bf16 needs a GPU of compute capability 8.0 or newer; {group[0].name} lacks "
                        f"bf16. Use --precision fp16 or fp32.")


def check_rank_gpu(hw, group, local_rank):
    """Under torchrun each rank takes GPU local_rank; it must be of the node's chosen model."""
    if not hw.gpus:
        return []
    if local_rank >= len(hw.gpus):
        raise UserError(f"LOCAL_RANK {local_rank} has no GPU: only {len(hw.gpus)} are visible. Start torchrun with "
                        f"--nproc_per_node={len(group)} or fewer.")
    mine = hw.gpus[local_rank]
    if mine.name != group[0].name:
        raise UserError(f"Rank with LOCAL_RANK {local_rank} would train on GPU {local_rank} ({mine.name}), but this "
                        f"machine trains on its {len(group)} x {group[0].name}; mixed GPUs make every rank wait for "
                        f"the slowest. Restart with {torchrun_command(len(group), [g.index for g in group])} ... "
                        f"so that every rank gets a {group[0].name}.")
    return [mine]


def plan_threads(hw, local_world_size, threads):
    return _given_or(threads, max(1, hw.cpu_count // local_world_size), "OMP_NUM_THREADS",
                     "one intra-op thread per core (shared among this machine's ranks); no loader workers needed")


def threads_from_environment():
    """OMP_NUM_THREADS, if set, is the user's word on threads (torchrun sets 1 per rank unless it is given)."""
    value = os.environ.get("OMP_NUM_THREADS")
    if value is None:
        return None
    if not value.strip().isdigit() or int(value) < 1:
        raise UserError(f"OMP_NUM_THREADS is {value!r}; it must be a whole number of threads, 1 or more. "
                        f"Set it so, or unset it to use one thread per core.")
    return int(value)


def _given_or(value, default, flag, why):
    return (value, f"set by {flag}") if value is not None else (default, why)


def plan_for_flags(args, hw, dist, threads=None):
    """A new run's plan: make_plan with the user's flags, for this process's place under torchrun."""
    return make_plan(hw, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                     disable_auto=args.disable_auto, model=args.model, width_mult=args.width_mult,
                     precision=args.precision, val_split=args.val_split, patience=args.patience, folds=args.folds,
                     budget_seconds=args.budget, backprop_fraction=args.backprop_fraction,
                     small_crop_epochs=args.small_crop_epochs,
                     world_size=dist.world_size, local_rank=dist.local_rank, local_world_size=dist.local_world_size,
                     threads=threads)


def place_resumed_plan(saved, hw, world_size=1, local_rank=0, local_world_size=1, threads=None):
    """A resumed run keeps its model, schedule and precision; where it runs follows the machine it resumes on:
    each torchrun rank its own GPU, as many GPUs as it had (or as there are), or the CPU if there is none
    (or --device cpu). Returns the plan and what changed, to be said. Refuses a precision this machine lacks.
    """
    if world_size > 1:
        group = check_rank_gpu(hw, choose_gpu_group(hw.gpus)[0], local_rank) if hw.gpus else []
    elif saved["device_ids"] and hw.gpus:
        group = choose_gpu_group(hw.gpus)[0][:len(saved["device_ids"])]
    else:
        group = []
    plan = dict(saved, **placement(group, world_size), reasons=dict(saved["reasons"]), ignored_gpus=[])
    plan["threads"], plan["reasons"]["threads"] = plan_threads(hw, local_world_size, threads)

    def where(p):
        return f"{len(p['device_ids'])} x {p['gpu_name']}" if p["device_ids"] else "the CPU"

    try:
        check_precision(plan["precision"], group)
    except UserError:
        raise UserError(f"--resume: this run trains in {plan['precision']}, which {where(plan)} here cannot run "
                        f"(it started on {where(saved)}). Resume it on a machine like the one it started on; a "
                        f"run cannot change its precision halfway.") from None
    if where(saved) == where(plan):
        return plan, []
    plan["reasons"]["devices"] = f"resumed on {where(plan)}, was {where(saved)}"
    change = f"it trained on {where(saved)} and continues on {where(plan)}"
    if bool(group) != bool(saved["device_ids"]):  # a GPU's random generator cannot continue on the CPU's
        change += "; the data order from this point on differs from an uninterrupted run's"
    return plan, [change]


def torchrun_command(processes, gpu_ids=()):
    """How to start this trainer under torchrun on one machine (on several, add your usual torchrun flags)."""
    visible = f"CUDA_VISIBLE_DEVICES={','.join(map(str, gpu_ids))} " if gpu_ids else ""
    return f"{visible}torchrun --standalone --nproc_per_node={processes} train.py"


def model_text(name, kwargs):
    """How logs name a model: PowerCifarNet(width_mult=1.5), ResNet18()."""
    return f"{name}({', '.join(f'{k}={v}' for k, v in kwargs.items())})"


def print_plan(plan):
    r = plan["reasons"]
    if plan["device_ids"]:
        print(f"[gpu] using {plan['gpu_name']} x{len(plan['device_ids'])}"
              + (f" (ignored: {', '.join(plan['ignored_gpus'])})" if plan["ignored_gpus"] else ""))
    print(f"[plan] device: {plan['device']} ({r['devices']})")
    print(f"[plan] model: {model_text(plan['model'], plan['model_kwargs'])} ({r['model']})")
    print(f"[plan] recipe: {plan['recipe']} ({r['recipe']})")
    print(f"[plan] batch size: {plan['batch_size']} ({r['batch_size']})")
    if plan["backprop_fraction"] < 1:
        print(f"[plan] backpropagated: the hardest {plan['backprop_fraction']:.0%} of each batch "
              f"({r['backprop_fraction']})")
    print(f"[plan] learning rate: {plan['lr']:.4g} ({r['lr']})")
    print(f"[plan] weight decay: {plan['weight_decay']:.4g} ({r['weight_decay']})")
    print(f"[plan] epochs: {plan['epochs']} ({r['epochs']})")
    if plan["small_crop_epochs"]:
        epochs = "epoch trains" if plan["small_crop_epochs"] == 1 else f"{plan['small_crop_epochs']} epochs train"
        print(f"[plan] small crops: the first {epochs} on random crops of "
              f"{SMALL_CROP_SIDE:.0%} of the image's side ({r['small_crop_epochs']})")
    print(f"[plan] precision: {plan['precision']} ({r['precision']})")
    print(f"[plan] threads: {plan['threads']} ({r['threads']})")
    print(f"[plan] saved model: {r['selection']}")
    if plan["parallel"] == "DataParallel":
        print(f"[plan] parallel: DataParallel over devices {plan['device_ids']}")
        print(f"[plan] for DistributedDataParallel instead: "
              f"{torchrun_command(len(plan['device_ids']), plan['device_ids'])}")
    elif plan["parallel"] == "DistributedDataParallel":
        print(f"[plan] parallel: DistributedDataParallel, {plan['world_size']} ranks, "
              f"{plan['batch_size'] // plan['world_size']} images per rank per step")


# --budget: the plan's model and epochs chosen by measurement. The plan above is made first, from the hardware's
# description; once the data is loaded, a short throughput probe measures each candidate configuration here and
# budget.choose (pure) picks the most accurate one that fits, whose plan replaces it before anything trains.

PROBE_SHARE = 0.05  # of the budget, at most, spent probing
PROBE_STEPS = 5  # timed training steps per candidate and stem state, each after a warm-up step (it allocates memory,
# picks kernels)
PROBE_CPU_BATCH = 500  # images backpropagated per probe step on a CPU, where a step of 2000 takes seconds. The
# probe times the step's optimiser update too, which takes as long at any batch, to give the run's batch its speed
FORECAST_CURVES_SECONDS = 0.5  # drawing training_curves.png (measured; see RESULTS); the checkpoints are probed
FORECAST_REPORT_SECONDS = 3.0  # the report's figures and the final saves (measured under it on a fast CPU; see RESULTS)
FORETELLING_OVERESTIMATE = 1.6  # the most a CPU probe's foretelling of another network's speed may read it slow: it
# read PowerCifarNet's training steps 1.17 to 1.59 times slow from SmallCifarNet's probe (see RESULTS)


def plan_for_budget(args, hw, plan, dataset, data, dist, out_dir):
    """The plan for --budget: probe the candidates (the table's configurations for this device, or the plan's own
    model when --model or another dataset fixes it), choose, print the forecast and return the chosen plan."""
    candidates, by_time = budget_candidates(args, plan, dataset, budget.load_table())
    budget_seconds = plan["budget"]["seconds"]
    # Refused before a probe of tens of seconds where nothing could come of it.
    spent = dist.broadcast_object(time.time() - STARTED)  # rank 0's, as the choice is
    if spent >= budget_seconds:
        raise UserError(f"--budget {budget.duration_text(budget_seconds)} was spent before training could start: "
                        f"starting up and loading the data took {budget.duration_text(spent)}. Give --budget "
                        f"{math.ceil(2 * spent / 60)}m or more. Nothing was trained or written.")
    fitting = [c for c in candidates if c.batch_size <= len(data.train_images)]
    if not fitting:
        raise UserError(batch_too_large(min(c.batch_size for c in candidates), len(data.train_images)))
    candidates = fitting
    tta = requested_tta(args)
    probes, records = probe_candidates(plan, candidates, data, dist, budget_seconds, budget_workload(data, dist),
                                       tta, out_dir)
    workload = budget_workload(data, dist)
    try:
        outcome = budget.choose(candidates, probes, workload, budget_seconds, tta, by_time)
    except budget.NoFit as no_fit:
        outcome = no_fit
    outcome = dist.broadcast_object(outcome)  # rank 0's timings decide for every rank
    if isinstance(outcome, budget.NoFit):
        quickest = outcome.quickest
        raise UserError(
            f"--budget {budget.duration_text(budget_seconds)} is too short for anything the trainer knows here: the "
            f"quickest, {quickest.candidate.label} for {quickest.epochs:g} epochs, would take "
            f"{budget.duration_text(quickest.seconds)} on this machine (start-up, data and probe included). Give "
            f"--budget {math.ceil(outcome.smallest_budget / 60)}m or more. Nothing was trained or written.")
    chosen = budget_plan(plan, outcome, records, workload, tta, by_time)
    print_budget_choice(outcome, budget_seconds, tta)
    return chosen


def budget_workload(data, dist):
    """What a run does besides training steps, for the forecast, with the seconds spent so far."""
    validation_images = len(data.val_images) if has_validation(data) else 0
    # The probe's evaluation rate is every rank's together; the final evaluations run on rank 0 alone (finish_run),
    # so each of their images counts as many times as there are ranks.
    return budget.Workload(
        train_images=len(data.train_images), eval_images=validation_images,
        final_eval_images=(len(data.test_images) + validation_images) * dist.world_size,
        spent_seconds=time.time() - STARTED, curves_seconds=FORECAST_CURVES_SECONDS,
        curves_every_seconds=CURVES_EVERY_SECONDS, report_seconds=FORECAST_REPORT_SECONDS,
        stem_bias_epochs=STEM_BIAS_EPOCHS)


def budget_candidates(args, plan, dataset, table):
    """(candidates, by_time). The table's configurations for this device (a CPU: its plan's precision; a GPU: those
    measured in either half precision, trained in the plan's), batch size, backprop fraction and small-crop epochs
    (the table's accuracy holds at its own; each as given, if given), or just the plan's network and batch when
    --model or another dataset than the table's fixes the model; by_time when no accuracy is known, so the most
    epochs that fit win."""
    device_type = torch.device(plan["device"]).type
    precisions = (plan["precision"],) if device_type == "cpu" else ("bf16", "fp16")
    found = [dataclasses.replace(c, precision=plan["precision"]) for precision in precisions
             for c in budget.table_candidates(table, device_type, precision, args.model, args.width_mult)
             if args.batch_size in (None, c.batch_size) and args.backprop_fraction in (None, c.backprop_fraction)
             and args.small_crop_epochs in (None, c.small_crop_epochs) and c.batch_size % plan["world_size"] == 0]
    if dataset.key != budget.TABLE_DATASET:
        found = []
    elif args.model is not None:  # the plan's configuration: its epochs are chosen, and small crops unless given
        found = [c for c in found if c.model_kwargs == plan["model_kwargs"] and c.batch_size == plan["batch_size"]
                 and c.backprop_fraction == plan["backprop_fraction"]]
    if not found:
        return [budget.Candidate(plan["model"], dict(plan["model_kwargs"]), plan["precision"], plan["batch_size"],
                                 plan["backprop_fraction"], plan["small_crop_epochs"])], True
    return found, False


def candidate_plan(plan, candidate):
    return dict(plan, model=candidate.model, model_kwargs=dict(candidate.model_kwargs),
                batch_size=candidate.batch_size, backprop_fraction=candidate.backprop_fraction,
                small_crop_epochs=candidate.small_crop_epochs)


def probe_candidates(plan, candidates, data, dist, budget_seconds, workload, tta, out_dir):
    """Measure each candidate's training and evaluation images/s and checkpoint time here, within PROBE_SHARE of the
    budget: the cheapest first, then on a CPU those that could win first. Returns the probes (None: not measured)
    parallel to candidates, and what to print and keep of them."""
    probes, records, started = [None] * len(candidates), [None] * len(candidates), time.time()
    # On a GPU the first probe is needed whatever it costs: most of its time is the device's one-time start that
    # training would pay anyway (its context, cuDNN's kernel search; seconds, against milliseconds a step). The share
    # bounds the probes after it. On a CPU there is no such start: every probe counts.
    spent, on_gpu = 0.0, torch.device(plan["device"]).type == "cuda"
    cost = [count_macs(build_model(c.model, num_classes=len(data.class_names), **c.model_kwargs),
                       data.train_images.shape[-1]) for c in candidates]
    # One probe per network, backprop fraction and probe batch: on a CPU every batch size is probed backpropagating
    # PROBE_CPU_BATCH images a step, so the candidates that differ only in batch share one measurement, read at each
    # one's batch (budget.at_batch), and the choice between them is not made by noise.
    probed = {}  # (model, model_kwargs, backprop fraction, probe batch) -> (the probe, the label of what it measured)
    keys = [(c.model, tuple(sorted(c.model_kwargs.items())), c.backprop_fraction,
             probe_batch_size(candidate_plan(plan, c), data, dist)) for c in candidates]
    # A probe times small crops too where any candidate it measures trains on them.
    small_crop_keys = {key for key, c in zip(keys, candidates) if c.small_crop_epochs}
    # On a CPU a probe's steps take time in proportion to their work, so the last probe foretells the others (a wide
    # network's probe is several times a small one's; bench/RESULTS.md):
    # - its seconds (foretold_probe_seconds): a probe that would pass the share is not started;
    # - its speed (foretold_probe): the accuracy the candidate is foretold to reach, and, read FORETELLING_OVERESTIMATE
    #   times quick, the most it could reach. The one foretold to reach the most is probed next (then, among those
    #   foretold to fit nothing, the one that could reach the most), and one with no run that fits even read quick
    #   is left out. Cheapest first, a 10-minute fp32 budget's two small-network probes spent 16 s of its 30 s share,
    #   and PowerCifarNet, foretold at 15.6 s, was left out though it would have won. Ordered by what they could
    #   reach at best, a 10-minute bf16 budget probed PowerCifarNet(1.0) (14 s; it could not win) before the 0.75-wide
    #   network, which then did not fit the share though it would have won (bench/RESULTS.md, twenty-seventh session).
    # On a GPU they do not (a new network's kernel search, a small network's idle device): the cheapest goes first,
    # and only the seconds spent are counted.
    # On either, a candidate whose table tops out below the forecast for what was measured cannot win: not probed.
    last, share = None, PROBE_SHARE * budget_seconds  # last: (seconds, its steps' seconds, its step's work, index)
    waiting = sorted(range(len(candidates)), key=cost.__getitem__)
    while waiting:
        now = dataclasses.replace(workload, spent_seconds=workload.spent_seconds + time.time() - started)
        could_reach = {}  # index -> the best accuracy it could reach, foretold read quick (None: no run fits)
        if last and not on_gpu:
            last_seconds, last_steps_seconds, last_work, last_index = last

            def reach(i, quicker_by):
                return budget.best_forecast_accuracy(
                    [candidates[i]], [foretold_probe(probes[last_index], candidates[last_index], cost[last_index],
                                                     candidates[i], cost[i], quicker_by)], now, budget_seconds, tta)

            foretold_reach = {i: reach(i, 1.0) for i in waiting if candidates[i].points}  # at the foretold speed
            could_reach = {i: reach(i, FORETELLING_OVERESTIMATE) for i in waiting if candidates[i].points}
            waiting.sort(key=lambda i: (-(foretold_reach.get(i) or -math.inf), -(could_reach.get(i) or -math.inf),
                                        cost[i]))  # cheapest first among equals
        index = dist.broadcast_object(waiting[0])  # every rank probes the same candidates: each step is a collective
        waiting.remove(index)
        candidate, key, skip, shared, timing = candidates[index], keys[index], None, "", {}
        work = step_work(cost[index], key[-1], candidate.backprop_fraction)
        foretold = foretold_probe_seconds(last_seconds, last_steps_seconds, last_work, work) \
            if last and not on_gpu else 0.0
        measured_best = budget.best_forecast_accuracy(candidates, probes, now, budget_seconds, tta)
        measured = None  # the probe's figures at the batch it timed; probes[index] holds them at the candidate's
        if key in probed:
            measured, measured_label = probed[key]
            shared = f" (shared with {measured_label}: both probed at batch {key[-1]})"
        elif index in could_reach and could_reach[index] is None:
            shortest = candidate.points[0][0]
            skip = (f"not probed: even {FORETELLING_OVERESTIMATE:g} times quicker than the probe of "
                    f"{candidates[last_index].label} foretells, its shortest measured run ({shortest:g} "
                    f"epoch{'s' * (shortest != 1)}) would not fit the budget")
        elif candidate.points and measured_best is not None and candidate.points[-1][1] < measured_best:
            longest, most = candidate.points[-1]
            skip = (f"not probed: the most its table holds, {most:.2f}% after {longest:g} epochs, is below the "
                    f"{measured_best:.2f}% forecast for what was measured")
        elif spent > share:
            skip = f"not probed: the probes' share of the budget ({PROBE_SHARE:.0%}, {share:.1f}s) is spent"
        elif spent + foretold > share:
            skip = (f"not probed: foretold at {foretold:.1f}s, it would take the probes past their share of the "
                    f"budget ({PROBE_SHARE:.0%}, {share:.1f}s; {spent:.1f}s spent)")
        skip = dist.broadcast_object(skip)
        if skip is None and not shared:
            t0 = time.time()
            measured = dist.broadcast_object(probe_throughput(candidate_plan(plan, candidate), data, dist, out_dir,
                                                              small_crops=key in small_crop_keys))
            probe_seconds = time.time() - t0
            spent += probe_seconds if probed or not on_gpu else 0.0
            if measured is not None:  # one that ran out of memory stopped early
                last = probe_seconds, probe_steps_seconds(measured, key[-1] * dist.world_size), work, index
            probed[key] = measured, candidate.label
            # Kept to check the foretelling by: the seconds this probe took, and those foretold (none for the first).
            timing = {"probe_seconds": round(probe_seconds, 2), "foretold_seconds": round(foretold, 2) or None}
        if skip is None and measured is None:
            skip = "out of memory at this batch"
        if not skip:
            probes[index] = budget.at_batch(measured, candidate.batch_size)
        probe = probes[index]
        records[index] = {"configuration": candidate.label, "skipped": skip} if skip else {
            "configuration": candidate.label, "train_images_per_s": round(probe.train_images_per_s, 1),
            "frozen_stem_train_images_per_s": round(probe.frozen_stem_train_images_per_s, 1),
            "small_crop_train_images_per_s": probe.small_crop_train_images_per_s and round(
                probe.small_crop_train_images_per_s, 1),
            "eval_images_per_s": round(probe.eval_images_per_s, 1), "save_seconds": round(probe.save_seconds, 2),
            "probe_batch_size": measured.batch_size, "update_seconds": round(measured.update_seconds, 4), **timing}
        took = f", probed in {timing['probe_seconds']:.1f}s" if timing else ""
        print(f"[budget] probe {candidate.label}: " + (skip or probe_text(probe, measured) + took + shared),
              flush=True)
    print(f"[budget] probing took {time.time() - started:.1f}s")
    return probes, records


def probe_text(probe, measured):
    """The probe's speeds at the candidate's batch, and how they were had from the batch it timed (budget.at_batch)."""
    small_crops = f", {probe.small_crop_train_images_per_s:,.0f} on small crops" \
        if probe.small_crop_train_images_per_s else ""
    timed_at = f"; timed at batch {measured.batch_size:,}: {measured.train_images_per_s:,.0f}, with " \
        f"{measured.update_seconds * 1000:.0f} ms of optimiser update a step" \
        if probe.batch_size != measured.batch_size else ""
    return (f"{probe.train_images_per_s:,.0f} images/s training ({probe.frozen_stem_train_images_per_s:,.0f} once the "
            f"stem bias freezes{small_crops}{timed_at}), {probe.eval_images_per_s:,.0f} evaluating, checkpoints "
            f"{probe.save_seconds:.2f}s")


def step_work(macs, batch, backprop_fraction):
    """Multiply-adds of one training step (training_step) of `batch` images: a forward and a backward pass (two
    forwards' worth) of those backpropagated, and below a fraction of 1 a gradient-free forward of all of them."""
    return macs * (3 * batch * backprop_fraction + (batch if backprop_fraction < 1 else 0))


def probe_steps_seconds(probe, batch):
    """Seconds the probe's training steps of `batch` images took: a warm-up and PROBE_STEPS at each stem state and
    on small crops if timed (a network without a stem bias times one state only; none is a table candidate, where
    several are probed)."""
    speeds = (probe.train_images_per_s, probe.frozen_stem_train_images_per_s, probe.small_crop_train_images_per_s)
    return (PROBE_STEPS + 1) * batch * sum(1 / speed for speed in speeds if speed)


def foretold_probe_seconds(last_seconds, last_steps_seconds, last_work, work):
    """A CPU probe's seconds, foretold from the last probe's: its steps' seconds scaled by their work (step_work), and
    the rest (building the model, first allocations, an evaluation, the checkpoints) as long as the last one's. Scaled
    whole, a small network's probe foretold PowerCifarNet's at nearly twice its seconds (bench/RESULTS.md).
    A probe's steps on small crops (about 3 s of PowerCifarNet's in fp32) are not counted: this already reads that
    network's probe 10-15% slow, and counted, they took a 10-minute budget's probes past their share on paper, so
    the network was left out, where probing it with them took 28.7 s in all, within the 30 s (bench/RESULTS.md).
    Foretold the other way, from a larger network's probe, a smaller one's steps read quick, so its probe may pass
    the share by a few seconds (a small network's steps take a few seconds in all)."""
    return max(0.0, last_seconds - last_steps_seconds) + last_steps_seconds * work / last_work


def foretold_probe(last_probe, last_candidate, last_macs, candidate, macs, quicker_by):
    """A CPU candidate's probe as the last one foretells it, read quicker_by times quick (FORETELLING_OVERESTIMATE:
    the most its own could measure). Training speeds scale by work per image (step_work), evaluation by
    multiply-adds per image, small crops by their fewer pixels where the last probe did not time them; the
    checkpoints take the last's time (a tenth of a second a save, whichever network: too little to matter)."""
    quicker = quicker_by * (step_work(last_macs, 1, last_candidate.backprop_fraction)
                            / step_work(macs, 1, candidate.backprop_fraction))
    small_crop_speedup = last_probe.small_crop_speedup if last_probe.small_crop_train_images_per_s \
        else 1 / SMALL_CROP_SIDE ** 2
    return budget.Probe(
        train_images_per_s=last_probe.train_images_per_s * quicker,
        eval_images_per_s=last_probe.eval_images_per_s * quicker_by * last_macs / macs,
        save_seconds=last_probe.save_seconds,
        frozen_stem_train_images_per_s=last_probe.frozen_stem_train_images_per_s * quicker,
        small_crop_train_images_per_s=last_probe.train_images_per_s * quicker * small_crop_speedup
        if candidate.small_crop_epochs else None)


def probe_batch_size(plan, data, dist):
    """Images per probe step on each rank: the plan's, but on a CPU at most what backpropagates PROBE_CPU_BATCH."""
    batch = plan["batch_size"] // dist.world_size
    if torch.device(plan["device"]).type == "cpu":
        batch = min(batch, round(PROBE_CPU_BATCH / plan["backprop_fraction"]))
    return min(batch, len(data.train_images))


def probe_throughput(plan, data, dist, out_dir, small_crops=False):
    """Images/s of training steps, before and after the stem bias freezes (and on small crops before, if
    small_crops), and of evaluation for this plan's configuration on its device, from warmed-up steps on real
    training images, and the seconds to write its checkpoints into out_dir (the model is thrown away after). On a
    CPU, whose probe steps hold fewer images than the run's (probe_batch_size), the seconds of a step's optimiser
    update too (budget.at_batch). None if it runs out of memory."""
    device, model, forward_model, autocast_dtype, scaler = prepare_training(plan, data)
    optimizer = make_optimizer(model, plan)
    batch = probe_batch_size(plan, data, dist)
    inputs = normalize(data.train_images[:batch], (data.mean, data.std)).contiguous(memory_format=torch.channels_last)
    labels = data.train_labels[:batch]
    set_learning_rates(optimizer, plan, backpropagated(plan["batch_size"], plan["backprop_fraction"], dist.world_size),
                       0, 1)

    def timed(works, repeats):
        """Each work's median seconds a call, after a warm-up call of each: single steps on a shared machine vary
        by a third. The works take turns, so a machine whose speed drifts during the probe slows them alike and the
        ratios between them hold (measured one after another, a slow spell once read the frozen stem 1.63 times
        quicker where the run's epochs then ran 1.25 times; bench/RESULTS.md, twenty-seventh session)."""
        seconds = [[] for _ in works]
        for repeat in range(repeats + 1):
            for work, times in zip(works, seconds):
                t0 = time.perf_counter()
                work()
                synchronize(device)
                if repeat:
                    times.append(time.perf_counter() - t0)
        return [statistics.median(times) for times in seconds]

    def step(inputs=inputs):
        training_step(forward_model, optimizer, scaler, inputs, labels, autocast_dtype, dist, plan["backprop_fraction"])

    # After STEM_BIAS_EPOCHS the stem bias freezes (train_one_epoch), and the conv after the stem no longer computes
    # its input's gradient: those epochs' steps are quicker (bench/RESULTS.md, fifteenth session), so a run's later
    # epochs are forecast at their own speed.
    stem_bias = model.parameter_groups()["stem_bias"]

    def frozen_stem_step():
        for parameter in stem_bias:
            parameter.requires_grad = False
        step()
        for parameter in stem_bias:
            parameter.requires_grad = True

    def update():  # the step's last part alone, again on the last step's gradients
        scaler.step(optimizer)
        scaler.update()

    works = [step, frozen_stem_step] if stem_bias else [step]
    try:
        if small_crops:  # a window as TrainBatches cuts: fewer pixels, and new kernels for the shape
            side = small_crop_side(inputs.shape[-1])
            crops = inputs[:, :, :side, :side].contiguous(memory_format=torch.channels_last)
            works.append(lambda: step(crops))
        on_cpu = device.type == "cpu"
        if on_cpu:  # a GPU probes the run's own batch
            works.append(update)
        step_seconds, *other_seconds = timed(works, PROBE_STEPS)
        # At most as long as a step before: it does less work, and a longer median is the machine's noise.
        frozen_stem_step_seconds = min(other_seconds.pop(0), step_seconds) if stem_bias else step_seconds
        small_crop_step_seconds = other_seconds.pop(0) if small_crops else None
        # A part of every step: at most as long as the quickest of them.
        update_seconds = min(other_seconds.pop(0), frozen_stem_step_seconds, small_crop_step_seconds or math.inf) \
            if on_cpu else 0.0
        eval_images = data.test_images[:min(EVAL_BATCH_SIZE, batch)]
        eval_seconds, = timed([lambda: predict_batch(model, eval_images, (data.mean, data.std), 0, autocast_dtype)], 2)
    except torch.OutOfMemoryError:  # its memory returns to the allocator with this function's locals
        return None
    save_seconds = checkpoint_seconds(model, optimizer, out_dir) if dist.is_main else 0.0  # rank 0 alone saves
    return budget.Probe(batch * dist.world_size / step_seconds, len(eval_images) * dist.world_size / eval_seconds,
                        save_seconds, batch * dist.world_size / frozen_stem_step_seconds,
                        small_crop_step_seconds and batch * dist.world_size / small_crop_step_seconds,
                        batch * dist.world_size, update_seconds)


def checkpoint_seconds(model, optimizer, out_dir):
    """Seconds to write the bulk of an epoch's checkpoints of this model, serialised and synced as save_checkpoint
    writes them: its weights (best_model.pth), then two copies of them (the model's and the best epoch's) and the
    optimizer's state (last.pth). They go to last.pth's temporary name in the run's folder, removed at once (after
    a kill, by the next claim of the folder); the disk's speed counts."""
    path = temporary_path(out_dir / "last.pth", os.getpid())
    t0 = time.perf_counter()
    try:
        weights = model.state_dict()
        best_weights = {name: tensor.clone() for name, tensor in weights.items()}
        for state in ({"model": weights}, {"model": weights, "best_state": best_weights,
                                           "optimizer": optimizer.state_dict()}):
            write_synced(path, checkpoint_bytes(state))
    except OSError as e:
        raise UserError(write_failure_message(path, e)) from None
    finally:
        path.unlink(missing_ok=True)
    return time.perf_counter() - t0


def budget_plan(plan, choice, probes, workload, tta, by_time):
    """The plan with the chosen configuration and epochs, and the forecast, which the run compares with what it
    reaches (history["final"]["budget"])."""
    best, runner_up = choice.best, choice.runner_up
    reasons = dict(plan["reasons"])
    if by_time:
        reasons["model"] += ("; --budget chose the epochs: the most that fit (no measured accuracy for this data or "
                             "configuration)")
    else:
        reasons["model"] = (f"--budget: the most accurate configuration that fits, forecast {best.accuracy:.2f}% "
                            f"({best.candidate.source})")
    for field in ("batch_size", "backprop_fraction", "small_crop_epochs"):
        if plan[field] != getattr(best.candidate, field):
            reasons[field] = "the measured configuration's"
    reasons["epochs"] = "--budget: the most epochs of it that fit (a run may end part-way through its last epoch)"
    return dict(candidate_plan(plan, best.candidate), epochs=best.epochs, reasons=reasons, budget={
        "seconds": plan["budget"]["seconds"], "forecast_seconds": round(best.seconds, 1),
        "forecast_acc": best.accuracy, "accuracy_source": best.candidate.source or None,
        "beyond_table": choice.beyond_table, "probes": [r for r in probes if r is not None],
        # How far the pace control may lengthen the run, and the accuracy the table gives each length.
        "max_epochs": budget.epoch_grid(best.candidate, by_time)[-1], "table_points": best.candidate.points,
        "runner_up": runner_up and {"configuration": runner_up.candidate.label, "epochs": runner_up.epochs,
                                    "forecast_seconds": round(runner_up.seconds, 1),
                                    "forecast_acc": runner_up.accuracy},
        # What the pace control expects after each epoch and at the end, until it has measured them.
        "spent_seconds": round(workload.spent_seconds, 1),  # start-up, data and probe, before the choice
        "epoch_overhead_seconds": round(budget.epoch_overhead_seconds(best.probe, workload), 2),
        "frozen_stem_speedup": round(best.probe.frozen_stem_speedup, 3),
        "small_crop_speedup": round(best.probe.small_crop_speedup, 3),
        "final_seconds": round(budget.final_seconds(best.probe, workload, tta), 2), "tta": tta})


def print_budget_choice(choice, budget_seconds, tta):
    best, runner_up = choice.best, choice.runner_up
    accuracy = f"forecast {best.accuracy:.2f}% with TTA" if best.accuracy is not None else "accuracy not forecast"
    print(f"[budget] choice: {best.candidate.label} for {best.epochs:g} epochs: {accuracy}, finishing in "
          f"{budget.duration_text(best.seconds)} of the {budget.duration_text(budget_seconds)} budget")
    if best.candidate.source:
        print(f"[budget] accuracy from: {best.candidate.source}")
    if best.accuracy is not None and tta != budget.TABLE_TTA:
        print(f"[budget] the table's accuracy is with test-time augmentation level {budget.TABLE_TTA}: at --tta "
              f"{tta} expect less")
    if runner_up:
        print(f"[budget] runner-up: {runner_up.candidate.label} for {runner_up.epochs:g} epochs: forecast "
              f"{runner_up.accuracy:.2f}% in {budget.duration_text(runner_up.seconds)}")
    if choice.beyond_table:
        print(f"[budget] the budget is larger than anything measured: {best.epochs:g} epochs is the longest run of "
              f"this configuration in bench/accuracy_table.json, so the run will finish early")


# ----------------------------------------------------------------------------------------------
# 3. Data: the whole dataset as one uint8 tensor on the training device, augmented there in batches.


DATA_TENSORS = ("train_images", "train_labels", "test_images", "test_labels")  # the splits as loaded


def load_data(dataset, data_dir, image_size):
    """The whole dataset (fetched beforehand by fetch_dataset) as CPU tensors, and its fingerprint. A
    cross-validation loads it once and places it for each fold."""
    t0 = time.time()
    data = load_dataset(dataset, data_dir, image_size)
    names = ", ".join(data.class_names[:10]) + (", ..." if len(data.class_names) > 10 else "")
    print(f"[data] {data.source}: {len(data.train_images):,} training and {len(data.test_images):,} test images of "
          f"{image_size}x{image_size}, {len(data.class_names)} classes ({names}), read in {time.time() - t0:.1f}s")
    return data, data_fingerprint(data)


def place_data(data, val_split, seed, device):
    """The run's data on its training device: the validation split (if any) held out of train, and every split
    moved there once."""
    data = hold_out_validation(data, val_split, seed)
    data = dataclasses.replace(data, **{name: getattr(data, name).to(device)
                                        for name in (*DATA_TENSORS, "val_images", "val_labels")
                                        if getattr(data, name) is not None})
    if has_validation(data):
        which = (f"fold {val_split['fold']} of {val_split['folds']}, " if isinstance(val_split, dict) else
                 f"{val_split:.0%}, " if isinstance(val_split, float) else "")
        print(f"[data] {len(data.train_images):,} training and {len(data.val_images):,} validation images (held out "
              f"of train: {which}stratified by class), on {device}")
    return data


def hold_out_validation(data, val_split, seed):
    """Move the validation split out of train: a stretch of stratified_order, so that every class gives its share.
    val_split: 0 (none), a count or a fraction of train (its first images), or fold k of K-fold cross-validation,
    {"fold": k, "folds": K} (its k-th of K equal stretches: the K folds are disjoint and cover train)."""
    if not val_split:
        return data
    count = len(data.train_labels)
    if isinstance(val_split, dict):
        fold, folds = val_split["fold"], val_split["folds"]
        start, stop = (fold - 1) * count // folds, fold * count // folds  # not empty: cross_validate checks K <= count
    else:
        start, stop = 0, round(val_split * count) if isinstance(val_split, float) else val_split
        if not 0 < stop < count:
            raise UserError(f"--val-split {val_split} holds out {stop} of the {count:,} training images; it must "
                            f"leave some to train on and hold out at least one. Give a count below {count:,} or a "
                            f"fraction such as 0.1.")
    held_out = stratified_order(data.train_labels, seed)[start:stop]
    keep = torch.ones(count, dtype=torch.bool)
    keep[held_out] = False
    # Extra labels (CIFAR-100's coarse ones) follow the training images that stay; nothing trains on them.
    extra = {key: (train[keep], test) for key, (train, test) in data.extra_labels.items()}
    return dataclasses.replace(data, train_images=data.train_images[keep], train_labels=data.train_labels[keep],
                               val_images=data.train_images[held_out], val_labels=data.train_labels[held_out],
                               extra_labels=extra)


def stratified_order(labels, seed):
    """A permutation of the images in which every stretch holds each class in proportion: each class is shuffled
    (fixed by seed), its k-th of n images placed at (k + 1/2) / n, and all sorted by place. Its first N images are
    a stratified validation split of N."""
    generator = torch.Generator().manual_seed(seed)
    place = torch.empty(len(labels), dtype=torch.float64)
    for k in labels.unique().tolist():
        members = (labels == k).nonzero().flatten()
        shuffled = members[torch.randperm(len(members), generator=generator)]
        place[shuffled] = (torch.arange(len(members), dtype=torch.float64) + 0.5) / len(members)
    return torch.argsort(place, stable=True)


def data_fingerprint(data):
    """Sizes, classes and a hash of every image and label: a resumed run must continue on the data it started on.

    blake2b over the whole dataset costs ~0.3 s for CIFAR-10 on one core, small next to loading it."""
    digest = hashlib.blake2b(digest_size=16)
    for name in DATA_TENSORS:
        digest.update(getattr(data, name).contiguous().numpy())
    return {"train_images": len(data.train_images), "test_images": len(data.test_images),
            "image_shape": list(data.train_images.shape[1:]), "classes": list(data.class_names),
            "blake2b": digest.hexdigest()}


def normalize(images_uint8, normalization, dtype=torch.float32):
    """uint8 images to floats of mean 0 and deviation 1 per channel; normalization is the data's (mean, std)."""
    mean, std = normalization_tensors(normalization, images_uint8.device, dtype)
    return (images_uint8.to(dtype) / 255 - mean) / std


@functools.lru_cache
def normalization_tensors(normalization, device, dtype):
    """Made once per device: copying them from the host for every batch would make the GPU wait each step."""
    mean, std = normalization
    return (torch.tensor(mean, device=device, dtype=dtype).view(1, 3, 1, 1),
            torch.tensor(std, device=device, dtype=dtype).view(1, 3, 1, 1))


def translate_batch(images, shifts):
    """Shift each image by its own (dy, dx) in [-r, r], filling from a reflect-padded border.

    Translation of a couple of pixels is the cheap, effective augmentation for short CIFAR runs.
    Done as one gather over the batch, not a Python loop over images.
    """
    r = TRANSLATE_PIXELS
    padded = F.pad(images, (r, r, r, r), mode="reflect")
    n, c, h, w = images.shape
    rows = (torch.arange(h, device=images.device).view(1, h, 1) + r + shifts[:, 0].view(n, 1, 1))
    cols = (torch.arange(w, device=images.device).view(1, 1, w) + r + shifts[:, 1].view(n, 1, 1))
    flat_index = (rows * (w + 2 * r) + cols).view(n, 1, h * w).expand(n, c, h * w)
    return padded.flatten(2).gather(2, flat_index).view(n, c, h, w)


def small_crop_side(image_side):
    """The side of a small crop: what training cuts and the probe times."""
    return round(SMALL_CROP_SIDE * image_side)


class TrainBatches:
    """Shuffled, augmented training batches drawn from the on-device uint8 dataset.

    Flips alternate: each image is flipped in epoch 0 with probability 1/2, and every later epoch
    flips exactly the images the previous epoch did not. Every image is seen both ways in any two
    consecutive epochs, which beats independent random flips in short runs (airbench).

    Under torchrun every rank draws the same permutation (same seed) and takes its own slice of each
    global batch, so the ranks' shards are disjoint and together make exactly one global batch.

    The first small_crop_epochs epochs yield crops of SMALL_CROP_SIDE of the side, one random window per batch: a
    batch is one tensor of one shape, and each image already moved by its own translation.
    """

    def __init__(self, images, labels, normalization, batch_size, seed, rank=0, world_size=1, small_crop_epochs=0):
        self.images, self.labels, self.normalization = images, labels, normalization
        self.batch_size, self.small_crop_epochs = batch_size, small_crop_epochs
        self.small_crop = small_crop_side(images.shape[-1])
        self.rank_slice = slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)
        flip_gen = torch.Generator(device="cpu").manual_seed(seed)
        self.first_flips = (torch.rand(len(images), generator=flip_gen) < 0.5).to(images.device)
        self.generator = torch.Generator(device=images.device).manual_seed(seed + 1)

    def __len__(self):
        return len(self.images) // self.batch_size  # drop the ragged last batch: BatchNorm dislikes tiny ones

    def epoch(self, epoch, skip=0):
        """Yield (inputs, labels) for one epoch, skipping the first `skip` batches (resume mid-epoch)."""
        n = len(self.images)
        order = torch.randperm(n, device=self.images.device, generator=self.generator)
        shifts = torch.randint(-TRANSLATE_PIXELS, TRANSLATE_PIXELS + 1, (n, 2), device=self.images.device,
                               generator=self.generator)
        flips = self.first_flips ^ bool(epoch % 2)
        # Drawn with the epoch's order, from the generator whose state last.pth keeps: a resumed epoch crops alike.
        corners = torch.randint(0, self.images.shape[-1] - self.small_crop + 1, (len(self), 2),
                                device=self.images.device, generator=self.generator).tolist() \
            if epoch < self.small_crop_epochs else None
        for b in range(skip, len(self)):
            index = order[b * self.batch_size:(b + 1) * self.batch_size][self.rank_slice]
            inputs = normalize(self.images[index], self.normalization)
            inputs = torch.where(flips[index].view(-1, 1, 1, 1), inputs.flip(-1), inputs)
            inputs = translate_batch(inputs, shifts[index])
            if corners:
                top, left = corners[b]
                inputs = inputs[:, :, top:top + self.small_crop, left:left + self.small_crop]
            yield inputs.contiguous(memory_format=torch.channels_last), self.labels[index]


def make_train_batches(train_images, train_labels, normalization, batch_size, seed, dist, small_crop_epochs):
    batches = TrainBatches(train_images, train_labels, normalization, batch_size, seed, dist.rank, dist.world_size,
                           small_crop_epochs)
    if len(batches) == 0:
        raise UserError(batch_too_large(batch_size, len(train_images)))
    return batches


def batch_too_large(batch_size, train_images):
    return (f"The batch size, {batch_size}, is larger than the {train_images} training images. Give a smaller one, "
            f"e.g. --batch-size {max(1, train_images // 4)}.")


# ----------------------------------------------------------------------------------------------
# 4. Model, optimiser and learning-rate schedule


def prepare_model(plan, data, device):
    """The plan's network for the data's classes, initialised from the data, on the training device."""
    model = build_model(plan["model"], num_classes=len(data.class_names), **plan["model_kwargs"])
    if model.DATA_INIT_IMAGES:  # e.g. CifarNet's whitening stem, set from the statistics of training images
        # Evenly spaced over the training set: an image folder's images come sorted by class.
        sample = data.train_images[::max(1, len(data.train_images) // model.DATA_INIT_IMAGES)]
        model.init_from_data(normalize(sample[:model.DATA_INIT_IMAGES].cpu(), (data.mean, data.std)))
    # channels_last: measured 1.25x faster on the CPU; the layout tensor cores want on a GPU.
    return model.to(device, memory_format=torch.channels_last)


class AutocastForward(nn.Module):
    """The network with autocast entered inside its own forward, for nn.DataParallel.

    Autocast state is per thread. DataParallel runs each replica in a thread of its own that re-enters
    autocast with the parent's on/off flag but not its dtype, so on CUDA the replicas would compute in
    the default fp16, unscaled, where the plan said bf16. Entered here, inside the replica, the dtype holds.
    """

    def __init__(self, model, dtype):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x):
        with torch.autocast(x.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            return self.model(x)


def make_precision(precision, device):
    """Autocast dtype (None: fp32) and gradient scaler; fp16 needs the scaler so small gradients survive."""
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return autocast_dtype, torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def orthogonalize(matrix, steps=3):
    """Push every singular value of `matrix` towards 1, keeping its singular vectors (Newton-Schulz).

    A quintic iteration whose coefficients maximise the slope at zero: 3 steps leave the singular
    values roughly in [0.5, 1.5], which trains as well as exact orthogonalisation (Muon, K. Jordan).
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    x = matrix.to(newton_schulz_dtype(matrix.device))
    x = x / (x.norm() + 1e-7)  # Frobenius norm 1 bounds every singular value by 1
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).to(matrix.dtype)


def newton_schulz_dtype(device):
    """bf16 on GPUs that compute it natively (compute capability 8.0+), where the iteration tolerates it and
    runs faster; fp32 elsewhere: older GPUs emulate bf16 slowly (V100, T4) or lack it (P100), and CPUs
    without bf16 units run fp32 faster."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        return torch.bfloat16
    return torch.float32


class MuonAndSGD(torch.optim.Optimizer):
    """Nesterov momentum; in groups with orthogonalize=True the update is orthogonalised (Muon).

    Plain-SGD groups live in the same optimiser, so checkpoints and the gradient scaler see just one.
    Each group's rate is set every step by set_learning_rates.
    """

    def __init__(self, groups):
        super().__init__(groups, dict(lr=0.0, weight_decay=0.0))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else p.grad
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                buffer = self.state[p]["momentum_buffer"]
                buffer.mul_(group["momentum"]).add_(grad)
                update = grad.add(buffer, alpha=group["momentum"])  # Nesterov
                if group["orthogonalize"]:
                    # Filters keep a fixed norm, so only their direction learns and the step size stays meaningful.
                    p.mul_(len(p) ** 0.5 / p.norm())
                    update = orthogonalize(update.reshape(len(p), -1)).view(p.shape)
                p.add_(update, alpha=-group["lr"])


def make_optimizer(model, plan):
    """Muon for the conv filters (first group); Nesterov SGD for the biases and the head. The model says which
    parameters are which (models.py, the model contract)."""
    groups = model.parameter_groups()
    wd = plan["weight_decay"]
    if plan["recipe"] == "sgd":
        return MuonAndSGD([dict(name="all", params=[p for group in groups.values() for p in group],
                                orthogonalize=False, momentum=SGD_NESTEROV_MOMENTUM, weight_decay=wd)])

    def sgd_group(name, params, lr_per_example):
        # SGD's weight decay is multiplied by the rate: dividing by it makes the decay per example.
        return dict(name=name, params=params, peak_lr=lr_per_example, per_example=True, orthogonalize=False,
                    momentum=SGD_MOMENTUM, weight_decay=wd / lr_per_example)

    return MuonAndSGD([
        dict(name="filters", params=groups["filters"], peak_lr=MUON_LR, per_example=False, orthogonalize=True,
             momentum=MUON_MOMENTUM, weight_decay=0.0),
        sgd_group("norms", groups["norms"], BIAS_LR_PER_EXAMPLE),
        sgd_group("head", groups["head"], HEAD_LR_PER_EXAMPLE),
        sgd_group("stem_bias", groups["stem_bias"], BIAS_LR_PER_EXAMPLE),
    ])


@dataclass(frozen=True)
class Schedule:
    """How far along its learning-rate curve the run is (progress 0 to 1) after a number of epochs (fractional).

    A plan's schedule runs straight from epoch 0 to its end, plan["epochs"]. --budget's pace control, when the run
    falls behind or gets ahead, bends it at the point reached: from there the rest of the curve is squeezed into
    fewer epochs or stretched over more, so the rates continue from where they are and still reach zero at the new
    end (part-way through an epoch if need be)."""
    end_epoch: float
    bend_epoch: float = 0.0
    bend_progress: float = 0.0

    def progress(self, epochs_done):
        rest = (epochs_done - self.bend_epoch) / (self.end_epoch - self.bend_epoch)
        return min(1.0, self.bend_progress + (1 - self.bend_progress) * rest)

    def ending_at(self, epochs_done, end_epoch):
        """This schedule bent at epochs_done to end at end_epoch."""
        return Schedule(end_epoch, epochs_done, self.progress(epochs_done))


def set_learning_rates(optimizer, plan, examples, step, steps_per_epoch, schedule=None):
    """Set every group's rate for `step` of `schedule` (default: the plan's, straight to plan["epochs"]).
    Muon recipe: every rate falls linearly from its peak to 0, over the run or over the stem bias's epochs;
    --lr scales every peak alike; per-example SGD rates are multiplied by the examples a step backpropagates.
    SGD recipe: a linear warm-up to --lr, then cosine decay to 0."""
    schedule = schedule or Schedule(plan["epochs"])
    progress = schedule.progress(step / steps_per_epoch)
    if plan["recipe"] == "sgd":
        warmup = SGD_WARMUP_FRACTION
        if progress < warmup:  # the step's end, so that the first step already moves
            factor = min(1.0, schedule.progress((step + 1) / steps_per_epoch) / warmup)
        else:
            factor = 0.5 * (1 + math.cos(math.pi * (progress - warmup) / (1 - warmup)))
        for group in optimizer.param_groups:
            group["lr"] = plan["lr"] * factor
        return
    scale = plan["lr"] / MUON_LR
    for group in optimizer.param_groups:
        # The stem bias decays over its own first epochs, whatever the run's length.
        factor = max(0.0, 1 - step / (STEM_BIAS_EPOCHS * steps_per_epoch)) if group["name"] == "stem_bias" else \
            1 - progress
        peak = scale * group["peak_lr"] * (examples if group["per_example"] else 1)
        group["lr"] = peak * factor


# ----------------------------------------------------------------------------------------------
# 5. The run: its state in one place, built once


@dataclass(eq=False)
class Run:
    """One training run: built by build_run, advanced by the loop, saved by training_state, restored by restore_run."""
    plan: dict  # never changed once made
    seed: int
    dist: Dist
    device: torch.device
    out_dir: Path
    dataset: Dataset  # the table entry (datasets.DATASETS)
    data_dir: Path
    image_size: int
    data_fingerprint: dict
    class_names: list
    normalization: tuple  # the data's (mean, std) per channel
    model: nn.Module  # the network: what is saved and evaluated
    forward_model: nn.Module  # what training calls: the model, or DataParallel over it
    optimizer: MuonAndSGD
    autocast_dtype: torch.dtype | None  # None: fp32
    scaler: torch.amp.GradScaler
    batch_size: int  # the plan's, until an out-of-memory back-off halves it
    train_batches: TrainBatches
    log_every: int | None  # --log-every; None: about 4 lines per epoch
    memory_devices: list  # every GPU of a DataParallel group (any can run out), or the one device
    history: dict
    stop: StopRequest  # Ctrl-C / SIGTERM, once installed
    schedule: Schedule  # the learning-rate schedule; --budget's pace control may move its end
    # Where the run stands: saved in last.pth, so that a resumed run continues exactly.
    step: int = 0
    start_epoch: int = 0
    batch_in_epoch: int = 0
    epoch_rng: torch.Tensor | None = None  # the data generator's state at the start of the epoch in progress
    epoch_sums: torch.Tensor | None = None  # summed loss, top-1 and top-5 correct and images of the epoch so far
    epoch_seconds: float = 0.0
    nonfinite_steps: torch.Tensor | None = None  # NaN/inf losses in a row, counted on the device
    best_val_acc: float | None = None  # the saved model's validation accuracy (None without a validation split)
    best_epoch: int | None = None  # the saved model's epoch: best on validation, or the last
    best_state: dict | None = None
    seconds_before: float = 0.0  # wall time this run spent in earlier processes (before a resume), for --budget
    epoch_overhead_seconds: float | None = None  # mean evaluation and saving after an epoch, since this process started
    # or last retried an epoch, less any drawing of the curves (--budget)
    epoch_first_step_seconds: float = 0.0  # the first step of the epoch's part trained in this process (--budget's
    # pace leaves it out)
    began_mid_epoch: bool = False  # this process resumed part-way through an epoch, whose row then holds an earlier
    # process's seconds too (--budget's pace leaves that row out)
    curves_drawn_at: float = 0.0  # when training_curves.png was last drawn (time.time()); 0: never, so epoch 1 draws
    curves_epochs: int = 0  # the epochs it showed then
    curves_seconds: float = 0.0  # how long that drawing took

    @property
    def memory_label(self):
        return "GPU Mem" if self.device.type == "cuda" else "Mem"

    @property
    def seconds_spent(self):
        """Wall time of this run so far: its earlier processes' and this one's, from STARTED (--budget counts it)."""
        return self.seconds_before + time.time() - STARTED

    @property
    def final_step(self):
        """The step at which the schedule ends (training stops there, maybe part-way through an epoch)."""
        return round(self.schedule.end_epoch * len(self.train_batches))

    @property
    def epochs_planned(self):
        """Epochs started in all, the last maybe cut short."""
        return -(-self.final_step // len(self.train_batches))


def prepare_training(plan, data):
    """The plan's device (made current), network, what training calls (the network, or DataParallel over it),
    autocast dtype and gradient scaler."""
    device = torch.device(plan["device"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
    model = prepare_model(plan, data, device)
    autocast_dtype, scaler = make_precision(plan["precision"], device)
    forward_model = model
    if plan["parallel"] == "DataParallel":
        forward_model = nn.DataParallel(AutocastForward(model, autocast_dtype), device_ids=plan["device_ids"],
                                        output_device=plan["device_ids"][0])
    return device, model, forward_model, autocast_dtype, scaler


def build_run(args, hw, plan, dataset, data, fingerprint, seed, dist, out_dir, data_dir, stop=None):
    device, model, forward_model, autocast_dtype, scaler = prepare_training(plan, data)
    stage(4, f"master device {device}, model moved there")
    if plan["parallel"] == "DataParallel":
        stage(5, f"DataParallel over devices {plan['device_ids']}")
    elif plan["parallel"] == "DistributedDataParallel":
        stage(5, f"DistributedDataParallel over {dist.world_size} ranks: gradients averaged by all-reduce")
    else:
        stage(5, "single device, no DataParallel")
    normalization = (data.mean, data.std)
    return Run(plan=plan, seed=seed, dist=dist, device=device, out_dir=out_dir, dataset=dataset,
               data_dir=data_dir.resolve(), image_size=data.train_images.shape[-1], data_fingerprint=fingerprint,
               class_names=list(data.class_names), normalization=normalization, model=model,
               forward_model=forward_model, optimizer=make_optimizer(model, plan), autocast_dtype=autocast_dtype,
               scaler=scaler, batch_size=plan["batch_size"],
               train_batches=make_train_batches(data.train_images, data.train_labels, normalization,
                                                plan["batch_size"], seed, dist, plan["small_crop_epochs"]),
               log_every=args.log_every,
               memory_devices=[torch.device("cuda", i) for i in plan["device_ids"]] or [device],
               history={"plan": plan, "args": vars_for_json(args), "hardware": hardware_for_json(hw), "seed": seed,
                        "dataset": {"name": dataset.title, "source": data.source, "classes": list(data.class_names),
                                    "notes": data.notes}, "epochs": [], "events": []},
               stop=stop or StopRequest(), schedule=Schedule(plan["epochs"]), epoch_sums=torch.zeros(4, device=device),
               nonfinite_steps=torch.zeros((), device=device))


def vars_for_json(args):
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def hardware_for_json(hw):
    return {"cpu_count": hw.cpu_count, "cpu_bf16": hw.cpu_bf16, "simulated": hw.simulated,
            "gpus": [{"index": g.index, "name": g.name, "memory_gb": round(g.memory_gb, 2)} for g in hw.gpus]}


# ----------------------------------------------------------------------------------------------
# 6. Training: epochs of steps, each epoch evaluated and saved; out of memory halves the batch.


def train_loop(run, data):
    """Train epochs from where the run stands; evaluate and save after each. False if stopped (also after the
    last epoch: the final evaluation is then left to --resume)."""
    epoch, epoch_start = run.start_epoch, None
    while epoch < run.epochs_planned:
        if patience_ran_out(run, epoch):  # checked here, not after the epoch, so a resumed run stops too
            break
        skip = run.batch_in_epoch
        if skip == 0:
            run.epoch_sums.zero_()
            run.epoch_rng = run.train_batches.generator.get_state()
            run.epoch_seconds = 0.0
            # A copy of the state at the epoch's start, to retry it after running out of memory.
            # (Under torchrun the ranks cannot change their batch size on their own.)
            epoch_start = copy_state(training_state(run, epoch)) if run.dist.world_size == 1 else None
        reset_peak_memory(run.memory_devices)
        t0 = time.time()
        try:
            completed = train_one_epoch(run, epoch, skip)
        except torch.OutOfMemoryError:
            completed = None  # handled below: inside this block the failed step's activations are still alive
        if completed is None:
            if epoch_start is None:
                raise TrainingFailed(f"Out of GPU memory in epoch {epoch + 1} with batch size {run.batch_size}. "
                                     f"last.pth holds the last completed epoch: start a new run with a smaller "
                                     f"--batch-size, or free the GPU and --resume.") from None
            back_off_batch_size(run, epoch_start)
            continue
        synchronize(run.device)
        steps_end = time.time()
        run.epoch_seconds += steps_end - t0
        run.dist.all_reduce_sum(run.epoch_sums)  # every rank's part of the epoch, for the log and the checkpoint
        if not completed:
            save_outputs(run, state=training_state(run, epoch))
            return False
        run.dist.sync_state_from_main(run.model)  # BatchNorm statistics drift per rank; evaluate rank 0's
        loss_sum, correct, top5_correct, seen = run.epoch_sums.tolist()
        val_loss, val_acc, val_top5 = evaluate(run.model, data.val_images, data.val_labels, run.normalization, 0,
                                               run.autocast_dtype, run.dist) if has_validation(data) else (None,) * 3
        # The test set is evaluated for the record only: nothing is chosen on it. Under --budget that record would
        # take time from training (bench/RESULTS.md, twenty-first session), so there it is made once, at the end.
        test_loss, test_acc, test_top5 = (None,) * 3 if run.plan["budget"] else evaluate(
            run.model, data.test_images, data.test_labels, run.normalization, 0, run.autocast_dtype, run.dist)
        peaks = peak_memory_gb(run.memory_devices)
        row = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": 100 * correct / seen,
               "train_top5": 100 * top5_correct / seen if reports_top5(len(run.class_names)) else None,
               "val_loss": val_loss, "val_acc": val_acc, "val_top5": val_top5,
               "test_loss": test_loss, "test_acc": test_acc, "test_top5": test_top5,
               "lr": run.optimizer.param_groups[0]["lr"],
               "seconds": run.epoch_seconds, "images_per_s": seen / run.epoch_seconds,
               "peak_memory_gb": max(peaks, default=None), "peak_memory_gb_per_device": peaks,
               "batch_size": run.batch_size, "steps": run.batch_in_epoch,
               "first_step_seconds": run.epoch_first_step_seconds}
        check_epoch_finite(run, epoch + 1, test_loss if test_loss is not None else val_loss)
        run.history["epochs"].append(row)
        validation = (f" | val loss {val_loss:.3f} acc {val_acc:.2f}%{top5_text(val_top5)}"
                      if val_acc is not None else "")
        test = f" | test loss {test_loss:.3f} acc {test_acc:.2f}%{top5_text(test_top5)}" if test_acc is not None else ""
        print(f"[epoch {epoch + 1}/{run.epochs_planned}] train loss {row['train_loss']:.3f} acc {row['train_acc']:.2f}%"
              f"{top5_text(row['train_top5'])}{validation}{test} | {row['seconds']:.1f}s, "
              f"{row['images_per_s']:.0f} img/s, {run.memory_label} {memory_text(peaks)}", flush=True)
        run.batch_in_epoch = 0
        epoch += 1
        best = None
        # Without a validation split every epoch replaces the saved model: the last one, at the schedule's end, is it.
        if val_acc is None or run.best_val_acc is None or val_acc > run.best_val_acc:
            run.best_val_acc, run.best_epoch = val_acc, epoch
            best = best_model_payload(run, epoch, row)
            run.best_state = best["state_dict"]
        # The curves of the last epoch are drawn by finish_run, after the final evaluation, or at a stop.
        drawn_at = run.curves_drawn_at
        save_outputs(run, best=best, state=training_state(run, epoch),
                     curves=time.time() - run.curves_drawn_at >= CURVES_EVERY_SECONDS)
        # A mean, less the drawing (once in CURVES_EVERY_SECONDS: keep_pace counts its share), which epoch 1 always
        # does: with short epochs its mean alone, charged to every epoch left, read a run behind its forecast.
        drawing = run.curves_seconds if run.curves_drawn_at != drawn_at else 0.0
        overhead, epochs_here = time.time() - steps_end - drawing, epoch - run.start_epoch
        run.epoch_overhead_seconds = overhead if epochs_here == 1 else \
            run.epoch_overhead_seconds + (overhead - run.epoch_overhead_seconds) / epochs_here
        if run.dist.any(run.stop.signal is not None, run.device):  # after the last epoch too: its final
            return False  # evaluation (minutes of TTA on a CPU) is left to --resume
    return True


def has_validation(data):
    return data.val_images is not None


def patience_ran_out(run, epoch):
    """--patience: True (and said once, in the history too) when `patience` epochs have passed without a new best
    validation accuracy."""
    patience = run.plan["patience"]
    if not patience or run.best_epoch is None or epoch - run.best_epoch < patience:
        return False
    if not any("stopped_early" in event for event in run.history["events"]):
        run.history["events"].append({"stopped_early": {
            "after_epoch": epoch, "best_epoch": run.best_epoch,
            "why": f"{patience} epochs without a gain in validation accuracy (--patience {patience})"}})
        print(f"[stop] early stop after epoch {epoch}: no gain in validation accuracy for {patience} epochs since "
              f"epoch {run.best_epoch}")
    return True


def train_one_epoch(run, epoch, skip=0):
    """Train one epoch (from batch `skip` on). Returns False if a stop was requested mid-epoch."""
    # A stem bias (CifarNet's whitening bias) adapts to the data early, then freezes so it cannot drift.
    for parameter in run.model.parameter_groups()["stem_bias"]:
        parameter.requires_grad = epoch < STEM_BIAS_EPOCHS
    optimizer, plan, batches = run.optimizer, run.plan, run.train_batches
    steps_per_epoch = len(batches)
    log_every = run.log_every or -(-steps_per_epoch // 4)
    run.forward_model.train()
    bar = make_progress_bar(steps_per_epoch, skip, epoch, run.epochs_planned)
    examples = backpropagated(run.batch_size, plan["backprop_fraction"], run.dist.world_size)
    started = time.time()
    for b, (inputs, labels) in enumerate(batches.epoch(epoch, skip), start=skip):
        if run.step >= run.final_step:  # the schedule ends part-way through this epoch
            break
        set_learning_rates(optimizer, plan, examples, run.step, steps_per_epoch, run.schedule)
        outputs, loss = training_step(run.forward_model, optimizer, run.scaler, inputs, labels, run.autocast_dtype,
                                      run.dist, plan["backprop_fraction"])
        run.step += 1
        if b == skip:
            # The pace leaves this step out: a process's first step also builds the batch shape's kernels and
            # memory, a one-time cost already spent that no later step repeats.
            synchronize(run.device)
            first_step_ended = time.time()
            run.epoch_first_step_seconds = first_step_ended - started
        # Running sums stay on the device, built from device values only: no per-step wait for the host.
        loss = loss.detach().float()
        top1, top5, _ = correct_counts(outputs.detach().float(), labels)
        run.epoch_sums += torch.stack([loss * len(labels), top1, top5, loss.new_full((), len(labels))])
        run.batch_in_epoch = b + 1
        if bar is not None:
            bar.update(1)
        # Counted on the device, checked at log points: no per-step synchronisation on GPU.
        run.nonfinite_steps = torch.where(torch.isfinite(loss), 0, run.nonfinite_steps + 1)
        last_step = b + 1 == steps_per_epoch or run.step == run.final_step
        at_log_point = (b + 1) % log_every == 0 or last_step
        if at_log_point:
            check_finite(run)
            loss_sum, correct, top5_correct, seen = run.epoch_sums.tolist()
            top5 = f" | Top-5: {100 * top5_correct / seen:.2f}%" if reports_top5(outputs.shape[1]) else ""
            line = (f"Epoch [{epoch + 1}/{run.epochs_planned}] | Batch [{b + 1}/{steps_per_epoch}] | "
                    f"Loss: {loss_sum / seen:.3f} | Acc: {100 * correct / seen:.2f}%{top5} | "
                    f"LR: {optimizer.param_groups[0]['lr']:.4f} | {run.memory_label}: "
                    f"{memory_text(peak_memory_gb(run.memory_devices), digits=1)}")
            (bar.write if bar is not None else print)(line)
            if plan["budget"] and not last_step:
                # Paced over the last epoch's row and this epoch so far, each after its first step: a few steps
                # alone swing by a tenth either way.
                seconds_before, steps_before = last_epoch_training(run)
                if steps_before + b > skip:
                    keep_pace(run, (seconds_before + time.time() - first_step_ended) / (steps_before + b - skip))
        # One process reads its own stop flag every step. torchrun's ranks must agree to stop, which takes a
        # collective and a wait for the GPU, so they vote only at log points.
        if (run.dist.world_size == 1 or at_log_point) and run.dist.any(run.stop.signal is not None, run.device) \
                and not last_step:
            if bar is not None:
                bar.close()
            return False
    if bar is not None:
        bar.close()
    return True


def last_epoch_training(run):
    """Seconds and steps of the last epoch's training after its first step, from its row of the history; (0, 0)
    unless this process trained that epoch whole, after it started or last retried an epoch (restore_run sets
    start_epoch and began_mid_epoch): a resumed run may run on other hardware, and an epoch before an out-of-memory
    back-off ran at another batch size.
    An epoch whose steps ran at another pace than the next one's (its stem bias trained, or it trained on small
    crops) counts as the next would have run it, by the probe's measured ratios."""
    rows = run.history["epochs"]
    if not rows or rows[-1]["epoch"] <= run.start_epoch + run.began_mid_epoch:
        return 0.0, 0
    last, this = rows[-1]["epoch"] - 1, rows[-1]["epoch"]  # counted from 0
    ratio = step_seconds_ratio(run.plan, this) / step_seconds_ratio(run.plan, last)
    return (rows[-1]["seconds"] - rows[-1]["first_step_seconds"]) * ratio, rows[-1]["steps"] - 1


def step_seconds_ratio(plan, epoch):
    """A training step's time in `epoch` (from 0) against a whole-image step while the stem bias trains, by the
    probe's ratios in the plan's forecast (1 where a plan made before it timed them has none)."""
    forecast = plan["budget"]
    return budget.step_seconds_ratio(epoch, STEM_BIAS_EPOCHS, plan["small_crop_epochs"],
                                     forecast.get("frozen_stem_speedup", 1.0), forecast.get("small_crop_speedup", 1.0))


def step_paces(plan, step, steps_per_epoch, seconds_per_step):
    """((from step, seconds a step), ...) of the steps from `step` on (budget.paced_final_step): the pace measured
    now, and from each later epoch where it changes (small crops end, the stem bias freezes) that pace by the
    ratios the probe measured."""
    epoch = step // steps_per_epoch
    changes = sorted({end for end in (plan["small_crop_epochs"], STEM_BIAS_EPOCHS) if end > epoch})
    return [(start * steps_per_epoch if start > epoch else step,
             seconds_per_step * step_seconds_ratio(plan, start) / step_seconds_ratio(plan, epoch))
            for start in (epoch, *changes)]


def keep_pace(run, seconds_per_step):
    """--budget: move the schedule's end when the run, at its measured pace (seconds_per_step), would finish too
    near its deadline or too far before it (budget.paced_final_step decides; Schedule bends the rates to reach zero
    at the new end). Under torchrun rank 0 decides."""
    forecast = run.plan["budget"]
    budget_seconds = forecast["seconds"]
    steps_per_epoch = len(run.train_batches)
    # After each epoch: evaluation and saving as measured, and the curves' drawing at its share of the epochs.
    drawings_an_epoch = min(1.0, seconds_per_step * steps_per_epoch / CURVES_EVERY_SECONDS)
    epoch_overhead = forecast["epoch_overhead_seconds"] if run.epoch_overhead_seconds is None else \
        run.epoch_overhead_seconds + drawings_an_epoch * run.curves_seconds
    final_step = budget.paced_final_step(
        run.step, run.final_step, round(forecast["max_epochs"] * steps_per_epoch), steps_per_epoch,
        seconds_left=budget_seconds - run.seconds_spent, budget_seconds=budget_seconds,
        step_paces=step_paces(run.plan, run.step, steps_per_epoch, seconds_per_step),
        epoch_overhead_seconds=epoch_overhead, final_seconds=forecast["final_seconds"])
    end_epoch = run.dist.broadcast_object(None if final_step is None else final_step / steps_per_epoch)
    if end_epoch is None:
        return
    was, done = run.schedule.end_epoch, run.step / steps_per_epoch
    run.schedule = run.schedule.ending_at(done, end_epoch)
    # The accuracy forecast moves with the end: a probe that misread the machine's speed (a busy core) printed a
    # forecast for a run of another length.
    table_acc = budget.expected_accuracy(forecast["table_points"], round(end_epoch, 3))
    run.history["events"].append({"pace": {"at_epoch": round(done, 3), "end_epoch_was": round(was, 3),
                                           "end_epoch": round(end_epoch, 3),
                                           "seconds_per_step": round(seconds_per_step, 4),
                                           "table_acc": table_acc and round(table_acc, 2)}})
    longest = ", the table's longest run" if forecast["accuracy_source"] else ""
    why = "behind the forecast" if end_epoch < was else \
        f"ahead of the forecast (it may run up to {forecast['max_epochs']:g} epochs{longest})"
    accuracy = f" (the table's {table_acc:.2f}% with TTA there)" if table_acc is not None else ""
    print(f"[pace] {why} at {seconds_per_step:.2f} s a step: training now ends at epoch {end_epoch:.2f}{accuracy} "
          f"instead of {was:.2f}, to finish within the budget of {budget.duration_text(budget_seconds)}; the learning "
          f"rate decays to zero there", flush=True)


def training_step(model, optimizer, scaler, inputs, labels, autocast_dtype, dist=None, backprop_fraction=1.0):
    """Forward, label-smoothed loss, backward (gradients averaged over torchrun's ranks) and one optimiser
    step; returns the outputs and the loss of the whole batch, from before the step.

    backprop_fraction < 1 is a top-k variant of Selective-Backprop (Jiang et al. 2019, who sample by each loss's
    percentile instead): a gradient-free forward pass ranks the batch's examples by loss, and only the hardest
    fraction goes forward again and back. The easy examples, which would teach little, cost one forward pass
    instead of a forward and a backward. Both passes run in train mode, so BatchNorm's running statistics are
    updated by each (the whole batch, then the hardest): the table's accuracy was measured so."""
    with torch.autocast(inputs.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        if backprop_fraction < 1:
            with torch.no_grad():  # in train mode, as the step's own pass: BatchNorm uses the batch's statistics
                outputs = model(inputs)
                loss = F.cross_entropy(outputs, labels, label_smoothing=LABEL_SMOOTHING)
                # Ranked in fp32: half-precision losses tie often, and ties would rank arbitrarily.
                hardest = F.cross_entropy(outputs.float(), labels, reduction="none").topk(
                    backpropagated(len(labels), backprop_fraction)).indices
            trained_loss = F.cross_entropy(model(inputs[hardest]), labels[hardest], label_smoothing=LABEL_SMOOTHING)
        else:
            outputs = model(inputs)
            loss = trained_loss = F.cross_entropy(outputs, labels, label_smoothing=LABEL_SMOOTHING)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(trained_loss).backward()
    if dist is not None:
        dist.average_gradients(model)  # before the scaler's inf check, so every rank skips the same steps
    scaler.step(optimizer)
    scaler.update()
    return outputs, loss


def backpropagated(batch_size, backprop_fraction, ranks=1):
    """How many examples of a batch a step backpropagates, in all, and so its per-example rates count: each of
    torchrun's ranks keeps its share of its own slice."""
    return ranks * max(1, round(batch_size // ranks * backprop_fraction))


def back_off_batch_size(run, epoch_start):
    """Out of GPU memory: halve the batch and retry the epoch (in the Muon recipe the SGD rates, per example,
    follow the batch)."""
    old_batch, new_batch = run.batch_size, run.batch_size // 2
    if new_batch < MIN_BATCH_SIZE:
        raise TrainingFailed(f"Out of GPU memory even at batch size {old_batch}, below which training would be too "
                             f"slow to be useful. Free the GPU (other processes?), or use a smaller model "
                             f"(--model SmallCifarNet). The best model and last.pth so far are kept.")
    if run.device.type == "cuda":
        torch.cuda.empty_cache()
    epoch = epoch_start["epoch"]
    # A fresh gradient scaler: a failure inside its step leaves the old one's per-optimizer stage half-way
    # (gradients unscaled or not), which load_state_dict does not reset.
    _, run.scaler = make_precision(run.plan["precision"], run.device)
    # The same process goes on: its time before this epoch is already counted from STARTED.
    restore_run(run, dict(epoch_start, batch_size=new_batch, seconds_spent=run.seconds_before))
    run.step = epoch * len(run.train_batches)  # the same point of the schedule, in the new step count
    run.history["events"].append({"out_of_memory": {"epoch": epoch + 1, "batch_size": new_batch}})
    print(f"[oom] out of memory in epoch {epoch + 1}: retrying it with batch size {new_batch}", file=sys.stderr)


def copy_state(state):
    """A copy in host memory: on a GPU the copy must not take the memory the epoch may run short of."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, map_location="cpu", weights_only=True)


def check_finite(run):
    """Stop if the loss has been NaN or infinite for several steps in a row: training has diverged.

    With fp16 a few non-finite steps are normal (the gradient scaler skips them and lowers its scale).
    """
    streak = int(run.nonfinite_steps.item())
    if streak >= MAX_NONFINITE_STEPS:
        raise TrainingFailed(divergence_message(run, f"The loss has been NaN or infinite for {streak} steps in a "
                                                     f"row at step {run.step}"))


def check_epoch_finite(run, epoch, eval_loss):
    """At each epoch's end, before anything is saved: weights and the loss evaluated after the epoch (test, or
    validation under --budget; None: none was) must be finite. This catches a divergence in an epoch's last steps,
    which the streak of check_finite is too short to see."""
    weights = [t for t in run.model.state_dict().values() if t.is_floating_point()]
    if not bool(torch.stack([t.isfinite().all() for t in weights]).all()):
        raise TrainingFailed(divergence_message(run, f"Epoch {epoch} ended with NaN or infinite weights"))
    if eval_loss is not None and not math.isfinite(eval_loss):
        raise TrainingFailed(divergence_message(run, f"Epoch {epoch} ended with a NaN or infinite evaluation loss"))


def divergence_message(run, what):
    """What happened, what is kept, and what to change: the settings moved away from the recipe, if any."""
    plan = run.plan
    if run.best_epoch is None:
        kept = "Nothing was saved: no epoch finished with a usable model."
    else:
        kept = (f"best_model.pth (epoch {run.best_epoch}) and last.pth (the last completed epoch) are kept, "
                f"untouched by the diverged steps.")
    # Each of these destabilises training when raised (in the Muon recipe the SGD steps grow with the batch too:
    # its rates are per example).
    defaults = RECIPE_DEFAULTS[plan["recipe"]]
    checked = [("--lr", "lr"), ("--weight-decay", "weight_decay")] + \
        ([("--batch-size", "batch_size")] if plan["recipe"] == "muon" else [])
    unusual = [f"{flag} {plan[key]:g} (the recipe's: {defaults[key]:g})" for flag, key in checked
               if plan["reasons"][key] == f"set by {flag}" and plan[key] > defaults[key]]
    if unusual:
        advice = (f"Set away from the recipe, and the likely cause: {', '.join(unusual)}. Start a new run with "
                  f"values nearer the recipe's.")
    else:
        advice = (f"The recipe's own settings rarely diverge: try a lower learning rate in a new run, "
                  f"e.g. --lr {plan['lr'] / 4:.4g} (now {plan['lr']:.4g}).")
    return f"{what}: training diverged. {kept} {advice}"


class StopRequest:
    """Ctrl-C / SIGTERM ask the loop to stop after the current step; a second Ctrl-C exits at once.

    Once every epoch is saved (finishing), there is nothing to save: the stop interrupts at once.
    """

    def __init__(self):
        self.signal = None
        self.finishing = False

    def install(self):
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        if self.finishing:
            self.signal = signum  # kept: raised inside a garbage-collector callback, the exception is only printed
            raise Interrupted(signum)
        if self.signal is not None:
            # Every file is written by atomic rename, so leaving now tears nothing.
            print("\n[stop] second interrupt: exiting now", file=sys.stderr)
            os._exit(exit_code_for(signum))
        self.signal = signum
        print(f"\n[stop] {signal.Signals(signum).name}: finishing this step and saving; "
              f"interrupt again to exit at once", file=sys.stderr)


def make_progress_bar(total, initial, epoch, epochs):
    if not sys.stdout.isatty():
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True)


def keep_freed_memory():
    """Stop glibc from handing large freed blocks back to the OS, so CPU training reuses them.

    By default every allocation over 32 MB (a batch's activations) is mmap-ed and unmapped on free,
    so each step page-faults all its activations in again: measured 30-40% of a CPU step
    (SmallCifarNet, batch 512, 2 cores: 390 -> 540 images/s). Not glibc (macOS, musl): no-op.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_max = -1, -4  # mallopt parameter numbers from malloc.h
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**31 - 1)


def peak_memory_gb(devices):
    """Peak memory per device since the epoch began (GPUs), or of the whole process so far (CPU); [] if unknown."""
    if devices[0].type == "cuda":
        return [torch.cuda.max_memory_allocated(d) / 2**30 for d in devices]
    if resource is None:
        return []
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return [peak / (2**30 if sys.platform == "darwin" else 2**20)]  # bytes on macOS, KiB on Linux


def synchronize(device):
    """Wait for a GPU's queued work, so that a clock read after it counts that work; nothing to wait for on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(devices):
    if devices[0].type == "cuda":
        for device in devices:
            torch.cuda.reset_peak_memory_stats(device)


def top5_text(accuracy):
    return f", top-5 {accuracy:.2f}%" if accuracy is not None else ""


def memory_text(peaks, digits=2):
    return "/".join(f"{gb:.{digits}f}" for gb in peaks) + "GB" if peaks else "n/a"


# ----------------------------------------------------------------------------------------------
# 7. Evaluation


@torch.no_grad()
def evaluate(model, images, labels, normalization, tta=0, autocast_dtype=None, dist=None):
    """Mean loss, accuracy (%) and top-5 accuracy (%, None under TOP5_MIN_CLASSES classes) over the whole set.
    Under torchrun each rank takes a shard and the sums are added across ranks, so the result is exact and the
    same on every rank.

    Out of memory (a small GPU, test-time augmentation): the evaluation starts over with half the batch.
    """
    model.eval()
    n = len(images)
    rank, world = (dist.rank, dist.world_size) if dist else (0, 1)
    shard = slice(rank * n // world, (rank + 1) * n // world)
    sums = halving_batch_on_oom(lambda batch_size: evaluation_sums(model, images[shard], labels[shard], normalization,
                                                                   tta, autocast_dtype, batch_size), images.device)
    if dist:
        dist.all_reduce_sum(sums)
    loss_sum, correct, top5_correct, reports_top5 = sums.tolist()
    return loss_sum / n, 100.0 * correct / n, 100.0 * top5_correct / n if reports_top5 else None


def halving_batch_on_oom(compute, device):
    """compute(batch_size) at EVAL_BATCH_SIZE; when it runs out of memory (returns None: a small GPU, test-time
    augmentation), again with half the batch."""
    batch_size = EVAL_BATCH_SIZE
    while (result := compute(batch_size)) is None:
        if batch_size == 1:
            raise TrainingFailed("Out of GPU memory while evaluating a single image. Free the GPU (other "
                                 "processes?) and --resume: last.pth and best_model.pth hold the last saved epoch.")
        batch_size //= 2
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"[oom] out of memory while evaluating: retrying with batch size {batch_size}", file=sys.stderr)
    return result


@torch.no_grad()
def class_probabilities(model, images, normalization, tta, autocast_dtype, batch_size):
    """(plain logits, softmax probabilities with test-time augmentation) of every image (float32, CPU), or None if
    the device ran out of memory."""
    model.eval()
    try:
        # Each batch leaves the device at once: a split's worth of logits there would outgrow what halving frees.
        batches = [(plain.cpu(), logits.softmax(1).cpu()) for plain, logits in (
            predict_batch(model, images[start:start + batch_size], normalization, tta, autocast_dtype)
            for start in range(0, len(images), batch_size))]
    except torch.OutOfMemoryError:
        return None
    return torch.cat([plain for plain, _ in batches]), torch.cat([probabilities for _, probabilities in batches])


def predict_batch(model, images_uint8, normalization, tta, autocast_dtype):
    """float32 (plain, augmented) logits of a batch of uint8 images (predict): normalised, channels_last, under the
    run's autocast."""
    inputs = normalize(images_uint8, normalization).contiguous(memory_format=torch.channels_last)
    with torch.autocast(inputs.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        return tuple(logits.float() for logits in predict(model, inputs, tta))


@torch.no_grad()
def evaluation_sums(model, images, labels, normalization, tta, autocast_dtype, batch_size):
    """Summed loss, top-1 and top-5 correct predictions, and a count that is 0 where top-5 is not reported;
    None if the device ran out of memory (its tensors freed by then)."""
    sums = torch.zeros(4, device=images.device, dtype=torch.float64)
    try:
        for start in range(0, len(images), batch_size):
            _, logits = predict_batch(model, images[start:start + batch_size], normalization, tta, autocast_dtype)
            targets = labels[start:start + batch_size]
            sums[0] += F.cross_entropy(logits, targets, reduction="sum")
            sums[1:] += torch.stack(correct_counts(logits, targets))
    except torch.OutOfMemoryError:
        return None
    return sums


def reports_top5(num_classes):
    return num_classes >= TOP5_MIN_CLASSES


def correct_counts(logits, labels):
    """Top-1 and top-5 correct predictions, and 1 if top-5 is reported for this many classes (else 0, 0)."""
    top1 = (logits.argmax(1) == labels).sum().to(logits.dtype)
    if not reports_top5(logits.shape[1]):
        return top1, top1.new_zeros(()), top1.new_zeros(())
    top5 = (logits.topk(5, dim=1).indices == labels[:, None]).any(1).sum().to(logits.dtype)
    return top1, top5, top1.new_ones(())


@torch.no_grad()
def predict(model, inputs, tta):
    """(logits of the images alone, logits with test-time augmentation: tta=1 adds the mirror image, tta=2 also
    1-pixel shifts). The first is the augmented pass's own first view, so the plain figures cost nothing beside it."""
    plain = logits = model(inputs)
    if tta >= 1:
        logits = 0.5 * logits + 0.5 * model(inputs.flip(-1))
    if tta >= 2:
        padded = F.pad(inputs, (1, 1, 1, 1), mode="reflect")
        shifted = [padded[:, :, :-2, :-2], padded[:, :, 2:, 2:]]  # up-left and down-right
        shifted_logits = sum(predict(model, s.contiguous(memory_format=torch.channels_last), 1)[1]
                             for s in shifted) / 2
        logits = 0.5 * logits + 0.5 * shifted_logits
    return plain, logits


def finish_run(run, data, tta):
    """Evaluate the saved model (best on validation, or the last epoch) with test-time augmentation, write its
    report and the final outputs. Rank 0 alone: nothing here needs the other ranks."""
    if not run.dist.is_main:
        return
    stage(7, f"Evaluating the saved model (epoch {run.best_epoch}) with test-time augmentation level {tta}")
    run.model.load_state_dict(run.best_state)
    epochs = run.history["epochs"]
    best_row = next(r for r in epochs if r["epoch"] == run.best_epoch)
    t0 = time.time()
    reports, test_probabilities, test_plain = evaluation_reports(run.model, data, run.normalization, tta,
                                                                 run.autocast_dtype)
    if best_row["test_acc"] is None:  # a budgeted run leaves the test set to the end (train_loop)
        best_row["test_loss"], best_row["test_acc"], best_row["test_top5"] = test_plain
    test = reports["test"]
    augmented = f", {test['accuracy']:.2f}% with TTA" if tta else " (--tta 0: no test-time augmentation)"
    print(f"[eval] test accuracy {best_row['test_acc']:.2f}% plain{augmented}{top5_text(test['top5'])} "
          f"({time.time() - t0:.1f}s)")
    print_reports(reports)
    stage(8, "Saving")
    run.history["final"] = {"best_epoch": run.best_epoch, "selection": run.plan["reasons"]["selection"],
                            "val_acc": best_row["val_acc"],
                            "val_acc_tta": reports.get("validation", {}).get("accuracy"),
                            "test_acc": best_row["test_acc"], "test_acc_tta": test["accuracy"],
                            "test_top5": best_row["test_top5"], "test_top5_tta": test["top5"], "tta_level": tta,
                            "train_seconds": sum(r["seconds"] for r in epochs),
                            "peak_memory_gb": max((r["peak_memory_gb"] for r in epochs
                                                   if r["peak_memory_gb"] is not None), default=None)}
    best = best_model_payload(run, run.best_epoch, best_row, test["accuracy"], test["top5"], tta)
    save_report(run.out_dir, reports, test_probabilities, data, best)
    if run.plan["budget"]:
        run.history["final"]["budget"] = budget_outcome(run, test["accuracy"])
    save_outputs(run, best=best)
    stage(9, f"Wrote {', '.join(RUN_FILES)} to {run.out_dir}")
    stage(10, f"Done: {test['accuracy']:.2f}% test accuracy (TTA {tta}), saved model of epoch {run.best_epoch}")


def budget_outcome(run, test_acc_tta):
    """--budget's forecast against what the run reached (said, and kept in the history). The time is the run's own,
    from its start to now (the last save is still to come), less any time it spent stopped before a resume. Where the
    pace control moved the end, the table's accuracy for the epochs actually trained is given too."""
    forecast = run.plan["budget"]
    seconds = run.seconds_spent
    epochs_trained = run.step / len(run.train_batches)
    table_acc = budget.expected_accuracy(forecast["table_points"], round(epochs_trained, 3))
    outcome = {"budget_seconds": forecast["seconds"], "forecast_seconds": forecast["forecast_seconds"],
               "seconds": round(seconds, 1), "forecast_acc": forecast["forecast_acc"], "test_acc_tta": test_acc_tta,
               "epochs_planned": run.plan["epochs"], "epochs_trained": round(epochs_trained, 3),
               "table_acc_for_epochs_trained": table_acc and round(table_acc, 2),
               # Measured, against the forecast's: the mean evaluation and saving after an epoch of this process.
               "epoch_overhead_seconds": run.epoch_overhead_seconds and round(run.epoch_overhead_seconds, 2)}
    accuracy = f", forecast {forecast['forecast_acc']:.2f}% for {run.plan['epochs']:g} epochs" \
        if forecast["forecast_acc"] is not None else ""
    if table_acc is not None and abs(epochs_trained - run.plan["epochs"]) > 0.05:
        accuracy += f" (the table's {table_acc:.2f}% for the {epochs_trained:.2f} trained)"
    print(f"[budget] finished in {budget.duration_text(seconds)} of {budget.duration_text(forecast['seconds'])} "
          f"(forecast {budget.duration_text(forecast['forecast_seconds'])}): {test_acc_tta:.2f}% with TTA{accuracy}")
    return outcome


def evaluation_reports(model, data, normalization, tta, autocast_dtype):
    """The report (report.metrics) of each split the model is judged on, test and (if any) validation, the
    test images' class probabilities, and the test set's plain loss, accuracy and top-5 accuracy (as evaluate
    gives them), read from the same pass."""
    reports = {}
    splits = [("test", data.test_images, data.test_labels)]
    if has_validation(data):
        splits.append(("validation", data.val_images, data.val_labels))
    for split, images, labels in splits:
        plain, probabilities = halving_batch_on_oom(lambda batch_size: class_probabilities(
            model, images, normalization, tta, autocast_dtype, batch_size), images.device)
        labels = labels.cpu()
        _, top5_correct, top5_reported = correct_counts(probabilities, labels)
        confusion = report.confusion_matrix(labels, probabilities.argmax(1), len(data.class_names))
        reports[split] = report.metrics(confusion, data.class_names,
                                        100 * top5_correct.item() / len(labels) if top5_reported else None)
        if split == "test":
            test_probabilities = probabilities
            plain_top1, plain_top5, _ = correct_counts(plain, labels)
            test_plain = (F.cross_entropy(plain, labels).item(), 100 * plain_top1.item() / len(labels),
                          100 * plain_top5.item() / len(labels) if top5_reported else None)
    return reports, test_probabilities, test_plain


def print_reports(reports):
    for split, metrics in reports.items():
        print(report.summary_table(metrics, split))


def save_report(out_dir, reports, test_probabilities, data, best):
    """report.json (the saved model and each split's metrics), the test confusion matrix and its most confidently
    misclassified images, as PNGs."""
    confidence, predictions = test_probabilities.max(1)
    about = {key: best[key] for key in ("model_name", "model_kwargs", "dataset", "epoch", "selection", "tta_level")}
    atomic_write(out_dir / "report.json", json.dumps({"model": about, **reports}, indent=2).encode())
    test = reports["test"]
    atomic_write(out_dir / "confusion_matrix.png", report.confusion_png(
        torch.tensor(test["confusion"]), data.class_names,
        f"{best['model_name']} on {best['dataset']} test: {test['accuracy']:.2f}% (TTA {best['tta_level']})"))
    atomic_write(out_dir / "misclassified.png", report.misclassified_png(
        data.test_images.cpu(), data.test_labels.cpu(), predictions, confidence, data.class_names))


# ----------------------------------------------------------------------------------------------
# 8. Outputs: every file is serialised in memory, written to a temporary name of this process, flushed
# and renamed, so a crash, a full disk or a second trainer leaves either the old file or the new one,
# never a torn one.


def claim_out_dir(out_dir, resuming, overwrite, run_prefix):
    """The run's folder, made if needed and locked for this process: --out-dir, the resumed run's, or a new
    numbered folder under runs/. An existing run is never written over unless --resume or --overwrite says so.
    Checked before any data is loaded, so a refusal costs nothing.

    Returns (folder, lock, created); release_out_dir undoes it.
    """
    lock, created = None, False
    try:
        if out_dir is None:
            out_dir, created = new_run_folder(Path(RUNS_DIR), run_prefix), True
        elif out_dir.exists() and not out_dir.is_dir():
            raise UserError(f"--out-dir {out_dir} is a file, not a folder. Choose another --out-dir.")
        elif not out_dir.exists():
            out_dir.mkdir(parents=True)
            created = True
        lock = lock_out_dir(out_dir)
        if lock is not None:  # no other trainer writes here now, so any temporary file is a killed one's
            remove_stale_temporaries(out_dir)
        found = previous_run(out_dir)
        if found and not resuming and not overwrite:
            # A folder with a best_model.pth alone (its last.pth never written: a full disk) has nothing to resume.
            resumable = any((out_dir / name).is_file() for name in ("last.pth", CROSS_VALIDATION_STATE))
            continue_it = f"Continue it with --resume --out-dir {shlex.quote(str(out_dir))}, replace" if resumable \
                else "It has no last.pth to continue from: replace"
            raise UserError(f"--out-dir {out_dir} already holds a run ({', '.join(found)}). {continue_it} it with "
                            f"--overwrite, or leave out --out-dir to start the new run in a new folder under "
                            f"{RUNS_DIR}/.")
        probe = out_dir / f".write_test.{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
        free_mb = shutil.disk_usage(out_dir).free / 2**20
        if free_mb < MIN_FREE_DISK_MB:
            raise UserError(f"Only {free_mb:.0f} MB free where {out_dir} lives; checkpoints and reports need at least "
                            f"{MIN_FREE_DISK_MB} MB. Free some space or choose another --out-dir.")
        return out_dir, lock, created
    except OSError as e:
        release_out_dir(out_dir, lock, created)
        raise UserError(f"Cannot create or write to the output folder {out_dir or RUNS_DIR} ({e.strerror or e}). "
                        f"Choose a folder you can write to (each part of its name under 255 characters) "
                        f"with --out-dir.") from None
    except BaseException:
        release_out_dir(out_dir, lock, created)
        raise


def previous_run(folder):
    """What an earlier run left in folder: its files, or a cross-validation's and its fold folders."""
    return [name for name in (*RUN_FILES, *CROSS_VALIDATION_FILES) if (folder / name).exists()] + \
        [f"{fold.name}/" for fold in fold_folders(folder)]


def fold_folder(out_dir, fold):
    """Where fold `fold` (1..K) of a cross-validation in out_dir keeps its run."""
    return out_dir / f"fold-{fold}"


def fold_folders(folder):
    return sorted(path for path in folder.glob("fold-*") if FOLD_FOLDER.fullmatch(path.name) and path.is_dir())


def holds_run(folder):
    return bool(previous_run(folder))


def new_run_folder(runs_dir, prefix):
    """runs/<prefix>NNN (e.g. runs/cifar10-001), numbered one past the highest so far; mkdir claims it even
    against a trainer started at the same moment."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    numbers = [int(p.name[len(prefix):]) for p in runs_dir.glob(prefix + "*") if p.name[len(prefix):].isdigit()]
    number = max(numbers, default=0) + 1
    while True:
        folder = runs_dir / f"{prefix}{number:03d}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            number += 1


def lock_out_dir(out_dir):
    """An exclusive lock on out_dir/.lock for this process's life (the OS drops it when the process ends)."""
    if fcntl is None:
        return None
    lock = open(out_dir / ".lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise UserError(f"Another trainer (PID {holder}) is using {out_dir}. Two trainers in one folder would "
                        f"overwrite each other's checkpoints: wait for it to finish or stop it, or choose another "
                        f"--out-dir.") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def release_out_dir(out_dir, lock, created):
    """Unlock, and remove a folder this run created but never wrote to, so a failed start leaves no clutter.

    The lock file goes while still locked: a trainer opening it in that instant finds it locked and stops,
    rather than locking a file that is about to vanish.
    """
    if lock is not None:
        Path(lock.name).unlink(missing_ok=True)
        lock.close()
    if created and out_dir is not None and not holds_run(out_dir):
        try:
            out_dir.rmdir()
        except OSError:  # something else was put there: leave it
            pass


def remove_previous_run(out_dir):
    """What --overwrite replaces, and a fold starting afresh in its folder: the earlier run's files go once the new
    run is ready to train, so no mix of two runs remains (a cross-validation's fold folders too, unless something
    else was put in them)."""
    for name in (*RUN_FILES, *CROSS_VALIDATION_FILES):
        (out_dir / name).unlink(missing_ok=True)
    for fold in fold_folders(out_dir):
        remove_previous_run(fold)
        try:
            fold.rmdir()
        except OSError:
            pass


def save_outputs(run, best=None, state=None, curves=True):
    """Rank 0 writes: the best model first, so last.pth never points past a missing best; then the history
    and (unless curves is False) its curves."""
    if not run.dist.is_main:
        return
    if best is not None:
        save_checkpoint(best, run.out_dir / "best_model.pth")
    if state is not None:
        save_checkpoint(state, run.out_dir / "last.pth")
    save_json(run.history, run.out_dir / "training_history.json")
    if curves:
        draw_curves(run)


def draw_curves(run):
    """Rank 0: training_curves.png of every epoch so far."""
    started = time.time()
    plot_curves(run.history, run.out_dir / "training_curves.png")
    run.curves_drawn_at, run.curves_epochs = time.time(), len(run.history["epochs"])
    run.curves_seconds = run.curves_drawn_at - started


def draw_stale_curves(run):
    """Where a run ends without finishing (a stop, a failure), the curves may lack its last epochs (they are redrawn
    only every CURVES_EVERY_SECONDS): draw them. A failure to draw them is left unsaid, so the run's own ending
    message stands: the history holds the same figures."""
    if run.dist.is_main and run.curves_epochs < len(run.history["epochs"]):
        with contextlib.suppress(UserError):
            draw_curves(run)


def temporary_path(path, pid="*"):
    """Where atomic_write puts path's bytes before they replace it: one per process, so none collide; the default pid
    makes the glob pattern of every process's."""
    return path.with_name(f".{path.name}.{pid}.tmp")


def atomic_write(path, data):
    """Write bytes to path atomically. Any failure: the previous file is intact and no temporary file remains."""
    path = Path(path)
    tmp = temporary_path(path, os.getpid())
    try:
        write_synced(tmp, data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(write_failure_message(path, e)) from None
    except BaseException:  # an interrupt mid-write (second Ctrl-C, stop during the final evaluation)
        tmp.unlink(missing_ok=True)
        raise


def write_synced(path, data):
    """Write bytes to path and wait until they are on the disk."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def remove_stale_temporaries(folder):
    """Remove what atomic_write left half-written in folder and its fold folders when its process was killed
    (SIGKILL, power loss): nothing can remove it then, and it would stay in the run's folder for good."""
    for place in (folder, *fold_folders(folder)):
        for name in (*RUN_FILES, *CROSS_VALIDATION_FILES):
            for stale in place.glob(temporary_path(Path(name)).name):
                stale.unlink(missing_ok=True)


def write_failure_message(path, error):
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        try:
            free = f" ({shutil.disk_usage(path.parent).free / 2**20:.0f} MB free there)"
        except OSError:
            free = ""
        cause = f"the disk is full or the file is larger than allowed{free}"
        fix = ("Free some disk space (or raise the quota) and run again; --resume continues from last.pth if one "
               "was saved.")
    else:
        cause = error.strerror or str(error)
        fix = "Check that the folder exists and can be written, or choose another --out-dir."
    return (f"Could not write {path}: {cause}. The previous version of that file, if any, is unchanged and no "
            f"partial file was left behind. {fix}")


def save_checkpoint(obj, path):
    atomic_write(path, checkpoint_bytes(obj))


def checkpoint_bytes(obj):
    # Serialised in memory first: torch.save writing into a file that runs out of space fails with an opaque
    # RuntimeError from its zip writer; a plain write of the bytes fails with the OSError that names the cause.
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer()


def save_json(obj, path):
    atomic_write(path, json.dumps(obj, indent=2).encode())


def plot_curves(history, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = history["epochs"]
    if not rows:
        return
    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    # The test curves are for the record (nothing is chosen on them); the saved epoch is marked where it was chosen.
    curves = [("train", "train", "tab:blue"), ("val", "validation", "tab:green"), ("test", "test (reported only)",
                                                                                 "tab:orange")]
    for key, label, colour in curves:
        shown = [r for r in rows if r[f"{key}_acc"] is not None]  # a budgeted run's test set: its saved epoch only
        if not shown:
            continue
        at = [r["epoch"] for r in shown]
        axes[0].plot(at, [r[f"{key}_loss"] for r in shown], "o-", color=colour, label=label)
        axes[1].plot(at, [r[f"{key}_acc"] for r in shown], "o-", color=colour, label=label)
        if shown[0][f"{key}_top5"] is not None:
            axes[1].plot(at, [r[f"{key}_top5"] for r in shown], "o--", color=colour, alpha=0.5,
                         label=f"{label} top-5")
    axes[0].set_title("Loss (train includes label smoothing)")
    chosen_on = "val" if rows[0]["val_acc"] is not None else "test"
    saved = max(rows, key=lambda r: r["val_acc"]) if chosen_on == "val" else rows[-1]
    if saved[f"{chosen_on}_acc"] is not None:
        axes[1].annotate(f"saved: epoch {saved['epoch']}", (saved["epoch"], saved[f"{chosen_on}_acc"]),
                         textcoords="offset points", xytext=(-60, -20))
    axes[1].set_title("Accuracy (%)")
    axes[2].plot(epochs, [r["lr"] for r in rows], "o-", color="tab:purple")
    axes[2].set_title("Learning rate (at epoch end)")
    for ax in axes:
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend()
    fig.suptitle(f"{history['plan']['model']} on {history['dataset']['name']}, {history['plan']['device']}")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, buffer.getbuffer())


def best_model_payload(run, epoch, row, test_acc_tta=None, test_top5_tta=None, tta_level=None):
    """The user-facing checkpoint: weights plus everything needed to rebuild and use the model (row: its
    epoch's line of the history)."""
    mean, std = run.normalization
    return {
        "state_dict": {k: v.detach().cpu().clone() for k, v in run.model.state_dict().items()},
        "model_name": run.plan["model"],
        "model_kwargs": run.plan["model_kwargs"],
        "num_classes": len(run.class_names),
        "class_names": run.class_names,
        "dataset": run.dataset.title,
        "image_size": run.image_size,
        "normalization": {"mean": list(mean), "std": list(std)},
        # Where the data came from and how it was split, so that --evaluate can judge the model again.
        "dataset_key": run.dataset.key,
        "data_dir": str(run.data_dir),
        "val_split": run.plan["val_split"],
        "seed": run.seed,
        "epoch": epoch,
        "selection": run.plan["reasons"]["selection"],
        "val_acc": row["val_acc"],
        "test_acc": row["test_acc"],
        "test_top5": row["test_top5"],
        "test_acc_tta": test_acc_tta,
        "test_top5_tta": test_top5_tta,
        "tta_level": tta_level,
    }


def load_trained_model(path):
    """Rebuild the model saved in best_model.pth, ready for inference (eval mode, CPU). A missing, damaged or
    foreign file is a UserError that names it and says what to give instead."""
    path = Path(path)
    give = "Give the best_model.pth that train.py wrote in its run folder, e.g. runs/cifar10-001/best_model.pth."
    if not path.is_file():
        if (path.parent / "best_model.pth").is_file() and not path.is_dir():
            give = f"Did you mean {path.parent / 'best_model.pth'}?"
        elif (path.parent / "last.pth").is_file() and not path.is_dir():
            last = shlex.quote(str(path.parent / "last.pth"))
            give = (f"{path.parent} holds a run's last.pth only: it stopped before saving a model (which it does at "
                    f"each epoch's end). Continue it: python train.py --resume {last}")
        elif (path / "best_model.pth").is_file():
            give = f"Give the model in that folder: {path / 'best_model.pth'}."
        raise UserError(f"No model file at {path}{' (a folder)' if path.is_dir() else ''}. {give}")
    if damaged := damaged_member(path):
        raise UserError(f"{path} is damaged ({damaged} fails its checksum): it was truncated or altered on disk. "
                        f"{give}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        if checkpoint.get("kind") in (CHECKPOINT_KIND, "cifar10-trainer-state"):
            raise UserError(f"{path} is a run's training state (last.pth), for --resume; the model to use is the "
                            f"best_model.pth beside it. {give}")
        model = build_model(checkpoint["model_name"], num_classes=checkpoint["num_classes"],
                            **checkpoint["model_kwargs"])
        model.load_state_dict(checkpoint["state_dict"])
    except UserError:
        raise
    except Exception as e:  # not a torch file, cut short, or another tool's checkpoint
        raise UserError(f"{path} could not be loaded as a model written by train.py ({type(e).__name__}): it is "
                        f"damaged, cut short or from another program. {give}") from None
    return model.eval(), checkpoint


def normalization_of(checkpoint):
    """A best_model.pth's (mean, std), as normalize() takes them (tuples: it caches its tensors per pair)."""
    return tuple(checkpoint["normalization"]["mean"]), tuple(checkpoint["normalization"]["std"])


# ----------------------------------------------------------------------------------------------
# 9. Resume: last.pth holds everything needed to continue exactly where the run stopped.


def training_state(run, epoch):
    """Full state at `epoch` (completed epochs), plus the position inside the next one."""
    return {
        "kind": CHECKPOINT_KIND,
        "format": CHECKPOINT_FORMAT,
        "dataset": run.dataset.key,
        "data_dir": str(run.data_dir),
        "image_size": run.image_size,
        "data_fingerprint": run.data_fingerprint,
        "plan": run.plan,
        "seed": run.seed,
        "epoch": epoch,
        "batch_in_epoch": run.batch_in_epoch,
        "step": run.step,
        "batch_size": run.batch_size,
        # The data generator's state at the start of the epoch in progress: resuming regenerates
        # that epoch's order and augmentation, then skips the batches already trained.
        "data_rng": run.epoch_rng if run.batch_in_epoch else run.train_batches.generator.get_state(),
        "epoch_sums": run.epoch_sums.cpu(),
        "epoch_seconds": run.epoch_seconds,
        "schedule": dataclasses.asdict(run.schedule),
        "seconds_spent": run.seconds_spent,  # --budget counts them on a resume
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(),
        "best_val_acc": run.best_val_acc,
        "best_epoch": run.best_epoch,
        "best_state": run.best_state,
        "history": run.history,
        "rng": rng_states(),
    }


def rng_states():
    """Every global RNG, in types that torch.load(weights_only=True) accepts."""
    _, numpy_keys, numpy_pos, *_ = np.random.get_state()
    version, python_state, gauss = random.getstate()
    return {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(numpy_keys.astype(np.int64)),
            "numpy_pos": int(numpy_pos), "python": list(python_state),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng_states(states):
    torch.set_rng_state(states["torch"])
    np.random.set_state(("MT19937", states["numpy_keys"].numpy().astype(np.uint32), states["numpy_pos"]))
    random.setstate((3, tuple(states["python"]), None))
    if torch.cuda.is_available():  # as many GPUs' states as are visible now
        for index, state in enumerate(states["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, index)


@dataclass(frozen=True)
class Resume:
    """A run to continue: its last.pth (a cross-validation's: its cross_validation.json), the state read from it, and
    its plan placed on this machine."""
    path: Path
    state: dict
    plan: dict
    changes: list  # what differs on this machine, said at start and recorded in the history
    finished: bool = False  # the run ended (finished): nothing to continue


def load_resume(args, hw, dist, threads, path=None):
    """The run to continue (--resume, or `path`: a fold's last.pth), checked against the flags given and placed on
    this machine. A cross-validation continues from its cross_validation.json."""
    asked_by_user, path = path is None, path or resume_path(args)
    cross_validation = path.name == CROSS_VALIDATION_STATE
    state = load_cross_validation_state(path) if cross_validation else load_resume_state(path)
    # A plan saved before --small-crop-epochs existed trained every epoch on whole images.
    saved = state["plan"] = {"small_crop_epochs": 0, **state["plan"]}
    if asked_by_user and not cross_validation and folds_of(saved):
        raise UserError(f"--resume: {path} is fold {saved['val_split']['fold']} of a {folds_of(saved)}-fold "
                        f"cross-validation, and {path.parent.parent / CROSS_VALIDATION_STATE}, which knows the other "
                        f"folds, is missing. A fold continues only within its cross-validation: put that file back "
                        f"and resume its folder, or start a new run.")
    if args.folds and not folds_of(saved):
        raise UserError(f"--resume: {path} is a single run, not a cross-validation. Drop --folds to continue it, or "
                        f"start the cross-validation in another --out-dir.")
    check_resume_matches_flags(args, path, state)
    if saved["world_size"] != dist.world_size:
        raise UserError(f"--resume: {path} is a run of {saved['world_size']} process(es) and this is "
                        f"{dist.world_size}. Resume it as it was started "
                        f"({'plain python' if saved['world_size'] == 1 else 'torchrun with that many processes'}).")
    plan, changes = place_resumed_plan(saved, hw, dist.world_size, dist.local_rank, dist.local_world_size, threads)
    done = not cross_validation and finished(path, state)
    if cross_validation:
        folds_done = sum(result is not None for result in state["results"])
        print(f"[resume] continuing the cross-validation {path}: {folds_done} of {state['folds']} folds done")
    elif not done:  # a finished run has nothing to continue: main says so
        print(f"[resume] continuing {path} from epoch {state['epoch'] + 1}, batch {state['batch_in_epoch']}")
    for change in changes:
        print(f"[resume] on this machine: {change}")
    return Resume(path, state, plan, changes, done)


def finished(path, state):
    """Whether the run of last.pth `path` ended: its history beside it has final results for the epochs `state`
    holds (last.pth is not rewritten at the end; resuming would evaluate and save again, and count the time twice)."""
    try:
        history = json.loads((path.parent / "training_history.json").read_text())
    except (OSError, ValueError):
        return False
    return "final" in history and len(history.get("epochs", ())) == state.get("epoch")


def resume_path(args):
    """What --resume continues: PATH or OUT_DIR/last.pth; for a cross-validation's folder or one of its folds'
    last.pth, the cross-validation's state (it knows which fold to continue)."""
    path = Path(args.resume) if args.resume else args.out_dir / "last.pth"
    if (path.parent / CROSS_VALIDATION_STATE).is_file():
        return path.parent / CROSS_VALIDATION_STATE
    if FOLD_FOLDER.fullmatch(path.parent.name) and (path.parent.parent / CROSS_VALIDATION_STATE).is_file():
        print(f"[resume] {path} is one fold of the cross-validation in {path.parent.parent}: continuing that")
        return path.parent.parent / CROSS_VALIDATION_STATE
    return path


def load_cross_validation_state(path):
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--resume: {path} could not be read ({type(e).__name__}: {e}). It is the state of a "
                        f"cross-validation; if it was damaged, the finished folds' folders still hold their models "
                        f"and reports: start the cross-validation again in another --out-dir.") from None
    if not isinstance(state, dict) or state.get("kind") != CROSS_VALIDATION_KIND \
            or state.get("format") != CROSS_VALIDATION_FORMAT:
        raise UserError(f"--resume: {path} is not the state of a cross-validation of this version of the trainer "
                        f"(format {CROSS_VALIDATION_FORMAT}). Start the cross-validation again in another --out-dir.")
    return state


def load_resume_state(path):
    if not path.is_file():
        raise UserError(f"--resume: no checkpoint at {path}. Give the path of a last.pth written by this trainer, "
                        f"or the --out-dir of the run to continue.")
    if damaged := damaged_member(path):
        raise UserError(f"--resume: {path} is damaged ({damaged} fails its checksum): the file was truncated or "
                        f"altered on disk. It cannot be continued; if the run's best_model.pth is intact it still "
                        f"loads, otherwise start a new run.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a torn, foreign or non-torch file: all the user needs is which file and why
        raise UserError(f"--resume: {path} could not be read as a checkpoint ({type(e).__name__}). "
                        f"Give the last.pth of a run of this trainer.") from None
    if not isinstance(state, dict) or state.get("kind") not in (CHECKPOINT_KIND, "cifar10-trainer-state"):
        raise UserError(f"--resume: {path} is not a training checkpoint of this trainer "
                        f"(best_model.pth files hold weights only and cannot be resumed). Give a last.pth.")
    version = state.get("format", 1)  # checkpoints carried no format before format 2
    if version != CHECKPOINT_FORMAT:
        raise UserError(f"--resume: {path} was written by {'an earlier' if version < CHECKPOINT_FORMAT else 'a newer'} "
                        f"version of this trainer (checkpoint format {version}; this version reads "
                        f"format {CHECKPOINT_FORMAT}) and cannot be continued. Its best_model.pth still loads for "
                        f"inference; start a new run to train further.")
    return state


def damaged_member(path):
    """The part of a torch.save file that fails its CRC32, or None. torch.load does not check the checksums
    torch.save stores, so a flipped bit would go unnoticed into the weights; reading the file once through
    zipfile checks them all. A file that is not a zip at all (cut before its index, or foreign): None, and
    torch.load says so."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError):
        return None


def check_resume_data(path, state, fingerprint, data_dir):
    saved = state["data_fingerprint"]
    if saved != fingerprint:
        raise UserError(f"--resume: {path} was trained on other data ({saved['train_images']} training and "
                        f"{saved['test_images']} test images, hash {saved['blake2b']}) than {data_dir} holds now "
                        f"({fingerprint['train_images']} and {fingerprint['test_images']}, hash "
                        f"{fingerprint['blake2b']}); its schedule and weights belong to that data. Resume with "
                        f"--data-dir pointing at the original data, or start a new run.")


def check_resume_matches_flags(args, path, state):
    """A resumed run keeps its plan: flags that would change it are refused, not silently ignored."""
    plan = state["plan"]
    given = {"--epochs": (args.epochs, plan["epochs"]), "--batch-size": (args.batch_size, plan["batch_size"]),
             "--backprop-fraction": (args.backprop_fraction, plan["backprop_fraction"]), "--lr": (args.lr, plan["lr"]),
             "--small-crop-epochs": (args.small_crop_epochs, plan["small_crop_epochs"]),
             "--weight-decay": (args.weight_decay, plan["weight_decay"]),
             "--model": (args.model, plan["model"]), "--seed": (args.seed, state["seed"]),
             "--precision": (args.precision, plan["precision"]),
             "--width-mult": (args.width_mult, plan["model_kwargs"].get("width_mult")),
             "--dataset": (args.dataset, state["dataset"]), "--image-size": (args.image_size, state["image_size"]),
             "--val-split": (args.val_split, 0 if folds_of(plan) else plan["val_split"]),  # a CV has folds instead
             "--patience": (args.patience, plan["patience"]), "--folds": (args.folds, folds_of(plan)),
             "--budget": (args.budget, plan["budget"] and plan["budget"]["seconds"])}

    def shown(flag, value):
        return budget.duration_text(value) if flag == "--budget" else value

    for flag, (value, planned) in given.items():
        if value is not None and value != planned:
            had = f"{flag} {shown(flag, planned)}" if planned is not None else f"no {flag}"
            raise UserError(f"--resume: {path} is a run with {had}, but {flag} {shown(flag, value)} was given. A "
                            f"resumed run keeps its plan; drop {flag}, or start a new run in another --out-dir.")


def restore_run(run, state):
    """Put the run where `state` (a last.pth, or the copy taken at an epoch's start) left it."""
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scaler.load_state_dict(state["scaler"])
    run.step, run.start_epoch, run.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
    run.began_mid_epoch = run.batch_in_epoch > 0
    run.best_val_acc, run.best_epoch, run.best_state = state["best_val_acc"], state["best_epoch"], state["best_state"]
    if state["batch_size"] != run.batch_size:  # backed off after running out of memory
        run.batch_size = state["batch_size"]
        batches = run.train_batches
        run.train_batches = make_train_batches(batches.images, batches.labels, run.normalization, run.batch_size,
                                               run.seed, run.dist, batches.small_crop_epochs)
    # The saved sums already cover every rank; under torchrun only rank 0 carries them on.
    run.epoch_sums = state["epoch_sums"].to(run.device) if run.dist.is_main else torch.zeros(4, device=run.device)
    run.epoch_seconds = state["epoch_seconds"]
    run.schedule, run.seconds_before = Schedule(**state["schedule"]), state["seconds_spent"]
    if torch.device(state["plan"]["device"]).type == run.device.type:
        run.epoch_rng = state["data_rng"]
        run.train_batches.generator.set_state(state["data_rng"])
    else:  # a GPU's generator state means nothing to the CPU's (or back): the data order goes on from a new seed
        run.epoch_rng = run.train_batches.generator.manual_seed(run.seed + 1 + run.start_epoch).get_state()
    restore_rng_states(state["rng"])
    run.history = state["history"]


# ----------------------------------------------------------------------------------------------
# 10. Distributed: torchrun's processes


class Dist:
    """Who this process is under torchrun (rank 0 of 1 without it), and the few collectives the loop needs."""

    def __init__(self, rank=0, world_size=1, local_rank=0, local_world_size=1):
        self.rank, self.world_size = rank, world_size
        self.local_rank, self.local_world_size = local_rank, local_world_size
        self.is_main = rank == 0

    @classmethod
    def from_environment(cls):
        env = os.environ
        if int(env.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        return cls(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")),
                   int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])))

    def init_process_group(self, plan):
        if self.world_size > 1:
            backend = "nccl" if plan["device"].startswith("cuda") else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(plan["device"])
            torch.distributed.init_process_group(backend)

    def close(self):
        """Leave the process group together, before Python shuts down.

        The barrier carries no tensors: once it returns, gloo's worker threads have finished the earlier
        collectives. A worker still holding one's tensors while the interpreter shuts down aborts the process
        ("terminate called without an active exception"; seen in 2-rank CPU runs without the barrier, and once in
        a 3-rank run with it), so cli() also ends a rank without the interpreter's teardown.
        """
        if self.world_size > 1:
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()

    def all_reduce_sum(self, tensor):
        if self.world_size > 1:
            torch.distributed.all_reduce(tensor)
        return tensor

    def any(self, flag, device):
        """True on every rank if flag is true on any: ranks must agree before they stop."""
        if self.world_size == 1:
            return flag
        return bool(self.all_reduce_sum(torch.tensor(float(flag), device=device)).item())

    def broadcast_object(self, value):
        """Rank 0's value on every rank."""
        if self.world_size == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    @torch.no_grad()
    def average_gradients(self, model):
        """Average every gradient over the ranks: one all-reduce of one flat buffer, in parameter order.

        Written by hand instead of wrapping the model in DDP: DDP regroups its gradient buckets after its
        first step, so a resumed run (a fresh DDP) sums some gradients in another order than the uninterrupted
        run did, and with 3+ ranks (float sums are not associative) drifts from it in every weight. A fixed
        order makes torchrun resumes bit-exact. Nothing overlaps the backward pass: measured no slower than DDP
        with 2 and 3 CPU ranks (bench/RESULTS.md). Frozen parameters have no gradient and are skipped.
        """
        if self.world_size == 1:
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads]).div_(self.world_size)
        torch.distributed.all_reduce(flat)
        for grad, averaged in zip(grads, flat.split([g.numel() for g in grads])):
            grad.copy_(averaged.view_as(grad))

    @torch.no_grad()
    def sync_state_from_main(self, model):
        if self.world_size > 1:
            for tensor in model.state_dict().values():
                torch.distributed.broadcast(tensor, src=0)


# ----------------------------------------------------------------------------------------------
# 11. Command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Train a CIFAR-10, CIFAR-100 or image-folder classifier with a plan chosen for this machine. "
                    "With no flags it does the whole job; flags override the plan.")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the plan's, per device tier)")
    p.add_argument("--budget", type=budget_value, default=None, metavar="TIME",
                   help="the whole run, start to exit, within TIME (e.g. 90s, 10m, 1.5h): a short throughput probe "
                        "measures the candidate configurations here, and the one with the best accuracy forecast "
                        "(bench/accuracy_table.json) that fits is trained for as many epochs as fit; a run that "
                        "falls behind or gets ahead moves its schedule's end (never past the table's longest run). "
                        "With --model or another dataset, only the epochs are chosen. Default: the plan's tier table")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"images per step, across all GPUs and ranks (default: {BATCH_SIZE})")
    p.add_argument("--backprop-fraction", type=float, default=None, metavar="F",
                   help="backpropagate only the fraction F of each batch whose loss is highest (a top-k variant of "
                        "Selective-Backprop): a gradient-free forward pass ranks the batch, and epochs take less "
                        "time; the per-example learning rates, and so the weight decay, count the backpropagated "
                        "examples (default: 1, every example)")
    p.add_argument("--small-crop-epochs", type=int, default=None, metavar="N",
                   help=f"train the first N epochs on random crops of {SMALL_CROP_SIDE:.0%}% of the image's side "
                        f"(24x24 of CIFAR's 32x32), whose steps take less time; later epochs and every evaluation "
                        f"see whole images (default: 0; --budget may choose it where bench/accuracy_table.json "
                        f"measured it)")
    p.add_argument("--lr", type=float, default=None,
                   help=f"peak Muon learning rate of the conv filters (default: {MUON_LR}); the biases' and head's "
                        f"SGD rates scale with it")
    p.add_argument("--weight-decay", type=float, default=None,
                   help=f"weight decay per example on biases and head (default: {WEIGHT_DECAY_PER_EXAMPLE:g})")
    p.add_argument("--model", choices=sorted(MODELS), default=None, help="network (default: the plan's, per tier)")
    p.add_argument("--width-mult", type=float, default=None,
                   help="PowerCifarNet channel multiplier; 1.0 = widths 64/256/256 (default: the plan's)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="arithmetic of the forward and backward pass (default: the plan's: bf16 on GPUs and CPUs "
                        "with bf16 units, fp16 with a gradient scaler on older GPUs, otherwise fp32)")
    p.add_argument("--tta", type=int, choices=[0, 1, 2], default=None,
                   help=f"test-time augmentation for the final evaluation: 0 none, 1 mirror, 2 mirror + 1-pixel shifts "
                        f"(default: {DEFAULT_TTA}; a resumed --budget run or cross-validation keeps its own; "
                        f"--evaluate: the saved model's)")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed; fixes a CPU run exactly, and which images --val-split or --folds hold out "
                        "(default: random)")
    p.add_argument("--val-split", type=val_split_value, default=None, metavar="N",
                   help="hold out N training images (a count, or a fraction such as 0.1), stratified by class, to "
                        "choose the saved model: the epoch of best validation accuracy. Default 0: the last epoch "
                        "is saved, since the learning rate decays to zero at the end; measured on the default plan, "
                        "validation chose the last epoch too, so held-out images were only images not trained on. "
                        "The test set is only ever reported (see README, Honest numbers)")
    p.add_argument("--patience", type=int, default=None, metavar="K",
                   help="stop after K epochs without a gain in validation accuracy (needs --val-split or --folds)")
    p.add_argument("--folds", type=int, default=None, metavar="K",
                   help="K-fold cross-validation: train K models, the k-th validated on the k-th 1/K of the training "
                        "images (stratified by class, fixed by --seed) and saved at its best validation epoch, each "
                        "in OUT_DIR/fold-k/; then print and save (cross_validation.json and .md) their validation "
                        "accuracy, macro-F1, kappa and test accuracy, per fold and mean ± std. Resumable")
    p.add_argument("--evaluate", type=path_value, default=None, metavar="MODEL",
                   help="no training: write the report (report.json, confusion_matrix.png, misclassified.png) of a "
                        "saved best_model.pth on its own dataset, into its folder (or --out-dir)")
    p.add_argument("--dataset", choices=list(DATASETS), default=None,
                   help="cifar10 or cifar100 (downloaded into --data-dir if missing), or folder: your own images "
                        "in DATA_DIR/train/<class>/ and DATA_DIR/test/<class>/ (or val/; without either, 10%% of "
                        "train/ is held out) (default: folder if DATA_DIR holds train/, else cifar10; a resumed "
                        "run's own)")
    p.add_argument("--data-dir", type=path_value, default=None,
                   help=f"folder holding the dataset (default: {DEFAULT_DATA_DIR}, or the resumed run's)")
    p.add_argument("--image-size", type=int, default=None,
                   help="image folders: every image is resized to this many pixels square (default: 32, or the "
                        "resumed run's); CIFAR images are 32")
    p.add_argument("--out-dir", type=path_value, default=None,
                   help=f"folder for the run's outputs; one that already holds a run is refused unless --resume "
                        f"or --overwrite is given (default: a new folder {RUNS_DIR}/<dataset>-NNN, or the folder of "
                        f"--resume PATH)")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                   help="continue a run from PATH, or from OUT_DIR/last.pth when no PATH is given")
    p.add_argument("--overwrite", action="store_true",
                   help="let a new run replace the run already in --out-dir (its files are deleted once the new "
                        "run has loaded its data and is about to train)")
    p.add_argument("--num-workers", type=int, default=0,
                   help="accepted for compatibility and ignored: the data lives on the training device and is "
                        "augmented there in batches, so there are no loader workers (default: 0)")
    p.add_argument("--log-every", type=int, default=None,
                   help="print a progress line every N batches (default: about 4 per epoch)")
    p.add_argument("--device", choices=["auto", "cpu"], default="auto",
                   help="auto: use the GPUs the plan picks; cpu: plan and train as if no GPU were present "
                        "(default: auto)")
    p.add_argument("--disable-auto", action="store_true",
                   help=f"no automatic choices: first GPU or CPU, PowerCifarNet(1.0), batch {BATCH_SIZE}, "
                        f"{MANUAL_DEFAULTS['epochs']} epochs, the recipe's rates, unless given")
    p.add_argument("--dry-run", action="store_true", help="print the hardware and the plan, then exit")
    p.add_argument("--simulate-gpus", default=None, metavar="NAME:GiB,...",
                   help="plan for these GPUs instead of the detected ones (implies --dry-run), "
                        "e.g. \"NVIDIA RTX A6000:48,NVIDIA GeForce RTX 3090:24\"")
    args = p.parse_args(argv)
    validate_args(args, defaults=vars(p.parse_args([])))
    return args


def path_value(text):
    """A path flag: an empty one (an unset shell variable: --out-dir "$RUN") is refused, not taken for '.'."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path (an unset shell variable?)")
    return Path(text)


def budget_value(text):
    """--budget: a duration, in seconds."""
    try:
        seconds = budget.parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is no time at all")
    return seconds


def val_split_value(text):
    """--val-split: a count of images (a whole number) or a fraction of train (0 < x < 1)."""
    try:
        value = float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        value = None
    if value is None or (isinstance(value, float) and not 0 < value < 1) or (isinstance(value, int) and value < 0):
        raise argparse.ArgumentTypeError(f"{text!r} is neither a count of images (0 or more) nor a fraction between "
                                         f"0 and 1")
    return value


# What --evaluate takes besides itself (and --num-workers, ignored by every command); every other flag decides how
# a model is trained, or is read from the saved model.
EVALUATE_FLAGS = ("data_dir", "out_dir", "tta", "device")


def validate_args(args, defaults):
    def bad(message):
        raise UserError(message + " See python train.py --help.")

    if args.epochs is not None and args.epochs < 1:
        bad(f"--epochs must be at least 1, got {args.epochs}.")
    if args.batch_size is not None and args.batch_size < 1:
        bad(f"--batch-size must be at least 1, got {args.batch_size}.")
    if args.backprop_fraction is not None and not 0 < args.backprop_fraction <= 1:
        bad(f"--backprop-fraction is the share of each batch backpropagated, more than 0 and at most 1; got "
            f"{args.backprop_fraction}.")
    if args.small_crop_epochs is not None and args.small_crop_epochs < 0:
        bad(f"--small-crop-epochs must be 0 or more, got {args.small_crop_epochs}.")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        bad(f"--lr must be a positive finite number, got {args.lr}.")
    if args.weight_decay is not None and not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        bad(f"--weight-decay must be a finite number of 0 or more, got {args.weight_decay}.")
    if args.width_mult is not None and not (math.isfinite(args.width_mult) and 0 < args.width_mult <= 8):
        bad(f"--width-mult must be between 0 and 8, got {args.width_mult}.")
    if args.width_mult is not None and min(PowerCifarNet.widths_for(args.width_mult)) < 1:
        bad(f"--width-mult {args.width_mult} leaves a layer of PowerCifarNet without channels "
            f"(widths {PowerCifarNet.widths_for(args.width_mult)}); use 0.01 or more.")
    if args.seed is not None and not 0 <= args.seed <= MAX_SEED:
        bad(f"--seed must be between 0 and {MAX_SEED}, got {args.seed}.")
    if args.resume == "" and args.out_dir is None:
        bad("--resume without a PATH continues the run in --out-dir, and no --out-dir was given. Name the run: "
            f"--resume {RUNS_DIR}/cifar10-001/last.pth, or --resume --out-dir {RUNS_DIR}/cifar10-001.")
    if args.resume is not None and args.overwrite:
        bad("--resume continues a run and --overwrite replaces it: give one of them.")
    if args.width_mult is not None and args.model not in (None, "PowerCifarNet"):
        bad(f"--width-mult applies to PowerCifarNet only; {args.model} has fixed widths.")
    if args.folds is not None and args.folds < 2:
        bad(f"--folds must be at least 2, got {args.folds}.")
    if args.folds is not None and args.val_split:
        bad("--folds K holds out each fold in turn as the validation split; --val-split cannot be given with it.")
    if args.budget is not None:
        for flag, given in [("--epochs", args.epochs is not None), ("--folds", args.folds is not None),
                            ("--disable-auto", args.disable_auto)]:
            if given:
                bad(f"--budget chooses the epochs (and the model) to fit the time; {flag} cannot be given with it.")
    if args.patience is not None and args.patience < 1:
        bad(f"--patience must be at least 1 epoch, got {args.patience}.")
    if args.log_every is not None and args.log_every < 1:
        bad(f"--log-every must be at least 1, got {args.log_every}.")
    if args.image_size is not None and not IMAGE_SIZES[0] <= args.image_size <= IMAGE_SIZES[1]:
        bad(f"--image-size must be between {IMAGE_SIZES[0]} and {IMAGE_SIZES[1]} pixels, got {args.image_size}.")
    if args.evaluate is not None:
        given = [flag_name(name) for name, value in vars(args).items()
                 if name not in ("evaluate", "num_workers", *EVALUATE_FLAGS) and value != defaults[name]]
        if given:
            bad(f"--evaluate judges a saved model as it was trained (its dataset, split, image size, network and "
                f"precision); {', '.join(given)} would change nothing and cannot be given with it. Only "
                f"{', '.join(map(flag_name, EVALUATE_FLAGS))} apply.")


def flag_name(dest):
    return "--" + dest.replace("_", "-")


# ----------------------------------------------------------------------------------------------
# 12. Main: the story of a run, and the entry point


def stage(n, text):
    print(f"--- [{n}/10] {text} ---", flush=True)


def main(argv=None):
    args = parse_args(argv)
    dist = Dist.from_environment()
    if not dist.is_main:
        sys.stdout = open(os.devnull, "w")  # only rank 0 prints; errors still reach stderr
    stage(1, "Starting")
    if args.simulate_gpus is not None:
        hw = parse_simulated_gpus(args.simulate_gpus, detect_hardware(cuda=False))
    else:
        hw = detect_hardware(cuda=args.device == "auto")
    print_hardware(hw)
    if args.evaluate is not None:
        return evaluate_saved_model(args, hw)
    stage(2, "Planning")
    threads = threads_from_environment()
    resume = load_resume(args, hw, dist, threads) if args.resume is not None else None
    if resume and resume.finished:
        print(f"[resume] {resume.path.parent} holds a finished run (its training_history.json has the final "
              f"results): nothing to continue. To evaluate it again: python train.py --evaluate "
              f"{shlex.quote(str(resume.path.parent / 'best_model.pth'))}")
        return 0
    plan = resume.plan if resume else plan_for_flags(args, hw, dist, threads)
    print_plan(plan)
    # The data: as the flags say, or as the resumed run had it.
    saved = resume.state if resume else {}
    data_dir = args.data_dir or Path(saved.get("data_dir", DEFAULT_DATA_DIR))
    dataset = choose_dataset(args.dataset or saved.get("dataset"), data_dir)
    image_size = args.image_size or saved.get("image_size", CIFAR_IMAGE_SIZE)
    check_image_size(dataset, image_size)
    print_data_and_model(plan, dataset, data_dir, image_size)
    if args.dry_run or args.simulate_gpus is not None:
        print("[dry-run] nothing trained, no data touched")
        return 0
    if resume and resume.path.name == CROSS_VALIDATION_STATE:
        out_dir = resume.path.parent  # also when --out-dir named one of its fold folders
    else:
        out_dir = args.out_dir or (resume.path.parent if resume else None)
    run_prefix = dataset.run_prefix + ("cv-" if folds_of(plan) else "")  # runs/cifar10-001, runs/cifar10-cv-001
    claimed, lock, created = claim_out_dir(out_dir, resume is not None, args.overwrite, run_prefix) \
        if dist.is_main else (None, None, False)
    try:
        fetch_dataset(dataset, data_dir, dist.local_rank, DOWNLOAD_WAIT_S, image_size, dist.local_world_size)
        dist.init_process_group(plan)
        out_dir = dist.broadcast_object(claimed)
        print(f"[run] outputs go to {out_dir}")
        torch.set_num_threads(plan["threads"])
        if plan["device"] == "cpu":
            keep_freed_memory()
        seed = dist.broadcast_object(choose_seed(args, resume))  # every rank must draw the same permutations
        stage(3, f"Loading {dataset.title}")
        data, fingerprint = load_data(dataset, data_dir, image_size)
        if folds_of(plan):
            code = cross_validate(args, hw, plan, resume, dist, out_dir, dataset, data_dir, data, fingerprint, seed,
                                  threads)
        else:
            data = place_data(data, plan["val_split"], seed, torch.device(plan["device"]))  # the loaded copy goes
            if plan["budget"] and not resume:
                plan = plan_for_budget(args, hw, plan, dataset, data, dist, out_dir)
                print_plan(plan)
            code = train_and_save(args, hw, plan, resume, dist, out_dir, dataset, data_dir, data, fingerprint, seed,
                                  final_tta(args, plan, resume))
        dist.close()
        return code
    finally:
        if dist.is_main:
            release_out_dir(claimed, lock, created)


def choose_seed(args, resume):
    """The resumed run's seed, --seed, or a random one."""
    if resume:
        return resume.state["seed"]
    return args.seed if args.seed is not None else random.randrange(2**31)


def requested_tta(args):
    return DEFAULT_TTA if args.tta is None else args.tta


def final_tta(args, plan, resume):
    """The final evaluation's test-time augmentation level: --tta's, except that a resumed --budget run keeps the
    level its forecast counted (its pace control leaves time for that evaluation, not another's)."""
    planned = requested_tta(args)
    if resume and plan["budget"]:
        planned = plan["budget"].get("tta", planned)  # older runs kept no "tta"
    if args.tta is not None and planned != args.tta:
        print(f"[resume] the final evaluation uses test-time augmentation level {planned}, which the budget's "
              f"forecast counted, not --tta {args.tta}")
    return planned


def evaluate_saved_model(args, hw):
    """--evaluate MODEL: the report of a saved model, on the data and split it was trained with, without training."""
    path = args.evaluate
    model, saved = load_trained_model(path)
    missing = [key for key in ("dataset_key", "data_dir", "val_split", "seed") if key not in saved]
    if missing:
        raise UserError(f"--evaluate: {path} was written by an earlier version of this trainer and does not say "
                        f"which data it was trained on ({', '.join(missing)}). Its weights still load "
                        f"(load_trained_model); a model trained with this version can be evaluated.")
    device = torch.device("cuda", hw.gpus[0].index) if hw.gpus else torch.device("cpu")
    data_dir = args.data_dir or Path(saved["data_dir"])
    dataset = choose_dataset(saved["dataset_key"], data_dir)
    # Claimed as a resumed run's folder: made if need be (and removed again if nothing gets written), locked,
    # checked for writing and space; one that holds a run is expected (the model's own).
    out_dir = args.out_dir or path.parent
    if out_dir.resolve() != path.parent.resolve() and out_dir.is_dir() and holds_run(out_dir):
        raise UserError(f"--evaluate: --out-dir {out_dir} holds another run ({', '.join(previous_run(out_dir))}), "
                        f"whose report this one would replace. Choose an empty or new --out-dir, or leave it out to "
                        f"write the report beside {path}.")
    out_dir, lock, created = claim_out_dir(out_dir, resuming=True, overwrite=False, run_prefix=None)
    try:
        fetch_dataset(dataset, data_dir, 0, DOWNLOAD_WAIT_S, saved["image_size"])
        stage(3, f"Loading {dataset.title}")
        data, _ = load_data(dataset, data_dir, saved["image_size"])
        data = place_data(data, saved["val_split"], saved["seed"], device)
        if list(data.class_names) != list(saved["class_names"]):
            raise UserError(f"--evaluate: {path} was trained on the classes {', '.join(saved['class_names'][:5])}..., "
                            f"but {data_dir} holds {', '.join(data.class_names[:5])}...; point --data-dir at the "
                            f"data it was trained on.")
        # The model's own level unless --tta says otherwise: its report then compares with the run's.
        tta = next(level for level in (args.tta, saved.get("tta_level"), DEFAULT_TTA) if level is not None)
        stage(7, f"Evaluating {path} (epoch {saved['epoch']}) with test-time augmentation level {tta}")
        model = model.to(device, memory_format=torch.channels_last)
        reports, test_probabilities, _ = evaluation_reports(model, data, normalization_of(saved), tta, None)
        print_reports(reports)
        save_report(out_dir, reports, test_probabilities, data, dict(saved, tta_level=tta))
    finally:
        release_out_dir(out_dir, lock, created)
    stage(9, f"Wrote {', '.join(REPORT_FILES)} to {out_dir}")
    return 0


def print_data_and_model(plan, dataset, data_dir, image_size):
    """What --dry-run and a run's first lines say of the data, and the size of the plan's network for it."""
    if dataset.key == "folder":
        names = class_folders(data_dir / dataset.train_files[0])
        shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
        num_classes = len(names)
        print(f"[data] image folder {data_dir}: {num_classes} classes ({shown}), images resized to "
              f"{image_size}x{image_size} where they differ")
    else:
        num_classes = dataset.num_classes
        print(f"[data] {dataset.title} in {data_dir / dataset.folder}: {num_classes} classes, "
              f"{image_size}x{image_size} images")
    model = build_model(plan["model"], num_classes=num_classes, **plan["model_kwargs"])
    print(f"[model] {model_text(plan['model'], plan['model_kwargs'])}, {count_parameters(model):,} parameters, "
          f"{count_macs(model, image_size) / 1e6:.0f}M multiply-adds per image")


def train_and_save(args, hw, plan, resume, dist, out_dir, dataset, data_dir, data, fingerprint, seed, tta,
                   stop=None):
    """Train one model as planned (or continue `resume`) on `data` (placed: place_data), save it and its report,
    evaluated with test-time augmentation level `tta`. `stop`: a StopRequest to carry on (a cross-validation's, which
    spans its folds), else a new one. Returns the exit code: 0 when finished, a signal's code when stopped (last.pth
    then holds where it stood)."""
    torch.manual_seed(seed)
    if resume:
        check_resume_data(resume.path, resume.state, fingerprint, data_dir)
    run = build_run(args, hw, plan, dataset, data, fingerprint, seed, dist, out_dir, data_dir, stop)
    if resume:
        restore_run(run, resume.state)
        run.history["plan"] = plan
        run.history["events"].append({"resumed": str(resume.path), "at_epoch": run.start_epoch,
                                      "at_batch": run.batch_in_epoch, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                                      "changes": resume.changes})
        if plan["budget"] and dist.is_main:  # the plan's epochs are the forecast's; the pace may have moved the end
            print(f"[resume] --budget {budget.duration_text(plan['budget']['seconds'])}: "
                  f"{budget.duration_text(run.seconds_before)} spent before; training ends at epoch "
                  f"{run.schedule.end_epoch:.2f}")
    elif (args.overwrite or folds_of(plan)) and dist.is_main:  # a fold's folder is its cross-validation's own
        remove_previous_run(out_dir)
    run.stop.install()
    stage(6, f"Training for {plan['epochs']} epochs, {len(run.train_batches)} steps each")
    try:
        completed = train_loop(run, data)
        if completed:
            run.stop.finishing = True  # every epoch is saved: a stop from here on need not wait for anything
            finish_run(run, data, tta)
            if run.stop.signal is not None and dist.is_main:  # its exception was swallowed (see StopRequest)
                print(f"[stop] {signal.Signals(run.stop.signal).name} came as the run finished: it finished, and "
                      f"everything is saved in {out_dir}.", file=sys.stderr)
            run.stop.finishing = False  # all saved: a stop is only noted now (a cross-validation checks it)
    except TrainingFailed:
        draw_stale_curves(run)
        raise
    except Interrupted as interrupted:
        completed, run.stop.signal = False, interrupted.signum
        if dist.is_main:
            print(f"\n[stop] {signal.Signals(interrupted.signum).name} during the final evaluation: training is "
                  f"complete and saved in {out_dir}; best_model.pth lacks only its final test accuracy.",
                  file=sys.stderr)
    if not completed:
        draw_stale_curves(run)
    if not completed and dist.is_main:
        # A fold continues through its cross-validation (the folder above), which knows the folds still to train.
        command = resume_command(dist, out_dir.parent, cross_validation=True) if folds_of(plan) else \
            resume_command(dist, out_dir)
        print(f"[stop] saved {out_dir / 'last.pth'}. Resume with: {command}", file=sys.stderr)
    return 0 if completed else exit_code_for(run.stop.signal)


def resume_command(dist, out_dir, cross_validation=False):
    """How to continue the run in out_dir: a single run from its last.pth, a cross-validation from its folder."""
    launcher = "python train.py" if dist.world_size == 1 else torchrun_command(dist.local_world_size)
    path = shlex.quote(str(out_dir if cross_validation else out_dir / "last.pth"))  # pasted into a shell
    return f"{launcher} --resume " + (f"--out-dir {path}" if cross_validation else path)


def cross_validate(args, hw, plan, resume, dist, out_dir, dataset, data_dir, data, fingerprint, seed, threads):
    """--folds K: K models, the k-th validated on the k-th stratified K-th of train and saved in out_dir/fold-k/,
    then a table of their validation and test scores. The cross-validation's state (cross_validation.json, one dict)
    is saved before the first fold and after each; a resumed one skips the folds done and continues the fold in
    progress from its last.pth. Returns the exit code, as train_and_save."""
    folds = folds_of(plan)
    if folds > len(data.train_labels):
        raise UserError(f"--folds {folds}: {len(data.train_labels):,} training images cannot make {folds} folds of at "
                        f"least one image each. Use fewer folds.")
    count = len(data.train_labels)  # fold k holds out images (k-1)*count//folds to k*count//folds (hold_out_validation)
    fewest = count - max(k * count // folds - (k - 1) * count // folds for k in range(1, folds + 1))
    if plan["batch_size"] > fewest:  # refused before cross_validation.json is written, not in fold 1
        raise UserError(batch_too_large(plan["batch_size"], fewest) + " (A fold trains on the other folds' images.)")
    # One stop request for every fold: between folds (and before the first) a stop is noted and seen by every rank at
    # the next fold's start; one noted while a fold is prepared stops it after its first step, saved.
    stop = StopRequest()
    stop.install()
    if resume:
        check_resume_data(resume.path, resume.state, fingerprint, data_dir)
        state = resume.state
        if args.tta is not None and args.tta != state["tta"]:
            print(f"[resume] the folds are evaluated with test-time augmentation level {state['tta']}, as the first "
                  f"ones were, not --tta {args.tta}: their scores are averaged together")
    else:
        state = {"kind": CROSS_VALIDATION_KIND, "format": CROSS_VALIDATION_FORMAT, "folds": folds, "seed": seed,
                 "tta": requested_tta(args), "plan": plan, "dataset": dataset.key, "data_dir": str(data_dir.resolve()),
                 "image_size": data.train_images.shape[-1], "data_fingerprint": fingerprint,
                 "results": [None] * folds, "summary": None}
        if dist.is_main:
            if args.overwrite:
                remove_previous_run(out_dir)
            save_cross_validation(out_dir, state)
    device = torch.device(plan["device"])
    for fold in range(1, folds + 1):
        if dist.any(stop.signal is not None, device):
            if dist.is_main:
                print(f"[stop] stopped before fold {fold}: the folds done are saved in {out_dir}. Resume with: "
                      f"{resume_command(dist, out_dir, cross_validation=True)}", file=sys.stderr)
            return exit_code_for(stop.signal)
        folder = fold_folder(out_dir, fold)
        if state["results"][fold - 1] is not None:
            print(f"[cv] fold {fold}/{folds}: done before, in {folder}")
            continue
        print(f"=== fold {fold} of {folds}, in {folder} ===", flush=True)
        if dist.is_main:
            folder.mkdir(exist_ok=True)
        last = folder / "last.pth"
        fold_resume = load_resume(args, hw, dist, threads, last) if dist.broadcast_object(last.is_file()) else None
        fold_plan = dict(plan, val_split={"fold": fold, "folds": folds})
        if fold_resume and fold_resume.plan["val_split"] != fold_plan["val_split"]:
            raise UserError(f"--resume: {last} is not fold {fold} of {folds} of this cross-validation (it holds out "
                            f"{fold_resume.plan['val_split']}). Move it away to train fold {fold} afresh.")
        fold_data = place_data(data, fold_plan["val_split"], seed, device)
        code = train_and_save(args, hw, fold_resume.plan if fold_resume else fold_plan, fold_resume, dist, folder,
                              dataset, data_dir, fold_data, fingerprint, seed, state["tta"], stop)
        code = dist.broadcast_object(code)  # rank 0's: only it evaluates and saves, so only it can be stopped there
        if code:
            return code
        if dist.is_main:
            state["results"][fold - 1] = fold_result(folder, fold)
            save_cross_validation(out_dir, state)
    if dist.is_main:
        state["summary"] = report.cross_validation_summary(state["results"])
        save_cross_validation(out_dir, state)
        print(cross_validation_text(state))
        print(f"[cv] wrote {', '.join(CROSS_VALIDATION_FILES)} and fold-1/ ... fold-{folds}/ to {out_dir}")
    return 0


def fold_result(folder, fold):
    """A finished fold's line of the cross-validation table, from the report it wrote."""
    written = json.loads((folder / "report.json").read_text())
    validation, test = written["validation"], written["test"]
    return {"fold": fold, "epoch": written["model"]["epoch"], "val_images": validation["images"],
            "val_acc": validation["accuracy"], "val_macro_f1": validation["macro"]["f1"],
            "val_kappa": validation["cohen_kappa"], "test_acc": test["accuracy"]}


def save_cross_validation(out_dir, state):
    """cross_validation.json (the state, results and summary) and, once every fold is done, cross_validation.md."""
    save_json(state, out_dir / CROSS_VALIDATION_STATE)
    if state["summary"] is not None:
        atomic_write(out_dir / CROSS_VALIDATION_TABLE, cross_validation_text(state).encode())


def cross_validation_text(state):
    """The finished cross-validation as Markdown: what was trained, and the table."""
    plan, results = state["plan"], state["results"]
    hardest = f", the hardest {plan['backprop_fraction']:.0%} of each batch backpropagated" \
        if plan["backprop_fraction"] < 1 else ""
    small_crops = f" (the first {plan['small_crop_epochs']} on small crops)" if plan["small_crop_epochs"] else ""
    return (f"# {state['folds']}-fold cross-validation\n\n"
            f"{model_text(plan['model'], plan['model_kwargs'])}, {plan['epochs']} epochs{small_crops}{hardest}, seed "
            f"{state['seed']}, data {state['data_dir']}. Each fold's model is its epoch of best validation accuracy; "
            f"the scores are with test-time augmentation level {state['tta']}; std is the sample standard deviation "
            f"over the folds.\n\n"
            f"{report.cross_validation_table(results, state['summary'])}\n")


def cli():
    # SIGTERM before training (data decoding, a --budget probe) unwinds like Ctrl-C, so the folder a run made
    # and its lock are cleared away; training installs its own handlers (StopRequest). Not under torchrun: there
    # SIGTERM is how torchrun ends the other ranks when one fails, and a rank waiting in a collective could not
    # run a handler until torchrun's SIGKILL, 30 s later.
    if Dist.from_environment().world_size == 1:
        signal.signal(signal.SIGTERM, raise_interrupted)
        # Ctrl-C too, even where it was inherited ignored (a script's `python train.py &`), as training does.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    print_file_names_as_bytes()
    try:
        code = main()
        sys.stdout.flush()  # the last buffered lines: a reader gone by now raises here, not at exit
    except (UserError, DataError) as e:
        code = report_failure(e, EXIT_BAD_INPUT)
    except TrainingFailed as e:
        code = report_failure(e, EXIT_TRAINING_FAILED)
    except (KeyboardInterrupt, Interrupted) as e:  # before training started, or --evaluate: nothing to save
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"\n[stop] {signal.Signals(signum).name} before any training; nothing was written", file=sys.stderr)
        code = exit_code_for(signum)
    except (RuntimeError, MemoryError) as e:
        if isinstance(e, RuntimeError) and CPU_OUT_OF_MEMORY not in str(e):
            raise
        code = report_failure(cpu_out_of_memory_message(e), EXIT_TRAINING_FAILED)
    except BrokenPipeError:
        discard_stdout()
        print("[stop] the output's reader stopped reading (| head?); a run's last.pth holds its last completed "
              "epoch", file=sys.stderr)
        code = EXIT_BROKEN_PIPE
    if Dist.from_environment().world_size > 1:
        # A torchrun rank leaves without the interpreter's teardown, in which gloo's worker threads can abort it
        # after a complete run (Dist.close says how) and torchrun then reports the run failed; a failed rank never
        # destroys its group at all. Every file is written and closed by now; only the standard streams need flushing.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def print_file_names_as_bytes():
    """stdout writes a file name in another encoding as its own bytes, as ls does, rather than failing on it."""
    with contextlib.suppress(AttributeError):  # not a text stream of the system's (a test's StringIO)
        sys.stdout.reconfigure(errors="surrogateescape")


def discard_stdout():
    """After stdout's reader has gone (| head): Python's documented way to exit without a second BrokenPipeError
    when the interpreter flushes stdout at exit."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def cpu_out_of_memory_message(error):
    asked = re.search(r"allocate (\d+) bytes", str(error))
    more = f" (asking for {int(asked[1]) / 2**20:,.0f} MiB more)" if asked else ""
    return (f"Out of memory on the CPU{more}. Anything saved before stays: a run's last.pth holds its last completed "
            f"epoch, and --resume continues it. Close other programs, or train with a smaller --batch-size or "
            f"--model.")


def raise_interrupted(signum, frame):
    raise Interrupted(signum)


def report_failure(error, code):
    """One paragraph on stderr. Under torchrun it also goes into the rank's error file, so that torchrun's
    failure summary, printed last and under its own traceback, ends with this message, not a call stack."""
    message = f"error: {error}"
    print(message, file=sys.stderr)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")  # set by torchrun for each rank
    if error_file:
        # The layout torch.distributed.elastic's ErrorHandler.record_exception writes, less the Python call stack,
        # which torchrun would show instead of the message.
        record = {"message": {"message": message, "extraInfo": {"timestamp": str(int(time.time()))}}}
        try:
            Path(error_file).write_text(json.dumps(record))
        except OSError:
            pass
    return code


if __name__ == "__main__":
    cli()
