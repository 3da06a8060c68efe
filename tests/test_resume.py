"""Resumable, interrupt-safe training: the real trainer, killed and resumed on tiny data."""
import json
import random
import signal
import time

import pytest
import torch

from conftest import TINY, run_trainer, start_trainer, wait_for_line

def epoch_numbers(out):
    return [(row["epoch"], row["train_loss"], row["train_acc"], row["test_loss"], row["test_acc"], row["lr"])
            for row in json.loads((out / "training_history.json").read_text())["epochs"]]


def assert_every_file_loads(folder):
    for path in folder.iterdir():
        if path.suffix == ".pth":
            torch.load(path, weights_only=True)
        elif path.suffix == ".json":
            json.loads(path.read_text())


def final_weights(out):
    return torch.load(out / "last.pth", weights_only=True)["model"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    result = run_trainer("--epochs", 3, "--seed", 7, "--data-dir", tiny_data, "--out-dir", out, *TINY, "--tta", 0,
                         "--small-crop-epochs", 2)
    assert result.returncode == 0, result.stderr
    return out


def test_ctrl_c_saves_and_resume_matches_the_uninterrupted_run(uninterrupted, tiny_data, tmp_path):
    """Also shows that --seed fixes a CPU run: the resumed run's numbers equal another process's run. The first two
    epochs train on small crops, so the run usually stops in the second and resumes its crops (test_data shows a
    resumed crop epoch cuts the same windows), then goes on to whole images.
    (SIGTERM, exit code 143: test_beyond_cifar10's image-folder resume.)"""
    process = start_trainer("--epochs", 3, "--seed", 7, "--data-dir", tiny_data, "--out-dir", tmp_path, *TINY,
                            "--tta", 0, "--small-crop-epochs", 2)
    wait_for_line(process, "[epoch 1/3]")
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert f"Resume with: python train.py --resume {tmp_path / 'last.pth'}" in stderr
    state = torch.load(tmp_path / "last.pth", weights_only=True)
    assert 1 <= state["epoch"] < 3

    result = run_trainer("--resume", tmp_path / "last.pth")  # the out dir defaults to the checkpoint's folder
    assert result.returncode == 0, result.stderr
    assert "[resume] continuing" in result.stdout
    assert epoch_numbers(tmp_path) == epoch_numbers(uninterrupted)
    expected = final_weights(uninterrupted)
    for name, tensor in final_weights(tmp_path).items():
        assert torch.equal(tensor, expected[name]), name


def test_sigkill_at_random_moments_then_resume_completes(tiny_data, tmp_path):
    rng = random.Random(0)
    epochs = 4
    for attempt in range(2):
        # Killed before its first last.pth, a run leaves at most a best_model.pth: start it over.
        resume = ["--resume"] if (tmp_path / "last.pth").exists() else ["--overwrite"]
        process = start_trainer("--epochs", epochs, "--seed", 3, "--data-dir", tiny_data, "--out-dir", tmp_path,
                                *TINY, "--tta", 0, *resume)
        wait_for_line(process, "--- [6/10]")
        time.sleep(rng.uniform(0.2, 2.5))
        process.kill()
        process.communicate()
        assert_every_file_loads(tmp_path)  # whatever the moment, every file there is whole
    resume = ["--resume"] if (tmp_path / "last.pth").exists() else ["--overwrite"]
    result = run_trainer("--epochs", epochs, "--seed", 3, "--data-dir", tiny_data, "--out-dir", tmp_path, *TINY,
                         "--tta", 0, *resume)
    assert result.returncode == 0, result.stderr
    assert [row[0] for row in epoch_numbers(tmp_path)] == list(range(1, epochs + 1))
    assert not list(tmp_path.glob(".*.tmp"))
    torch.load(tmp_path / "best_model.pth", weights_only=True)


def test_second_ctrl_c_exits_at_once_and_tears_nothing(tiny_data, tmp_path):
    process = start_trainer("--epochs", 3, "--seed", 7, "--data-dir", tiny_data, "--out-dir", tmp_path, *TINY,
                            "--tta", 0)
    wait_for_line(process, "[epoch 1/3]")
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert not list(tmp_path.glob("*.tmp"))
    assert_every_file_loads(tmp_path)
