"""The trainer on real CUDA GPUs: precision, DataParallel, out-of-memory back-off, resume, torchrun with NCCL.

Every test here runs the real trainer (train.py as a subprocess, or a Run built in this process on a GPU) and
asserts on what it produced. The whole file is skipped on a machine without CUDA; tests that need two or more
GPUs are skipped on one. The GPU faults that can be reproduced without a GPU live in tests/test_gpu_paths.py,
which runs everywhere. The last test trains the default plan on the real CIFAR-10 (when data/ holds it) and
prints its accuracy and time, so the first run on a GPU machine records them:

    python -m pytest -q tests/test_gpu.py -rs
"""
import dataclasses
import math
import os
import shutil
from pathlib import Path
import signal
import sys
import time

import pytest
import torch
from torch import nn

import train
from conftest import ROOT, TINY, history_of, load_test_split, run_trainer, start_trainer, wait_for_line

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU: these tests run the trainer on real GPUs (the CPU "
                                       "reproductions of the GPU faults are in tests/test_gpu_paths.py)")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 or more CUDA GPUs")

MEMORY_MARGIN = 4 * 2**20  # bytes: far less than one step's activations, far more than a few small tensors


# ----------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture(autouse=True)
def keep_cuda_settings():
    """build_run sets the current CUDA device and turns on cuDNN's benchmark mode: undo that after each test."""
    device, benchmark = torch.cuda.current_device(), torch.backends.cudnn.benchmark
    yield
    torch.cuda.set_device(device)
    torch.backends.cudnn.benchmark = benchmark


def build_gpu_run(data_dir, out_dir, batch_size, *extra_flags, gpus):
    """conftest.build_tiny_run on the given GPUs (train.GPU records from train.detect_hardware()): a real Run,
    planned for them and built on the plan's device, in this process so a test can reach inside it."""
    args = train.parse_args(["--epochs", "2", "--batch-size", str(batch_size), "--model", "SmallCifarNet", "--seed",
                             "0", "--tta", "0", "--data-dir", str(data_dir), "--out-dir", str(out_dir), *extra_flags])
    hw = dataclasses.replace(train.detect_hardware(), gpus=tuple(gpus))
    dist = train.Dist()
    plan = train.plan_for_flags(args, hw, dist)
    torch.manual_seed(0)
    dataset = train.DATASETS["cifar10"]
    data, fingerprint = train.load_data(dataset, args.data_dir, 32)
    data = train.place_data(data, 0, 0, torch.device(plan["device"]))
    run = train.build_run(args, hw, plan, dataset, data, fingerprint, 0, dist, Path(out_dir), args.data_dir)
    return run, data


def first_gpu():
    return train.detect_hardware().gpus[:1]


def gpus_have_bf16():
    """As the trainer decides (compute capability 8.0+ on every GPU, else --precision bf16 is refused)."""
    return torch.cuda.is_bf16_supported() and all(gpu.bf16 for gpu in train.detect_hardware().gpus)


def skip_without_bf16(precision):
    if precision == "bf16" and not gpus_have_bf16():
        pytest.skip("bf16 needs GPUs of compute capability 8.0 or newer")


