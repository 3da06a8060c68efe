"""The GPU precision paths (bf16 autocast; fp16 autocast with a gradient scaler), run on the CPU.

CPU autocast supports both dtypes, so the same training-step code the GPU plan uses runs here.
"""
import pytest
import torch

import train
from conftest import build_tiny_run
from tiny_cifar import write_tiny_cifar


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_step_path(tmp_path, precision):
    # 50 training images: CPUs without bf16/fp16 units emulate these convolutions, slowly.
    write_tiny_cifar(tmp_path / "data", per_batch=10, test_size=50)
    run, data = build_tiny_run(tmp_path / "data", tmp_path, 25)
    run.autocast_dtype, run.scaler = train.make_precision(precision, run.device)
    assert run.autocast_dtype in (torch.bfloat16, torch.float16)
    assert train.train_loop(run, data)
    rows = run.history["epochs"]
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in rows)
    assert rows[-1]["test_acc"] > 30  # it learned, in reduced precision
    if precision == "fp16":
        assert run.scaler.get_scale() > 0
        assert "scaler" in train.training_state(run, 2)


def test_plan_precision_choices_map_to_autocast_dtypes():
    hw = train.Hardware((train.GPU(0, "Tesla V100", 16, bf16=False),), 8)
    assert train.make_plan(hw)["precision"] == "fp16"
    hw = train.Hardware((train.GPU(0, "NVIDIA A100", 40),), 8)
    assert train.make_plan(hw)["precision"] == "bf16"
