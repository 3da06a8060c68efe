"""Issue 15: the saved model is never chosen on the test set; validation split, early stopping, the report."""
import json
import shutil

import pytest
import torch
from PIL import Image

import train
from datasets import LoadedData
from conftest import TINY, build_tiny_run, history_of, run_cli, run_trainer


def test_the_validation_split_is_stratified_disjoint_and_fixed_by_the_seed():
    labels = torch.arange(3).repeat_interleave(torch.tensor([60, 30, 10]))  # unbalanced classes
    order = train.stratified_order(labels, seed=0)
    assert sorted(order.tolist()) == list(range(100))
    assert torch.bincount(labels[order[:10]], minlength=3).tolist() == [6, 3, 1]  # every prefix in proportion
    assert torch.bincount(labels[order[:50]], minlength=3).tolist() == [30, 15, 5]
    assert torch.equal(order, train.stratified_order(labels, seed=0))
    assert not torch.equal(order, train.stratified_order(labels, seed=1))

    images = torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1).expand(100, 3, 2, 2)
    data = LoadedData(images, labels, images[:5], labels[:5], ["a", "b", "c"], (0.5,) * 3, (0.2,) * 3, {}, "", [])
    split = train.hold_out_validation(data, 0.2, seed=0)
    assert len(split.val_images) == 20 and len(split.train_images) == 80
    assert torch.bincount(split.val_labels, minlength=3).tolist() == [12, 6, 2]
    seen = torch.cat([split.train_images[:, 0, 0, 0], split.val_images[:, 0, 0, 0]]).sort().values
    assert torch.equal(seen, torch.arange(100, dtype=torch.uint8))  # disjoint, nothing lost
    assert torch.equal(train.hold_out_validation(data, 20, seed=0).val_images, split.val_images)  # count = fraction
    assert train.hold_out_validation(data, 0, seed=0) is data
    with pytest.raises(train.UserError, match="must leave some to train on"):
        train.hold_out_validation(data, 100, seed=0)


@pytest.mark.parametrize("val_split", [200, 0])
def test_a_planted_test_set_never_changes_which_epoch_is_saved(val_split, tiny_data, tmp_path, monkeypatch):
    """The test accuracies are replaced by ones that favour another epoch than the validation split does (or, without
    one, than the last): the saved model must not follow them."""
    run, data = build_tiny_run(tiny_data, tmp_path, 200, "--val-split", str(val_split))  # 2 epochs
    real_evaluate, planted, last_val = train.evaluate, [], {}

    def evaluate_with_a_planted_test_set(model, images, labels, *args, **kwargs):
        loss, acc, top5 = real_evaluate(model, images, labels, *args, **kwargs)
        if images is data.val_images:
            last_val["acc"] = acc
        if images is data.test_images:  # best where validation is worst (with ties, the latest epoch)
            acc = 100 - last_val.get("acc", 100) + 1e-3 * len(planted) if val_split else 100.0 - len(planted)
            planted.append(acc)
        return loss, acc, top5

    monkeypatch.setattr(train, "evaluate", evaluate_with_a_planted_test_set)
    assert train.train_loop(run, data)
    rows = history_of(tmp_path)["epochs"]
    test_favourite = 1 + max(range(2), key=lambda i: planted[i])
    if val_split:
        val_accs = [row["val_acc"] for row in rows]
        chosen = 1 + val_accs.index(max(val_accs))  # the first epoch of best validation accuracy
        assert run.best_val_acc == max(val_accs)
    else:
        chosen = 2  # the last
        assert all(row["val_acc"] is None for row in rows)
    assert test_favourite != chosen
    assert run.best_epoch == chosen
    assert torch.load(tmp_path / "best_model.pth", weights_only=True)["epoch"] == chosen