def one_gpu_env():
    """The environment for a subprocess that sees only the first GPU this process sees (no DataParallel)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return {"CUDA_VISIBLE_DEVICES": visible.split(",")[0].strip() if visible else "0"}


def last_state(out):
    return torch.load(out / "last.pth", map_location="cpu", weights_only=True)


def all_finite(tensors):
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def interrupt_after_first_epoch(process):
    """SIGTERM once epoch 1 is reported (its checkpoint is being written then); returns stderr."""
    wait_for_line(process, "[epoch 1/3]")
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    return stderr


def tail(result):
    return result.stdout[-3000:] + result.stderr[-3000:]


# ----------------------------------------------------------------------------------------------
# 1. One GPU in bf16 and in fp16


@pytest.mark.parametrize("precision, backprop_fraction", [("bf16", 1), ("fp16", 1), ("fp16", 0.5)])
def test_one_gpu_run_in_reduced_precision_learns_and_saves_a_loadable_model(tiny_data, tmp_path, precision,
                                                                            backprop_fraction):
    """Also Selective-Backprop's step, whose ranking pass runs under autocast and whose loss the fp16 scaler scales."""
    skip_without_bf16(precision)
    out = tmp_path / "run"
    result = run_trainer("--epochs", 3, "--batch-size", 100, "--precision", precision, "--seed", 0, "--tta", 1,
                         "--backprop-fraction", backprop_fraction, "--data-dir", tiny_data, "--out-dir", out,
                         env=one_gpu_env())
    assert result.returncode == 0, tail(result)
    assert "[hardware] GPUs: 1" in result.stdout
    history = history_of(out)
    plan = history["plan"]
    assert plan["device"] == "cuda:0" and plan["parallel"] == "none" and plan["precision"] == precision
    assert plan["backprop_fraction"] == backprop_fraction
    assert all(math.isfinite(row["train_loss"]) for row in history["epochs"])
    final = history["final"]
    assert final["test_acc"] > 30 and final["test_acc_tta"] > 30  # the tiny classes are easy: chance is 10%

    checkpoint = torch.load(out / "best_model.pth", weights_only=True)
    assert checkpoint["test_acc"] == final["test_acc"] and checkpoint["test_acc_tta"] == final["test_acc_tta"]
    assert all(t.device.type == "cpu" for t in checkpoint["state_dict"].values())
    # The GPU-trained weights work on the CPU in fp32: the same accuracy, give or take a few of the 200 images
    # that reduced precision classified differently.
    model, _ = train.load_trained_model(out / "best_model.pth")
    assert train.evaluate(model, *load_test_split(tiny_data))[1] == pytest.approx(checkpoint["test_acc"], abs=5)


def test_fp16_gradient_scaler_skips_an_overflowing_step(tiny_data, tmp_path):
    run, data = build_gpu_run(tiny_data, tmp_path, 100, "--precision", "fp16", gpus=first_gpu())
    assert run.autocast_dtype == torch.float16
    assert isinstance(run.scaler, torch.amp.GradScaler) and run.scaler.is_enabled()

    # A loss scale of 2**60 makes every fp16 gradient overflow: the step must be skipped and the scale lowered.
    initial = run.scaler.state_dict()
    run.scaler.load_state_dict({**initial, "scale": 2.0**60})
    before = {name: p.detach().clone() for name, p in run.model.named_parameters()}
    conv_dtypes = []
    hook = run.model.layers[0].conv1.register_forward_hook(lambda m, i, out: conv_dtypes.append(out.dtype))
    run.forward_model.train()
    inputs, labels = next(iter(run.train_batches.epoch(0)))
    try:
        train.training_step(run.forward_model, run.optimizer, run.scaler, inputs, labels, run.autocast_dtype)
    finally:
        hook.remove()
    assert conv_dtypes == [torch.float16]
    trainable = [p for p in run.model.parameters() if p.requires_grad]
    assert any(p.grad is not None and not bool(torch.isfinite(p.grad).all()) for p in trainable)  # it overflowed
    for name, p in run.model.named_parameters():
        assert torch.equal(p.detach(), before[name]), f"{name} changed in a step whose gradients overflowed"
    assert run.scaler.get_scale() == 2.0**59

    # Training goes on from a skipped step. Back at the trainer's own initial scale (from 2**59 the scaler would
    # need ~40 skipped steps to come down, more than these 2 short epochs have), the network learns in fp16.
    run.scaler.load_state_dict({**run.scaler.state_dict(), "scale": initial["scale"]})
    assert train.train_loop(run, data)
    assert all_finite(run.model.state_dict().values())
    assert 0 < run.scaler.get_scale() <= initial["scale"]  # lowered on any overflow, not grown in 20 steps
    assert run.history["epochs"][-1]["test_acc"] > 30


# ----------------------------------------------------------------------------------------------
# 2. DataParallel


