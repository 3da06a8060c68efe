"""End-to-end runs of the real trainer on tiny generated data."""
import json
import os
import signal

import pytest
import torch

from conftest import TINY, load_test_split, run_cli, run_trainer
from models import MODELS
from train import cpu_has_bf16, evaluate, load_trained_model



@pytest.fixture(scope="module")
def two_epoch_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    result = run_trainer("--epochs", 2, "--data-dir", tiny_data, "--out-dir", out, *TINY, "--seed", 1)
    assert result.returncode == 0, result.stdout + result.stderr
    return out, result


def test_two_epoch_run_writes_all_outputs(two_epoch_run):
    out, result = two_epoch_run
    assert "--- [1/10] Starting ---" in result.stdout
    assert "[hardware] GPUs: 0" in result.stdout
    assert "Epoch [2/2] | Batch [10/10] | Loss:" in result.stdout
    for name in ["best_model.pth", "last.pth", "training_history.json", "training_curves.png"]:
        assert (out / name).stat().st_size > 0, name
    assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*.tmp"))


def test_history_records_plan_args_and_every_epoch(two_epoch_run):
    out, _ = two_epoch_run
    history = json.loads((out / "training_history.json").read_text())
    assert history["plan"]["batch_size"] == 100 and history["plan"]["epochs"] == 2
    assert history["args"]["seed"] == 1
    assert [row["epoch"] for row in history["epochs"]] == [1, 2]
    for row in history["epochs"]:
        for key in ["train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds", "images_per_s",
                    "peak_memory_gb"]:
            assert row[key] >= 0, key
    assert history["epochs"][-1]["test_acc"] > 30  # the tiny classes are easy: far above 10% chance


def test_best_model_reloads_and_reproduces_its_recorded_accuracy(two_epoch_run, tiny_data):
    out, _ = two_epoch_run
    checkpoint = torch.load(out / "best_model.pth", weights_only=True)
    assert checkpoint["model_name"] in MODELS
    assert checkpoint["class_names"][0] == "airplane" and len(checkpoint["normalization"]["mean"]) == 3
    model, checkpoint = load_trained_model(out / "best_model.pth")
    test_split = load_test_split(tiny_data)
    assert evaluate(model, *test_split, tta=0)[1] == pytest.approx(checkpoint["test_acc"])
    assert evaluate(model, *test_split, tta=checkpoint["tta_level"])[1] == pytest.approx(checkpoint["test_acc_tta"])
    history = json.loads((out / "training_history.json").read_text())
    assert history["final"]["test_acc_tta"] == pytest.approx(checkpoint["test_acc_tta"])
    last = history["epochs"][-1]  # no validation split: the last epoch is saved, whatever the test set says
    assert checkpoint["epoch"] == last["epoch"] == 2 and checkpoint["test_acc"] == last["test_acc"]


def test_a_selective_backprop_run_trains_and_its_per_example_rates_count_the_backpropagated(finished_run, tiny_data,
                                                                                           tmp_path):
    result = run_trainer("--epochs", 1, "--data-dir", tiny_data, "--out-dir", tmp_path, *TINY, "--tta", 0, "--seed", 0,
                         "--precision", "fp32", "--backprop-fraction", 0.5)  # finished_run's flags, and this one
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[plan] backpropagated: the hardest 50% of each batch (set by --backprop-fraction)" in result.stdout
    history = json.loads((tmp_path / "training_history.json").read_text())
    assert history["plan"]["backprop_fraction"] == 0.5 and history["epochs"][-1]["test_acc"] > 30

    def last_rates(out):
        groups = torch.load(out / "last.pth", weights_only=True)["optimizer"]["param_groups"]
        return {group["name"]: group["lr"] for group in groups}

    selective, plain = last_rates(tmp_path), last_rates(finished_run)
    assert plain["head"] > 0 and plain["filters"] > 0  # the last step's rates, not yet decayed to zero
    assert selective["head"] == pytest.approx(plain["head"] / 2)  # 50 examples a step, not 100
    assert selective["filters"] == pytest.approx(plain["filters"])  # Muon's rate is not per example