def test_patience_stops_early_says_why_and_stays_stopped_on_resume(tiny_data, tmp_path):
    flags = ["--epochs", 5, "--data-dir", tiny_data, "--out-dir", tmp_path, *TINY, "--tta", 0, "--seed", 0,
             "--val-split", 200, "--patience", 1]
    result = run_trainer(*flags)
    assert result.returncode == 0, result.stderr
    history = history_of(tmp_path)
    rows, event = history["epochs"], history["events"][-1]["stopped_early"]
    # The tiny classes are learnt in an epoch or two: validation accuracy stops rising well before epoch 5.
    assert len(rows) < 5 and event["after_epoch"] == len(rows) == event["best_epoch"] + 1
    assert "1 epochs without a gain in validation accuracy (--patience 1)" in event["why"]
    assert f"[stop] early stop after epoch {len(rows)}" in result.stdout
    assert "[plan] saved model: the epoch of best validation accuracy (200 training images held out, stratified " \
           "by class; stop after 1 epochs without a gain)" in result.stdout
    assert history["final"]["best_epoch"] == event["best_epoch"]

    resumed = run_trainer("--resume", "--out-dir", tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert len(history_of(tmp_path)["epochs"]) == len(rows)  # no epoch trained after the stop
    assert sum("stopped_early" in e for e in history_of(tmp_path)["events"]) == 1


@pytest.mark.parametrize("args, message", [
    (["--val-split", "1.5"], "is neither a count of images"),
    (["--val-split", "-3"], "is neither a count of images"),
    (["--val-split", "ten"], "is neither a count of images"),
    (["--patience", "3"], "there is no validation split"),
    (["--patience", "0", "--val-split", "10"], "--patience must be at least 1"),
])
def test_bad_selection_flags(args, message):
    result = run_cli(*args, "--dry-run")
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_every_run_writes_its_report(finished_run):
    """The default run (no validation split) reports the saved model on the test set."""
    report = json.loads((finished_run / "report.json").read_text())
    checkpoint = torch.load(finished_run / "best_model.pth", weights_only=True)
    assert set(report) == {"model", "test"}  # no validation split, no validation report
    assert report["model"]["epoch"] == checkpoint["epoch"] == 1
    assert report["model"]["selection"].startswith("the last epoch (no validation split")
    test = report["test"]
    assert test["accuracy"] == pytest.approx(checkpoint["test_acc_tta"])  # the run's TTA level: 0, as the epoch's
    assert test["images"] == 200 and sum(map(sum, test["confusion"])) == 200
    assert [c["class"] for c in test["per_class"]] == checkpoint["class_names"]
    for name in ("confusion_matrix.png", "misclassified.png"):
        with Image.open(finished_run / name) as image:
            assert image.format == "PNG" and image.width > 300


def test_evaluate_remakes_the_report_of_a_saved_model(finished_run, tiny_data, tmp_path):
    result = run_cli("--evaluate", finished_run / "best_model.pth", "--out-dir", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "with test-time augmentation level 0 ---" in result.stdout  # the run's own level (--tta 0), not 2
    assert "[report] test: 200 images" in result.stdout
    remade = json.loads((tmp_path / "report.json").read_text())
    original = json.loads((finished_run / "report.json").read_text())
    assert remade["test"]["confusion"] == original["test"]["confusion"]
    assert not (tmp_path / "last.pth").exists()  # nothing trained

    result = run_cli("--evaluate", finished_run / "last.pth")
    assert result.returncode == 2 and "is a run's training state (last.pth), for --resume" in result.stderr


def test_evaluate_refuses_what_it_cannot_honour_and_leaves_no_folder(finished_run, tmp_path):
    model = finished_run / "best_model.pth"
    result = run_cli("--evaluate", model, "--image-size", 40, "--epochs", 3, "--seed", 0, "--num-workers", 2)
    assert result.returncode == 2 and "--epochs, --seed, --image-size would change nothing" in result.stderr
    assert "Only --data-dir, --out-dir, --tta, --device apply" in result.stderr
    shutil.copytree(finished_run, tmp_path / "another")
    result = run_cli("--evaluate", model, "--out-dir", tmp_path / "another")
    assert result.returncode == 2 and "holds another run" in result.stderr
    (tmp_path / "a_file").write_text("keep me")
    result = run_cli("--evaluate", model, "--out-dir", tmp_path / "a_file")
    assert result.returncode == 2 and "a_file is a file, not a folder" in result.stderr
    result = run_cli("--evaluate", model, "--out-dir", tmp_path / "new", "--data-dir", tmp_path / "a_file" / "data")
    assert result.returncode == 2 and "cannot be made to download it into (Not a directory)" in result.stderr
    assert not (tmp_path / "new").exists()  # made for the report, removed when none was written
    result = run_cli("--evaluate", model, "--out-dir", "")
    assert result.returncode == 2 and "an empty path (an unset shell variable?)" in result.stderr