def dataparallel_gpus():
    """GPUs for a DataParallel group: from cuda:1 on where there are 3+ (so the master is not cuda:0), else
    cuda:0 and cuda:1. Only GPUs of one model make a group."""
    gpus = train.detect_hardware().gpus
    group, _ = train.choose_gpu_group(gpus[1:] if len(gpus) >= 3 else gpus[:2])
    if len(group) < 2:
        pytest.skip("no two GPUs of the same model for a DataParallel group")
    return group


@needs_two_gpus
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_dataparallel_replicas_compute_in_the_planned_dtype_and_gather_on_the_master(tiny_data, tmp_path, precision):
    skip_without_bf16(precision)
    gpus = dataparallel_gpus()
    # Enough images that every GPU of the group gets a share of the batch.
    run, data = build_gpu_run(tiny_data, tmp_path, min(1000, 25 * len(gpus)), "--precision", precision,
                                    gpus=gpus)
    ids = run.plan["device_ids"]
    master = torch.device(f"cuda:{ids[0]}")
    assert ids == [gpu.index for gpu in gpus] and run.plan["parallel"] == "DataParallel"
    assert run.device == master == torch.device(run.plan["device"])
    assert isinstance(run.forward_model, nn.DataParallel) and isinstance(run.forward_model.module, train.AutocastForward)
    assert all(p.device == master for p in run.model.parameters())
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert run.autocast_dtype == dtype

    seen = []  # (dtype, device) of the first conv's output, once per replica (hooks are shared with replicas)
    hook = run.model.layers[0].conv1.register_forward_hook(lambda m, i, out: seen.append((out.dtype, out.device)))
    run.forward_model.train()
    inputs, labels = next(iter(run.train_batches.epoch(0)))
    try:
        # The trainer's own step: autocast entered in this thread with the plan's dtype, then DataParallel.
        outputs, loss = train.training_step(run.forward_model, run.optimizer, run.scaler, inputs, labels, run.autocast_dtype)
    finally:
        hook.remove()
    assert sorted(str(device) for _, device in seen) == sorted(f"cuda:{i}" for i in ids)  # every replica ran
    assert [d for d, _ in seen] == [dtype] * len(ids), f"replicas computed in {seen}, the plan said {dtype}"
    assert outputs.device == master and outputs.dtype == dtype and outputs.shape == (len(labels), 10)
    assert torch.isfinite(loss)
    assert all(p.grad is None or p.grad.device == master for p in run.model.parameters())


@needs_two_gpus
def test_dataparallel_run_over_every_gpu_finishes(tiny_data, tmp_path):
    out = tmp_path / "run"
    result = run_trainer("--epochs", 2, "--batch-size", 100, "--seed", 0, "--tta", 1, "--data-dir", tiny_data,
                         "--out-dir", out)
    assert result.returncode == 0, tail(result)
    assert "[plan] parallel: DataParallel" in result.stdout
    history = history_of(out)
    plan = history["plan"]
    assert plan["parallel"] == "DataParallel" and len(plan["device_ids"]) >= 2
    assert plan["device"] == f"cuda:{plan['device_ids'][0]}"
    assert [row["epoch"] for row in history["epochs"]] == [1, 2]
    assert history["final"]["test_acc"] > 30
    torch.load(out / "best_model.pth", weights_only=True)


# ----------------------------------------------------------------------------------------------
# 3. CUDA out of memory


