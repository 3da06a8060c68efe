"""Every bad input gets one clear paragraph, exit code 2, no traceback, and damages nothing."""
import shutil

import pytest

from conftest import run_cli, run_trainer
from tiny_cifar import write_tiny_cifar


def break_truncated(folder):
    path = folder / "data_batch_2"
    path.write_bytes(path.read_bytes()[:1000])


def break_empty(folder):
    shutil.rmtree(folder)
    folder.mkdir()


def break_missing(folder):
    shutil.rmtree(folder.parent)


# Through the command line: exit 2, one paragraph, the earlier run kept. Every kind of damaged file is
# tested on the loader itself, in test_data.py.
DATA_CASES = {
    "missing data folder, offline": (break_missing, "downloading it from"),
    "empty data folder, offline": (break_empty, "downloading it from"),
    "truncated batch file": (break_truncated, "data_batch_2 is truncated or not a CIFAR-10 pickle"),
}


@pytest.fixture
def previous_run(tmp_path):
    """A run folder with files from an earlier run; bad inputs must leave them byte for byte."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "best_model.pth").write_bytes(b"earlier weights")
    (out / "training_history.json").write_text('{"earlier": true}')
    return out


def assert_refused(result, message, previous_run=None):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert message in result.stderr, result.stderr
    if previous_run is not None:
        assert (previous_run / "best_model.pth").read_bytes() == b"earlier weights"
        assert (previous_run / "training_history.json").read_text() == '{"earlier": true}'
        assert sorted(p.name for p in previous_run.iterdir()) == ["best_model.pth", "training_history.json"]


@pytest.mark.parametrize("case", DATA_CASES)
def test_bad_data(case, tmp_path, previous_run, monkeypatch):
    breaker, message = DATA_CASES[case]
    folder = write_tiny_cifar(tmp_path / "data", per_batch=20, test_size=20)
    breaker(folder)
    monkeypatch.setenv("CIFAR10_URL", (tmp_path / "offline.tar.gz").as_uri())  # never touch the network
    # --overwrite: the earlier run is replaced only once the new one is ready to train, so bad data keeps it.
    result = run_trainer("--epochs", 1, "--data-dir", tmp_path / "data", "--out-dir", previous_run, "--overwrite")
    assert_refused(result, message, previous_run)


FLAG_CASES = {
    "epochs 0": (["--epochs", "0"], "--epochs must be at least 1, got 0"),
    "epochs negative": (["--epochs", "-3"], "--epochs must be at least 1, got -3"),
    "batch size 0": (["--batch-size", "0"], "--batch-size must be at least 1"),
    "backprop fraction 0": (["--backprop-fraction", "0"], "--backprop-fraction is the share of each batch"),
    "backprop fraction above 1": (["--backprop-fraction", "1.5"], "more than 0 and at most 1; got 1.5"),
    "small crops negative": (["--small-crop-epochs", "-1"], "--small-crop-epochs must be 0 or more, got -1"),
    "small crops every epoch": (["--epochs", "2", "--small-crop-epochs", "2"],
                                "--small-crop-epochs 2 leaves none of the 2 epochs on whole images"),
    "small crops every budgeted epoch": (["--budget", "1h", "--small-crop-epochs", "50"],
                                         "--small-crop-epochs 50 leaves no epoch on whole images within the 50"),
    "lr nan": (["--lr", "nan"], "--lr must be a positive finite number, got nan"),
    "lr negative": (["--lr", "-0.1"], "--lr must be a positive finite number"),
    "weight decay inf": (["--weight-decay", "inf"], "--weight-decay must be a finite number"),
    "malformed simulate-gpus": (["--simulate-gpus", "RTX 3090"], "--simulate-gpus could not read 'RTX 3090'"),
    "simulate-gpus bad memory": (["--simulate-gpus", "A100:lots"], "--simulate-gpus could not read"),
    "fp16 on the CPU": (["--device", "cpu", "--precision", "fp16"], "--precision fp16 needs a CUDA GPU"),
    "width too small for a channel": (["--width-mult", "0.005"], "--width-mult 0.005 leaves a layer of PowerCifarNet"),
    "seed of 2**64": (["--seed", str(2**64)], "--seed must be between 0 and 4294967295"),
    "resume and overwrite": (["--resume", "--overwrite"], "give one of them"),
    "width of a ResNet": (["--model", "ResNet18", "--width-mult", "2"], "ResNet18 has fixed widths"),
    "image size of CIFAR": (["--image-size", "48"], "--image-size applies to image folders only"),
    "unknown flag": (["--epochz", "3"], "unrecognized arguments: --epochz"),
    "bad flag value": (["--epochs", "ten"], "invalid int value: 'ten'"),
}


@pytest.mark.parametrize("case", FLAG_CASES)
def test_bad_flags(case, previous_run):
    args, message = FLAG_CASES[case]
    assert_refused(run_cli(*args, "--out-dir", previous_run), message, previous_run)


def test_out_dir_that_is_a_file(tmp_path, tiny_data):
    target = tmp_path / "a_file"
    target.write_text("keep me")
    assert_refused(run_cli("--data-dir", tiny_data, "--out-dir", target), "is a file, not a folder")
    assert target.read_text() == "keep me"


def test_resume_of_missing_checkpoint(tmp_path, previous_run):
    result = run_cli("--resume", tmp_path / "nope" / "last.pth", "--out-dir", previous_run)
    assert_refused(result, "no checkpoint at", previous_run)


def test_resume_of_run_folder_without_last_checkpoint(previous_run):
    assert_refused(run_cli("--resume", "--out-dir", previous_run), "no checkpoint at", previous_run)


def test_resume_of_foreign_checkpoints(tmp_path, previous_run):
    import torch

    weights_only = tmp_path / "best_model.pth"
    torch.save({"state_dict": {}, "model_name": "SmallCifarNet"}, weights_only)
    assert_refused(run_cli("--resume", weights_only, "--out-dir", previous_run),
                   "is not a training checkpoint of this trainer", previous_run)
    other_tool = tmp_path / "other.pth"
    torch.save({"kind": "another-tools-state", "epoch": 3}, other_tool)
    assert_refused(run_cli("--resume", other_tool, "--out-dir", previous_run),
                   "is not a training checkpoint of this trainer", previous_run)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    assert_refused(run_cli("--resume", garbage, "--out-dir", previous_run), "could not be read", previous_run)


def test_resume_with_a_flag_that_would_change_its_plan_is_refused(finished_run, tiny_data):
    out = finished_run  # SmallCifarNet, fp32, CIFAR-10, 32x32
    before = (out / "last.pth").read_bytes()
    for flag, saved, given in [("--model", "SmallCifarNet", "PowerCifarNet"), ("--precision", "fp32", "bf16"),
                               ("--dataset", "cifar10", "cifar100"), ("--image-size", "32", "24"),
                               ("--backprop-fraction", "1.0", "0.5"), ("--small-crop-epochs", "0", "1")]:
        result = run_cli("--resume", "--out-dir", out, flag, given, "--data-dir", tiny_data)
        assert_refused(result, f"is a run with {flag} {saved}, but {flag} {given} was given")
    result = run_cli("--resume", "--out-dir", out, "--budget", "10m", "--data-dir", tiny_data)
    assert_refused(result, "is a run with no --budget, but --budget 10 min 0 s was given")
    assert (out / "last.pth").read_bytes() == before