def test_dry_run_touches_no_data(tmp_path):
    result = run_cli("--dry-run", "--data-dir", tmp_path / "nothing", "--out-dir", tmp_path / "out")
    assert result.returncode == 0
    expected = "PowerCifarNet(width_mult=1.0)" if cpu_has_bf16() else "SmallCifarNet()"  # this CPU's tier
    assert f"[plan] model: {expected}" in result.stdout
    assert not (tmp_path / "nothing").exists() and not (tmp_path / "out").exists()


def test_simulated_gpus_print_the_plan_for_that_machine(tmp_path):
    result = run_cli("--simulate-gpus", "NVIDIA RTX A6000:48,NVIDIA GeForce RTX 3090:24,NVIDIA GeForce RTX 3090:24")
    assert result.returncode == 0, result.stderr
    assert "[gpu] using NVIDIA GeForce RTX 3090 x2 (ignored: GPU 0 NVIDIA RTX A6000)" in result.stdout
    assert "[plan] device: cuda:1" in result.stdout
    assert "DataParallel over devices [1, 2]" in result.stdout


def test_help_documents_every_flag():
    result = run_cli("--help")
    assert result.returncode == 0
    for flag in ["--epochs", "--batch-size", "--lr", "--weight-decay", "--num-workers", "--data-dir", "--out-dir",
                 "--disable-auto", "--dry-run", "--simulate-gpus", "--resume", "--seed", "--tta", "--model",
                 "--backprop-fraction"]:
        assert flag in result.stdout, flag


def counted_curves(monkeypatch, train):
    """The epochs each drawing of the curves shows, as the real plot_curves draws them."""
    drawn, real_plot_curves = [], train.plot_curves

    def counted_plot_curves(history, path):
        drawn.append(len(history["epochs"]))
        real_plot_curves(history, path)

    monkeypatch.setattr(train, "plot_curves", counted_plot_curves)
    return drawn


def test_epochs_quicker_than_curves_every_seconds_skip_the_drawing(tiny_data, tmp_path, monkeypatch):
    """A drawing takes longer than an epoch on a big GPU: epoch 1 is drawn, the next ones only once
    CURVES_EVERY_SECONDS have passed, and the finished run's curves show every epoch."""
    import train

    drawn = counted_curves(monkeypatch, train)
    monkeypatch.setattr(train, "CURVES_EVERY_SECONDS", 3600)
    result = run_cli("--epochs", 2, "--data-dir", tiny_data, "--out-dir", tmp_path / "run", *TINY, "--tta", 0,
                     "--precision", "fp32")
    assert result.returncode == 0, result.stdout + result.stderr
    assert drawn == [1, 2]  # epoch 1's, then the end's; every epoch was drawn before
    assert (tmp_path / "run" / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_stopped_at_an_epoch_end_draws_the_epochs_its_curves_lack(tiny_data, tmp_path, monkeypatch):
    """SIGTERM as epoch 2 is saved: its save skips the drawing (CURVES_EVERY_SECONDS not yet passed), so the stop
    draws the curves once more, to show both epochs."""
    import train

    drawn = counted_curves(monkeypatch, train)
    monkeypatch.setattr(train, "CURVES_EVERY_SECONDS", 3600)
    real_save_outputs = train.save_outputs

    def save_then_stop(run, best=None, state=None, curves=True):
        real_save_outputs(run, best, state, curves)
        if len(run.history["epochs"]) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the run's own handler takes it, as from a user

    monkeypatch.setattr(train, "save_outputs", save_then_stop)
    result = run_cli("--epochs", 3, "--data-dir", tiny_data, "--out-dir", tmp_path / "run", *TINY, "--tta", 0,
                     "--precision", "fp32")
    assert result.returncode == train.exit_code_for(signal.SIGTERM), result.stdout + result.stderr
    assert drawn == [1, 2]