def test_cuda_out_of_memory_backs_off_and_frees_the_failed_step(tiny_data, tmp_path, monkeypatch, capsys):
    run, data = build_gpu_run(tiny_data, tmp_path, 200, gpus=first_gpu())
    device = run.device
    assert device.type == "cuda" and run.plan["parallel"] == "none"
    fail_at = 8  # training forward 8: step 3 of epoch 2 (5 steps per epoch at batch 200)
    forward, calls, seen = run.model.forward, {"n": 0}, {}

    def forward_running_out(x):
        if not run.model.training:
            return forward(x)
        calls["n"] += 1
        if calls["n"] == fail_at:
            seen["before"] = torch.cuda.memory_allocated(device)
            # As in a real out-of-memory error part-way through the forward pass, the step's activations exist
            # (held by this frame, and so by the exception's traceback) when the error is raised.
            outputs = forward(x)
            seen["failing"] = torch.cuda.memory_allocated(device)
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected by the test, batch of {len(outputs)})")
        if calls["n"] == fail_at + 1:  # the first step of the retried epoch
            seen["after"], seen["retry_batch"] = torch.cuda.memory_allocated(device), len(x)
        return forward(x)

    monkeypatch.setattr(run.model, "forward", forward_running_out)
    assert train.train_loop(run, data)
    assert run.batch_size == 100 and seen["retry_batch"] == 100
    assert run.history["events"] == [{"out_of_memory": {"epoch": 2, "batch_size": 100}}]
    assert [(r["epoch"], r["batch_size"]) for r in run.history["epochs"]] == [(1, 200), (2, 100)]
    assert "retrying it with batch size 100" in capsys.readouterr().err
    assert all_finite(run.model.state_dict().values())
    # The failed step held real activations; once backed off, they are gone (the retry starts no fuller than
    # the failed step did, its smaller batch aside).
    assert seen["failing"] - seen["before"] > MEMORY_MARGIN, seen
    assert seen["after"] <= seen["before"] + MEMORY_MARGIN, seen


# ----------------------------------------------------------------------------------------------
# 4. A GPU run resumed on the CPU


@pytest.fixture(scope="module")
def interrupted_gpu_run(tiny_data, tmp_path_factory):
    """A 3-epoch run on one GPU, stopped by SIGTERM after its first epoch."""
    out = tmp_path_factory.mktemp("gpu_interrupted")
    process = start_trainer("--epochs", 3, "--seed", 7, "--tta", 0, *TINY, "--data-dir", tiny_data, "--out-dir", out,
                            env=one_gpu_env())
    stderr = interrupt_after_first_epoch(process)
    assert process.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr
    state = last_state(out)
    assert 1 <= state["epoch"] < 3 and state["plan"]["device"] == "cuda:0"
    return out


@pytest.mark.parametrize("how", ["--device cpu", "CUDA_VISIBLE_DEVICES="])
def test_gpu_run_resumed_on_the_cpu_finishes_or_is_refused_clearly(interrupted_gpu_run, tmp_path, how):
    out = tmp_path / "run"
    shutil.copytree(interrupted_gpu_run, out, ignore=shutil.ignore_patterns(".lock"))
    before = (out / "last.pth").read_bytes()
    flags, env = (["--device", "cpu"], {}) if how == "--device cpu" else ([], {"CUDA_VISIBLE_DEVICES": ""})
    result = run_trainer("--resume", out / "last.pth", *flags, env=env, timeout=900)
    # Either it continues (on the CPU, saying so) to the end, or it refuses in one paragraph: never a traceback.
    assert result.returncode in (0, 2), tail(result)
    assert "Traceback" not in result.stderr, tail(result)
    if result.returncode == 0:
        assert last_state(out)["epoch"] == 3
    else:
        assert "error:" in result.stderr
        assert (out / "last.pth").read_bytes() == before  # a refusal leaves the run as it was


# ----------------------------------------------------------------------------------------------
# 5. torchrun with NCCL


def final_model(out):
    return last_state(out)["model"]


def max_difference(a, b):
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


