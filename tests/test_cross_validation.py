"""Issue 15: --folds K, K-fold cross-validation: stratified folds, one model each, a table, resumable."""
import json
import shutil
import signal

import pytest
import torch

import report
import train
from datasets import LoadedData
from conftest import TINY, run_cli, run_trainer, start_trainer, wait_for_line


def test_the_folds_are_stratified_disjoint_and_cover_train():
    labels = torch.arange(3).repeat_interleave(torch.tensor([60, 30, 10]))  # unbalanced classes
    images = torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1).expand(100, 3, 2, 2)
    data = LoadedData(images, labels, images[:5], labels[:5], ["a", "b", "c"], (0.5,) * 3, (0.2,) * 3, {}, "", [])
    folds = [train.hold_out_validation(data, {"fold": k, "folds": 4}, seed=0) for k in range(1, 5)]
    held_out = torch.cat([fold.val_images[:, 0, 0, 0] for fold in folds]).sort().values
    assert torch.equal(held_out, torch.arange(100, dtype=torch.uint8))  # every image in exactly one fold
    for fold in folds:
        assert len(fold.val_images) == 25 and len(fold.train_images) == 75
        counts = torch.bincount(fold.val_labels, minlength=3).tolist()
        assert counts[0] == 15 and counts[1] in (7, 8) and counts[2] in (2, 3)  # each class in proportion
    # Fold 1 is the first stretch of the same stratified order that --val-split takes.
    assert torch.equal(folds[0].val_images, train.hold_out_validation(data, 25, seed=0).val_images)


def test_the_summary_is_the_mean_and_sample_std_of_the_folds():
    results = [{"fold": k, "epoch": 2, "val_acc": acc, "val_macro_f1": acc / 100, "val_kappa": 0.5, "test_acc": 90.0}
               for k, acc in enumerate([80.0, 82.0, 84.0], start=1)]
    summary = report.cross_validation_summary(results)
    assert summary["val_acc"] == {"mean": 82.0, "std": 2.0}  # sample std: sqrt((4 + 0 + 4) / 2)
    assert summary["test_acc"] == {"mean": 90.0, "std": 0.0}
    table = report.cross_validation_table(results, summary).splitlines()
    assert table[2] == "| 1 | 2 | 80.00 | 0.8000 | 0.5000 | 90.00 |"
    assert table[-1] == "| mean ± std | | 82.00 ± 2.00 | 0.8200 ± 0.0200 | 0.5000 ± 0.0000 | 90.00 ± 0.00 |"


@pytest.mark.parametrize("args, message", [
    (["--folds", "1"], "--folds must be at least 2"),
    (["--folds", "3", "--val-split", "10"], "--val-split cannot be given with it"),
])
def test_bad_folds_flags(args, message):
    result = run_cli(*args, "--dry-run")
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_too_many_folds_or_a_batch_beyond_a_folds_images_is_refused_before_anything_is_written(tiny_data, tmp_path):
    result = run_cli("--folds", 1001, "--epochs", 1, "--data-dir", tiny_data, "--out-dir", tmp_path / "cv", *TINY)
    assert result.returncode == 2 and "1,000 training images cannot make 1001 folds" in result.stderr, result.stderr
    assert not (tmp_path / "cv").exists()
    result = run_cli("--folds", 2, "--epochs", 1, "--data-dir", tiny_data, "--out-dir", tmp_path / "cv",
                     "--model", "SmallCifarNet", "--batch-size", 600)  # a fold trains on 500 images
    assert result.returncode == 2 and "The batch size, 600, is larger than the 500 training images" in result.stderr
    assert not (tmp_path / "cv").exists()  # no cross_validation.json that --resume could only fail on


def test_a_cross_validation_interrupted_in_a_fold_resumes_there_and_writes_its_table(tiny_data, tmp_path):
    flags = ["--folds", 3, "--epochs", 1, "--data-dir", tiny_data, "--out-dir", tmp_path, *TINY, "--tta", 0,
             "--seed", 0, "--log-every", 1]
    process = start_trainer(*flags)
    wait_for_line(process, "=== fold 2 of 3")
    wait_for_line(process, "| Batch [1/6]")  # fold 2 has just begun its epoch of 6 steps: the stop comes inside it
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    assert f"Resume with: python train.py --resume --out-dir {tmp_path}" in stderr
    state = json.loads((tmp_path / "cross_validation.json").read_text())
    assert state["results"][0]["fold"] == 1 and state["results"][1:] == [None, None]
    assert (tmp_path / "fold-2" / "last.pth").exists() and not (tmp_path / "fold-3").exists()
    fold_1_model = (tmp_path / "fold-1" / "best_model.pth").read_bytes()

    refused = run_cli("--resume", "--out-dir", tmp_path, "--folds", 4)
    assert refused.returncode == 2 and "is a run with --folds 3, but --folds 4 was given" in refused.stderr
    alone = tmp_path.parent / f"{tmp_path.name}-alone"  # a fold's folder without its cross-validation
    shutil.copytree(tmp_path / "fold-2", alone / "fold-2")
    refused = run_cli("--resume", alone / "fold-2" / "last.pth")
    assert refused.returncode == 2 and "A fold continues only within its cross-validation" in refused.stderr

    result = run_trainer("--resume", "--out-dir", tmp_path / "fold-2")  # a fold's folder: its cross-validation
    assert result.returncode == 0, result.stderr
    assert f"[run] outputs go to {tmp_path}\n" in result.stdout
    assert "[cv] fold 1/3: done before" in result.stdout
    assert f"[resume] continuing {tmp_path / 'fold-2' / 'last.pth'} from epoch 1, batch " in result.stdout
    assert (tmp_path / "fold-1" / "best_model.pth").read_bytes() == fold_1_model  # not trained again

    state = json.loads((tmp_path / "cross_validation.json").read_text())
    results = state["results"]
    assert [r["fold"] for r in results] == [1, 2, 3]
    assert sum(r["val_images"] for r in results) == 1000  # the folds cover the 1,000 training images
    for k, r in enumerate(results, start=1):
        fold_report = json.loads((tmp_path / f"fold-{k}" / "report.json").read_text())
        assert r["val_acc"] == fold_report["validation"]["accuracy"]
        assert r["test_acc"] == fold_report["test"]["accuracy"]
        assert torch.load(tmp_path / f"fold-{k}" / "best_model.pth", weights_only=True)["val_split"] == \
            {"fold": k, "folds": 3}
    assert state["summary"]["val_acc"]["mean"] == pytest.approx(sum(r["val_acc"] for r in results) / 3)
    table = report.cross_validation_table(results, state["summary"])
    assert table in result.stdout and table in (tmp_path / "cross_validation.md").read_text()
