"""predict.py as a user runs it: real image files of many shapes, the trainer's own predictions, bad model files
and flags, --benchmark and Ctrl-C."""
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, load_test_split

import predict
import train


def run_predict(*args):
    return subprocess.run([sys.executable, str(ROOT / "predict.py"), *map(str, args)], capture_output=True, text=True,
                          timeout=180)


def parse_line(line):
    """'path: cat 91.2%, dog 5.1%' -> ('path', [('cat', 91.2), ('dog', 5.1)])."""
    path, classes = line.rsplit(": ", 1)
    return path, [(name, float(percent)) for name, percent in re.findall(r"(\S+) ([\d.]+)%", classes)]


@pytest.fixture(scope="module")
def model_path(finished_run):
    return finished_run / "best_model.pth"


@pytest.fixture(scope="module")
def class_names(model_path):
    return torch.load(model_path, weights_only=True)["class_names"]


def test_images_of_any_format_and_size_in_nested_folders(model_path, class_names, tmp_path):
    rng = np.random.default_rng(0)

    def save(relative, shape):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(tmp_path / relative)
        return str(tmp_path / relative)

    good = [save("photos/a/small.png", (32, 32, 3)), save("photos/a/wide.png", (100, 200, 3)),
            save("photos/b/c/gray.png", (40, 40)), save("photos/b/c/rgba.png", (48, 48, 4)),
            save("photos/b/tall.jpg", (70, 50, 3))]
    save("photos/.thumbnails/hidden.png", (32, 32, 3))  # hidden folders are not searched
    broken = tmp_path / "photos/b/broken.jpg"
    broken.write_bytes(b"not a JPEG at all" * 10)
    (tmp_path / "empty").mkdir()
    missing = tmp_path / "missing.png"

    # A batch size of 2 makes full batches and a ragged last one.
    result = run_predict(model_path, tmp_path / "photos", missing, tmp_path / "empty", "--batch-size", 2)

    assert result.returncode == 1, result.stderr
    lines = [parse_line(line) for line in result.stdout.splitlines()]
    assert [path for path, _ in lines] == sorted(good)
    for path, predictions in lines:
        assert len(predictions) == 3 and all(name in class_names for name, _ in predictions)
        percents = [percent for _, percent in predictions]
        assert percents == sorted(percents, reverse=True) and sum(percents) <= 100.15  # 3 roundings of 0.05
    for named in (broken, missing, tmp_path / "empty"):
        assert str(named) in result.stderr
    assert "3 path(s) gave no prediction" in result.stderr and "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def test_split_predictions(model_path, tiny_data, tmp_path_factory):
    """predict.py's output for 40 of the tiny test images saved as PNG files, with --top-k beyond the class count,
    and the loaded model's own probabilities for them."""
    images, _, _ = load_test_split(tiny_data)
    images = images[:40]
    folder = tmp_path_factory.mktemp("test_images")
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")  # lossless: same pixels
    result = run_predict(model_path, folder, "--top-k", 1000)
    model, checkpoint = train.load_trained_model(model_path)
    normalization = (tuple(checkpoint["normalization"]["mean"]), tuple(checkpoint["normalization"]["std"]))
    with torch.no_grad():
        probabilities = model(train.normalize(images, normalization)).softmax(1)
    return result, probabilities


def test_top1_agrees_with_the_trainer(test_split_predictions, class_names):
    result, probabilities = test_split_predictions
    assert result.returncode == 0, result.stderr
    lines = [parse_line(line) for line in result.stdout.splitlines()]
    assert len(lines) == len(probabilities)
    assert [predictions[0][0] for _, predictions in lines] == [class_names[i] for i in probabilities.argmax(1)]
    for (_, predictions), expected in zip(lines, probabilities):
        for name, percent in predictions:
            assert percent == pytest.approx(100 * expected[class_names.index(name)].item(), abs=0.051)


def test_top_k_beyond_the_class_count_shows_every_class(test_split_predictions, class_names):
    result, _ = test_split_predictions
    for line in result.stdout.splitlines():
        _, predictions = parse_line(line)
        assert sorted(name for name, _ in predictions) == sorted(class_names)
        assert sum(percent for _, percent in predictions) == pytest.approx(100, abs=0.5)


