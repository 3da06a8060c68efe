"""Faults during training: out of memory, divergence, failing writes."""
import copy

import pytest
import torch

import train
from conftest import TINY, build_tiny_run, run_cli, run_trainer


def inject_out_of_memory(run, monkeypatch, at_steps):
    """Make the real model raise CUDA's out-of-memory error on the given training forward passes."""
    forward, calls = run.model.forward, {"n": 0}

    def forward_running_out(x):
        if run.model.training:
            calls["n"] += 1
            if calls["n"] in at_steps:
                raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")
        return forward(x)

    monkeypatch.setattr(run.model, "forward", forward_running_out)


def test_out_of_memory_halves_the_batch_and_retries_the_epoch(tiny_data, tmp_path, monkeypatch, capsys):
    run, data = build_tiny_run(tiny_data, tmp_path, batch_size=200)
    inject_out_of_memory(run, monkeypatch, at_steps={8})  # step 3 of epoch 2 (5 steps per epoch)
    plan = copy.deepcopy(run.plan)
    assert train.train_loop(run, data)
    assert run.batch_size == 100 and run.plan == plan  # the plan is never changed
    assert run.history["events"] == [{"out_of_memory": {"epoch": 2, "batch_size": 100}}]
    # SGD's rates are per example, so the head's rate halved with the batch; Muon's does not depend on it.
    rates = {group["name"]: group["lr"] for group in run.optimizer.param_groups}
    last_step_factor = 1 - 19 / 20  # linear decay, at the last of 20 steps
    assert rates["head"] == pytest.approx(train.HEAD_LR_PER_EXAMPLE * 100 * last_step_factor)
    assert rates["filters"] == pytest.approx(train.MUON_LR * last_step_factor)
    assert [(r["epoch"], r["batch_size"]) for r in run.history["epochs"]] == [(1, 200), (2, 100)]
    assert run.step == 2 * 10  # the retried epoch restarted at its own first step
    assert "retrying it with batch size 100" in capsys.readouterr().err


def test_out_of_memory_gives_up_below_the_minimum_batch(tiny_data, tmp_path, monkeypatch):
    run, data = build_tiny_run(tiny_data, tmp_path, batch_size=100)
    inject_out_of_memory(run, monkeypatch, at_steps=set(range(1, 100)))
    with pytest.raises(train.TrainingFailed, match="Out of GPU memory even at batch size 50"):
        train.train_loop(run, data)
    assert [e["out_of_memory"]["batch_size"] for e in run.history["events"]] == [50]


def test_diverging_training_stops_with_advice_and_keeps_outputs(tiny_data, tmp_path):
    result = run_trainer("--epochs", 3, "--batch-size", 100, "--model", "SmallCifarNet", "--lr", "1e30",
                         "--data-dir", tiny_data, "--out-dir", tmp_path, "--log-every", 5)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "training diverged" in result.stderr and "--lr 1e+30 (the recipe's: 0.24)" in result.stderr
    assert "Traceback" not in result.stderr


def test_running_out_of_cpu_memory_is_one_paragraph_and_keeps_the_last_epoch(tiny_data, tmp_path, monkeypatch):
    training_step, calls = train.training_step, {"n": 0}

    def step_running_out(*args, **kwargs):  # PyTorch's own error when malloc fails (a ulimit, a full machine)
        calls["n"] += 1
        if calls["n"] == 13:  # step 3 of epoch 2
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                               "memory: you tried to allocate 8589934592 bytes. Error code 12 (Cannot allocate memory)")
        return training_step(*args, **kwargs)

    monkeypatch.setattr(train, "training_step", step_running_out)
    result = run_cli("--epochs", 2, "--data-dir", tiny_data, "--out-dir", tmp_path, *TINY, "--tta", 0)
    assert result.returncode == 3 and "Traceback" not in result.stderr
    assert "error: Out of memory on the CPU (asking for 8,192 MiB more)" in result.stderr
    assert torch.load(tmp_path / "last.pth", weights_only=True)["epoch"] == 1