@needs_two_gpus
def test_torchrun_two_nccl_ranks_train_and_a_resumed_run_matches_the_uninterrupted_one(tiny_data, tmp_path):
    common = ["--epochs", 3, "--seed", 4, "--tta", 1, *TINY, "--data-dir", tiny_data]
    uninterrupted, twin, resumed = tmp_path / "uninterrupted", tmp_path / "twin", tmp_path / "resumed"

    result = run_trainer(*common, "--out-dir", uninterrupted, ranks=2)
    assert result.returncode == 0, tail(result)
    assert "[plan] parallel: DistributedDataParallel, 2 ranks" in result.stdout
    history = history_of(uninterrupted)
    assert history["plan"]["world_size"] == 2 and history["plan"]["device"] == "cuda:0"
    assert [row["epoch"] for row in history["epochs"]] == [1, 2, 3]
    assert history["final"]["test_acc"] > 30

    process = start_trainer(*common, "--out-dir", resumed, ranks=2)
    stderr = interrupt_after_first_epoch(process)  # torchrun passes SIGTERM on to both ranks
    assert "Resume with: torchrun --standalone --nproc_per_node=2 train.py --resume" in stderr, stderr[-3000:]
    assert 1 <= len(history_of(resumed)["epochs"]) < 3
    result = run_trainer("--resume", "--out-dir", resumed, ranks=2)
    assert result.returncode == 0, tail(result)
    history = history_of(resumed)
    assert [row["epoch"] for row in history["epochs"]] == [1, 2, 3]
    assert history["events"][0]["resumed"].endswith("last.pth")
    assert last_state(resumed)["step"] == last_state(uninterrupted)["step"]

    result = run_trainer(*common, "--out-dir", twin, ranks=2)
    assert result.returncode == 0, tail(result)
    expected, got = final_model(uninterrupted), final_model(resumed)
    assert expected.keys() == got.keys()
    for name, tensor in got.items():
        if not tensor.is_floating_point():  # BatchNorm's step counters: exact in any case
            assert torch.equal(tensor, expected[name]), name
    if all(torch.equal(t, expected[k]) for k, t in final_model(twin).items()):
        # The GPU repeats a run bit for bit: a resumed run must too.
        for name, tensor in got.items():
            assert torch.equal(tensor, expected[name]), name
    else:
        # Two uninterrupted runs with one seed already differ: GPU training is not bit-reproducible here
        # (cudnn.benchmark may pick other convolution kernels in another process, and some backward kernels
        # sum with atomics in any order; NCCL's 2-rank sum itself is order-free). So the resumed run cannot be
        # held to torch.equal; it is held to the run-to-run noise of the GPU itself: no further from the
        # uninterrupted run than a few times the twin is. (Where that noise grows to the size of the weights,
        # this check is weak; the schedule checks above still hold exactly.)
        noise = max_difference(final_model(twin), expected)
        for name, tensor in got.items():
            if tensor.is_floating_point():
                assert torch.allclose(tensor, expected[name], rtol=0, atol=4 * noise + 1e-6), \
                    (name, float((tensor - expected[name]).abs().max()), noise)


# ----------------------------------------------------------------------------------------------
# 6. The default run on the real CIFAR-10: its accuracy and time, printed for the record


CIFAR10 = train.DATASETS["cifar10"]
CIFAR_DIR = ROOT / train.DEFAULT_DATA_DIR / CIFAR10.folder


@pytest.mark.skipif(not all((CIFAR_DIR / name).is_file() for name in CIFAR10.train_files + CIFAR10.test_files),
                    reason=f"CIFAR-10 is not in {CIFAR_DIR}")
def test_default_run_on_cifar10_records_its_accuracy_and_time(tmp_path, capsys):
    out = tmp_path / "run"
    t0 = time.time()
    # As a user runs it: the plan's defaults, the environment as it is (OMP_NUM_THREADS not forced).
    result = run_trainer("--out-dir", out, "--seed", 0, timeout=3600)
    wall = time.time() - t0
    assert result.returncode == 0, tail(result)
    history = history_of(out)
    plan, final = history["plan"], history["final"]
    model = train.model_text(plan["model"], plan["model_kwargs"])
    with capsys.disabled():
        print(f"\n[default run on CIFAR-10] {plan['gpu_name']} x{len(plan['device_ids'])}, {model}, "
              f"{plan['epochs']} epochs, batch {plan['batch_size']}, {plan['precision']}: test accuracy "
              f"{final['test_acc_tta']:.2f}% with TTA {final['tta_level']} ({final['test_acc']:.2f}% plain, saved "
              f"epoch {final['best_epoch']}), training {final['train_seconds']:.1f}s, whole run {wall:.0f}s",
              file=sys.stderr, flush=True)
    assert math.isfinite(final["test_acc_tta"]) and final["train_seconds"] > 0
    assert [row["epoch"] for row in history["epochs"]] == list(range(1, plan["epochs"] + 1))