@pytest.mark.parametrize("kind", ["missing", "text file", "truncated", "last.pth"])
def test_bad_model_file_is_refused_in_one_paragraph(kind, model_path, finished_run, tmp_path):
    bad = {"missing": tmp_path / "nothing_here.pth", "text file": tmp_path / "notes.pth",
           "truncated": tmp_path / "truncated.pth", "last.pth": finished_run / "last.pth"}[kind]
    if kind == "text file":
        bad.write_text("these are not weights\n")
    if kind == "truncated":
        bad.write_bytes(model_path.read_bytes()[:model_path.stat().st_size // 2])
    image = tmp_path / "image.png"
    Image.new("RGB", (32, 32)).save(image)

    result = run_predict(bad, image)

    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and str(bad) in result.stderr and "best_model.pth" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_a_run_that_saved_no_model_yet_or_a_run_folder_is_answered_with_what_to_do(finished_run, tmp_path, capsys):
    (tmp_path / "stopped").mkdir()
    (tmp_path / "stopped" / "last.pth").write_bytes((finished_run / "last.pth").read_bytes())
    assert predict.main([str(tmp_path / "stopped" / "best_model.pth"), "image.png"]) == 2
    assert "holds a run's last.pth only: it stopped before saving a model" in capsys.readouterr().err
    assert predict.main([str(finished_run), "image.png"]) == 2
    assert f"(a folder). Give the model in that folder: {finished_run / 'best_model.pth'}." in capsys.readouterr().err
    assert predict.main([str(finished_run / "best_modle.pth"), "image.png"]) == 2  # a typo beside the model
    assert f"Did you mean {finished_run / 'best_model.pth'}?" in capsys.readouterr().err


def test_a_reader_that_stops_early_is_not_an_unreadable_image(model_path, tmp_path):
    for i in range(400):  # more lines than stdout's buffer holds
        Image.new("RGB", (32, 32), (i % 256, 0, 0)).save(tmp_path / f"{i:03d}.png")
    process = subprocess.Popen([sys.executable, str(ROOT / "predict.py"), str(model_path), str(tmp_path)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().startswith(str(tmp_path))  # `| head -1`
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait(timeout=60) == train.EXIT_BROKEN_PIPE == 141
    assert "Traceback" not in stderr and "gave no prediction" not in stderr


def test_a_file_name_in_another_encoding_is_printed_as_its_own_bytes(model_path, tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    os.rename(tmp_path / "x.png", bytes(tmp_path) + b"/caf\xe9.png")  # a latin-1 name
    result = subprocess.run([sys.executable, str(ROOT / "predict.py"), str(model_path), str(tmp_path)],
                            capture_output=True, env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(bytes(tmp_path) + b"/caf\xe9.png: ")


@pytest.mark.parametrize("flag", [["--top-k", "0"], ["--batch-size", "0"]])
def test_bad_flag_is_refused(flag, model_path, capsys):
    # In-process (main returns the exit code): the same path as a subprocess, without a second start of torch.
    assert predict.main([str(model_path), "image.png", *flag]) == 2
    assert capsys.readouterr().err.startswith(f"error: {flag[0]} must be at least 1")


def test_benchmark_reports_images_per_second_at_batch_1_and_256(model_path):
    result = run_predict(model_path, "--benchmark", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "SmallCifarNet" in result.stdout and "torch threads: " in result.stdout
    rates = {int(batch): float(rate.replace(",", "")) for batch, rate in
             re.findall(r"batch size (\d+): ([\d,.]+) images/s", result.stdout)}
    assert set(rates) == {1, 256} and all(rate > 0 for rate in rates.values())


def test_ctrl_c_exits_130_without_a_traceback(model_path):
    # With Ctrl-C's default action restored: a suite started in the background (`bash test.sh &`) inherits SIGINT
    # ignored, and Python then leaves it ignored instead of raising KeyboardInterrupt.
    process = subprocess.Popen([sys.executable, str(ROOT / "predict.py"), str(model_path), "--benchmark"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert process.stdout.readline().startswith("[benchmark]")  # timing has begun
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "interrupted" in stderr and "Traceback" not in stderr

