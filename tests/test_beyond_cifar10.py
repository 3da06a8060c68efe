"""The trainer on CIFAR-100, on an image folder and with the standard ResNets: real runs on tiny data."""
import json
import signal

import pytest
import torch

from conftest import TINY, history_of, run_cli, run_trainer, start_trainer, wait_for_line
from test_bad_input import assert_refused
from test_datasets import rewrite
from tiny_cifar import write_image_split, write_tiny_cifar, write_tiny_cifar100
from train import load_trained_model


def test_cifar100_trains_and_reports_top5_everywhere(tmp_path):
    write_tiny_cifar100(tmp_path / "data", train_size=1000, test_size=200)
    result = run_trainer("--dataset", "cifar100", "--epochs", 2, *TINY, "--tta", 0, "--seed", 0,
                         "--data-dir", tmp_path / "data", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "runs" / "cifar100-001"  # the default folder is named after the dataset
    assert "[data] CIFAR-100 in" in result.stdout and "100 classes" in result.stdout  # said before loading
    assert "Top-5:" in result.stdout and ", top-5 " in result.stdout  # progress lines and epoch lines
    rows = history_of(out)["epochs"]
    assert all(row["test_top5"] >= row["test_acc"] and row["train_top5"] >= row["train_acc"] for row in rows)
    assert rows[-1]["test_top5"] > 10  # chance is 5%
    best = torch.load(out / "best_model.pth", weights_only=True)
    assert best["dataset"] == "CIFAR-100" and best["num_classes"] == 100 and best["class_names"][7] == "fine_07"
    assert best["test_top5"] >= best["test_acc"]
    assert history_of(out)["final"]["test_top5"] == best["test_top5"]
    report = json.loads((out / "report.json").read_text())["test"]  # the report names all 100 classes
    assert report["top5"] == history_of(out)["final"]["test_top5_tta"] and len(report["per_class"]) == 100


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Three classes in nested folders, PNG/JPEG/BMP of three sizes, and one file that is not an image."""
    root = tmp_path_factory.mktemp("images")
    write_image_split(root / "train", per_class=40)
    write_image_split(root / "test", per_class=6, seed=1)
    (root / "train" / "dog" / "a" / "broken.jpg").write_bytes(b"this is not a JPEG" * 20)
    return root


FOLDER_RUN = ["--epochs", 2, "--model", "SmallCifarNet", "--batch-size", 30, "--tta", 0, "--seed", 3]


@pytest.fixture(scope="module")
def folder_run(image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("folder_run")
    result = run_trainer(*FOLDER_RUN, "--data-dir", image_folder, "--out-dir", out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_an_image_folder_trains_skipping_the_broken_file(folder_run, image_folder):
    out, result = folder_run
    assert "[data] image folder" in result.stdout and "3 classes (cat, dog, fox)" in result.stdout
    assert "skipped train/dog/a/broken.jpg" in result.stdout
    assert history_of(out)["dataset"]["notes"] == [f"skipped train/dog/a/broken.jpg (not an image format Pillow "
                                                   f"reads) in {image_folder}"]
    model, best = load_trained_model(out / "best_model.pth")
    assert best["class_names"] == ["cat", "dog", "fox"] and best["image_size"] == 32
    assert best["test_acc"] > 50  # the classes differ in colour: chance is 33%
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 3)


def test_an_image_folder_run_resumes_exactly(folder_run, image_folder, tmp_path):
    out, _ = folder_run
    process = start_trainer(*FOLDER_RUN, "--data-dir", image_folder, "--out-dir", tmp_path, "--log-every", 1)
    wait_for_line(process, "Batch [2/4]")  # the first epoch's second step: stop mid-epoch
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-3000:]
    result = run_trainer("--resume", "--out-dir", tmp_path)  # dataset, folder and image size come from last.pth
    assert result.returncode == 0, result.stderr[-3000:]
    expected = torch.load(out / "last.pth", weights_only=True)["model"]
    resumed = torch.load(tmp_path / "last.pth", weights_only=True)["model"]
    assert all(torch.equal(expected[name], resumed[name]) for name in expected)


# ResNet34 is ResNet18's BasicBlock code with more blocks (its shapes and groups: test_models.py); its run here
# took 15 s of the suite's 10 minutes.
@pytest.mark.parametrize("model_name", ["ResNet18", "ResNet50"])
def test_resnets_train_and_their_best_model_predicts(model_name, tmp_path):
    write_tiny_cifar(tmp_path / "data", per_batch=7, test_size=10)  # 35 training images: 1 step of 32
    result = run_trainer("--model", model_name, "--epochs", 1, "--batch-size", 32, "--tta", 0,
                         "--data-dir", tmp_path / "data", "--out-dir", tmp_path / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    best = torch.load(tmp_path / "run" / "best_model.pth", weights_only=True)
    assert best["model_name"] == model_name
    model, _ = load_trained_model(tmp_path / "run" / "best_model.pth")
    assert model(torch.zeros(3, 3, 32, 32)).shape == (3, 10)


def break_fine_labels(root):
    rewrite(write_tiny_cifar100(root, train_size=50, test_size=20) / "train", lambda batch: batch.pop("fine_labels"))
    return ["--dataset", "cifar100"]


def empty_class_folder(root):
    write_image_split(root / "train", per_class=3)
    (root / "train" / "empty").mkdir()
    return []


def unreadable_images(root):
    write_image_split(root / "train", per_class=3)
    for i in range(3):
        (root / "train" / "cat" / f"bad{i}.png").write_bytes(b"not a PNG")
    return []


def no_class_folders(root):
    (root / "train").mkdir(parents=True)
    (root / "train" / "photo.jpg").write_bytes(b"loose files are not classes")
    return []


@pytest.mark.parametrize("make_bad_data, message", [
    (break_fine_labels, "it has no 'fine_labels' entry"),
    (empty_class_folder, "train/empty holds no images"),
    (unreadable_images, "cannot be read as images"),
    (no_class_folders, "holds no class folders"),
])
def test_bad_new_data_is_refused_in_one_paragraph(make_bad_data, message, tmp_path):
    flags = make_bad_data(tmp_path / "data")
    result = run_cli("--epochs", 1, *flags, "--data-dir", tmp_path / "data", "--out-dir", tmp_path / "run")
    assert_refused(result, message)
    assert not (tmp_path / "run").exists()
