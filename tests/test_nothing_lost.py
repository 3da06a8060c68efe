"""Nothing lost: runs never overwrite each other, a diverged model is never kept as the best, failed writes
and damaged, foreign or mismatched checkpoints get one clear paragraph, and the run folder is locked."""
import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

import train
from conftest import TINY, build_tiny_run, run_cli, run_trainer, start_trainer, wait_for_line
from test_bad_input import assert_refused
from tiny_cifar import write_tiny_cifar

QUICK = ["--tta", "0", "--seed", "0"]  # after TINY: no test-time augmentation, one seed


def snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def assert_all_finite(path):
    state = torch.load(path, weights_only=True)
    tensors = state.get("state_dict") or state["model"]
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point()), path


# 1. A second run never overwrites the first.

def test_runs_without_out_dir_each_get_a_new_numbered_folder(tiny_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs/ is made where the trainer is started; in this process: no imports to wait for
    first = run_cli("--epochs", 1, "--data-dir", tiny_data, *TINY, *QUICK)
    assert first.returncode == 0, first.stderr
    first_files = snapshot(tmp_path / "runs" / "cifar10-001")
    second = run_cli("--epochs", 1, "--data-dir", tiny_data, *TINY, *QUICK)
    assert second.returncode == 0, second.stderr
    assert "[run] outputs go to runs/cifar10-002" in second.stdout  # said at the start ...
    assert "to runs/cifar10-002 ---" in second.stdout  # ... and at the end
    assert sorted(os.listdir(tmp_path / "runs")) == ["cifar10-001", "cifar10-002"]
    assert snapshot(tmp_path / "runs" / "cifar10-001") == first_files
    assert sorted(first_files) == sorted(train.RUN_FILES)  # the lock file went with the trainer


def test_an_out_dir_holding_a_run_needs_resume_or_overwrite(finished_run, tiny_data, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = snapshot(out)
    other_model = ["--model", "PowerCifarNet", "--width-mult", "0.25", "--batch-size", 100, *QUICK]
    result = run_cli("--epochs", 1, *other_model, "--data-dir", tiny_data, "--out-dir", out)
    assert_refused(result, "already holds a run")
    assert "--resume --out-dir" in result.stderr and "--overwrite" in result.stderr
    assert snapshot(out) == before
    (out / "last.pth").rename(tmp_path / "last.pth")  # as after a full disk at the first epoch's last.pth
    result = run_cli("--epochs", 1, *other_model, "--data-dir", tiny_data, "--out-dir", out)
    assert_refused(result, "It has no last.pth to continue from: replace it with --overwrite")
    assert "--resume" not in result.stderr
    (tmp_path / "last.pth").rename(out / "last.pth")

    result = run_trainer("--epochs", 1, *other_model, "--data-dir", tiny_data, "--out-dir", out, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(out)) == sorted(train.RUN_FILES)
    assert torch.load(out / "best_model.pth", weights_only=True)["model_name"] == "PowerCifarNet"
    assert torch.load(out / "last.pth", weights_only=True)["plan"]["model"] == "PowerCifarNet"


def test_a_failed_start_leaves_no_empty_folder(tmp_path, monkeypatch):
    result = run_trainer("--data-dir", tmp_path / "nothing_here", "--out-dir", tmp_path / "new", cwd=tmp_path,
                         env={"CIFAR10_URL": (tmp_path / "offline.tar.gz").as_uri()})
    assert_refused(result, "downloading it from")
    assert not (tmp_path / "new").exists()
    monkeypatch.chdir(tmp_path)
    result = run_cli("--seed", 2**64)
    assert_refused(result, "--seed must be between 0 and")
    assert not (tmp_path / "runs").exists()


def test_an_out_dir_name_too_long_is_refused(tmp_path):
    with pytest.raises(train.UserError, match=r"\(File name too long\)"):
        train.claim_out_dir(tmp_path / ("x" * 300), resuming=False, overwrite=False, run_prefix="cifar10-")
    assert os.listdir(tmp_path) == []


# 2. A non-finite model is never saved as the best nor reported as success.

def test_weight_decay_that_diverges_saves_no_model_and_is_named(tiny_data, tmp_path):
    # NaN from step 3 of a 5-step epoch: fewer steps than the in-epoch streak check waits for.
    result = run_trainer("--epochs", 1, "--batch-size", 200, "--weight-decay", "1e30", "--model",
                         "SmallCifarNet", "--tta", "0", "--data-dir", tiny_data, "--out-dir", tmp_path)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "Done:" not in result.stdout
    assert "training diverged" in result.stderr
    assert "--weight-decay 1e+30 (the recipe's: 2e-06)" in result.stderr
    assert "--lr" not in result.stderr  # the learning rate was not changed, so it is not blamed
    assert not (tmp_path / "best_model.pth").exists()


def test_divergence_in_an_epochs_last_steps_keeps_the_earlier_best(tiny_data, tmp_path):
    run, data = build_tiny_run(tiny_data, tmp_path, batch_size=200)  # 2 epochs of 5 steps
    forward, calls = run.model.forward, {"n": 0}

    def forward_that_breaks_at_step_9(x):
        if run.model.training:
            calls["n"] += 1
            if calls["n"] == 9:  # the last two steps of epoch 2 turn every weight NaN
                with torch.no_grad():
                    run.model.head.weight.fill_(float("nan"))
        return forward(x)

    run.model.forward = forward_that_breaks_at_step_9
    with pytest.raises(train.TrainingFailed, match="Epoch 2 ended with NaN or infinite weights") as info:
        train.train_loop(run, data)
    assert "best_model.pth (epoch 1)" in str(info.value)
    assert "try a lower learning rate" in str(info.value)  # the recipe's settings: no flag to blame
    assert torch.load(tmp_path / "best_model.pth", weights_only=True)["epoch"] == 1
    assert_all_finite(tmp_path / "best_model.pth")
    assert torch.load(tmp_path / "last.pth", weights_only=True)["epoch"] == 1
    assert_all_finite(tmp_path / "last.pth")


# 3. A write that fails (full disk, file size limit) is one paragraph; the old file stays; no temporary remains.

@contextlib.contextmanager
def file_size_limit(limit):
    """Files this process writes may not grow past `limit` bytes: the kernel fails the write (EFBIG)."""
    old_limit, old_handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


def test_a_checkpoint_write_that_fails_keeps_the_previous_file(tmp_path):
    target = tmp_path / "last.pth"
    target.write_bytes(b"previous checkpoint")
    with file_size_limit(1_000_000), pytest.raises(train.UserError) as info:
        train.save_checkpoint({"weights": torch.zeros(1_000_000)}, target)
    assert f"Could not write {target}: the disk is full or the file is larger than allowed" in str(info.value)
    assert target.read_bytes() == b"previous checkpoint"
    assert os.listdir(tmp_path) == ["last.pth"]


def test_temporary_files_are_unique_to_the_process(tmp_path, monkeypatch):
    renamed = []
    monkeypatch.setattr(train.os, "replace", lambda src, dst: renamed.append(src.name) or os.rename(src, dst))
    train.save_json({"a": 1}, tmp_path / "training_history.json")
    assert renamed == [f".training_history.json.{os.getpid()}.tmp"]


def test_a_killed_trainers_temporary_files_go_when_its_folder_is_claimed_again(tmp_path):
    """SIGKILL mid-save leaves atomic_write's temporary file, which no handler can remove; the next trainer to lock
    the folder does, in the fold folders too, and leaves anything else alone."""
    (tmp_path / "fold-1").mkdir()
    stale = [tmp_path / ".last.pth.4242.tmp", tmp_path / "fold-1" / ".best_model.pth.4243.tmp"]
    others = [tmp_path / ".notes.txt.4242.tmp", tmp_path / "fold-1" / "best_model.pth"]
    for path in stale + others:
        path.write_bytes(b"half")
    out_dir, lock, created = train.claim_out_dir(tmp_path, resuming=True, overwrite=False, run_prefix="cifar10")
    train.release_out_dir(out_dir, lock, created)
    assert not any(path.exists() for path in stale)
    assert all(path.read_bytes() == b"half" for path in others)


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MB tmpfs, where a run really meets 'No space left on device'."""
    mount_point = tmp_path / "small_disk"
    mount_point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount_point)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs is not permitted here; test_a_checkpoint_write_that_fails_keeps_the_previous_"
                    "file covers the same write path under a file size limit")
    yield mount_point
    subprocess.run(["umount", str(mount_point)])


def test_disk_filling_up_mid_run_exits_2_keeping_what_was_written(tiny_data, small_disk):
    out = small_disk / "run"
    process = start_trainer("--epochs", 2, "--data-dir", tiny_data, "--out-dir", out,
                            *TINY, *QUICK)
    wait_for_line(process, "--- [6/10]")
    # Another program fills the disk: room is left for best_model.pth (~2 MB) but not for last.pth (~6 MB).
    with open(small_disk / "ballast", "wb") as ballast:
        os.posix_fallocate(ballast.fileno(), 0, os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
                           - 4 * 2**20)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2, stderr
    assert "Traceback" not in stderr
    assert "Could not write" in stderr and "the disk is full" in stderr
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    torch.load(out / "best_model.pth", weights_only=True)


# 4. Two trainers on one folder: the second stops at once, naming the first.

def test_a_second_trainer_on_a_busy_folder_stops_naming_the_first(tiny_data, tmp_path):
    first = start_trainer("--epochs", 2, "--data-dir", tiny_data, "--out-dir", tmp_path,
                          *TINY, *QUICK)
    wait_for_line(first, "--- [6/10]")
    second = run_cli("--epochs", 2, "--data-dir", tiny_data, "--out-dir", tmp_path, *TINY, *QUICK, "--overwrite")
    assert_refused(second, f"Another trainer (PID {first.pid}) is using {tmp_path}")
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    assert sorted(os.listdir(tmp_path)) == sorted(train.RUN_FILES)
    assert torch.load(tmp_path / "last.pth", weights_only=True)["epoch"] == 2


# 5. and 6. Resume checks the checkpoint: its data, its integrity, its format.

def test_resume_on_other_data_is_refused(finished_run, tmp_path):
    run = tmp_path / "run"  # a run stopped in its final evaluation: --resume would finish it
    shutil.copytree(finished_run, run)
    history = json.loads((run / "training_history.json").read_text())
    del history["final"]
    (run / "training_history.json").write_text(json.dumps(history))
    before = snapshot(run)
    larger = write_tiny_cifar(tmp_path / "larger", per_batch=400).parent
    result = run_cli("--resume", "--out-dir", run, "--data-dir", larger)
    assert_refused(result, "was trained on other data (1000 training and 200 test images")
    assert "(2000 and 200" in result.stderr
    same_size = write_tiny_cifar(tmp_path / "same_size", seed=1).parent  # same counts, other pixels
    assert_refused(run_cli("--resume", "--out-dir", run, "--data-dir", same_size), "was trained on other data")
    assert snapshot(run) == before


def flip_a_byte_of_the_weights(path):
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        member = max(archive.infolist(), key=lambda info: info.file_size)  # the largest tensor's bytes
    name_length, extra_length = int.from_bytes(data[member.header_offset + 26:member.header_offset + 28], "little"), \
        int.from_bytes(data[member.header_offset + 28:member.header_offset + 30], "little")
    data[member.header_offset + 30 + name_length + extra_length + member.file_size // 2] ^= 0x40
    path.write_bytes(data)


def test_resuming_a_finished_run_says_so_and_changes_nothing(finished_run, tmp_path):
    shutil.copytree(finished_run, tmp_path / "run")
    before = snapshot(tmp_path / "run")
    result = run_cli("--resume", tmp_path / "run" / "last.pth")
    assert result.returncode == 0, result.stderr
    assert "holds a finished run (its training_history.json has the final results): nothing to continue" \
        in result.stdout and "Epoch [" not in result.stdout and "--- [7/10]" not in result.stdout
    assert "[resume] continuing" not in result.stdout
    assert snapshot(tmp_path / "run") == before  # not evaluated, saved or timed again

def test_resume_of_a_damaged_checkpoint_is_refused(finished_run, tmp_path):
    damaged = tmp_path / "last.pth"
    damaged.write_bytes((finished_run / "last.pth").read_bytes())
    flip_a_byte_of_the_weights(damaged)
    torch.load(damaged, weights_only=True)  # torch itself does not notice
    assert_refused(run_cli("--resume", damaged), "is damaged")


def test_resume_of_a_checkpoint_of_an_earlier_version_is_refused(finished_run, tmp_path):
    state = torch.load(finished_run / "last.pth", weights_only=True)
    del state["format"]  # what the trainer wrote before checkpoints carried a format version
    torch.save(state, tmp_path / "last.pth")
    assert_refused(run_cli("--resume", tmp_path / "last.pth"),
                   "was written by an earlier version of this trainer (checkpoint format 1")


# 8. and 9. Stops, environment and torchrun failures: one paragraph, the right exit code.

def test_sigterm_during_the_final_evaluation_stops_at_once_with_143(tmp_path):
    data = write_tiny_cifar(tmp_path / "data", per_batch=100, test_size=3000).parent  # a slow final evaluation
    process = start_trainer("--epochs", 1, "--model", "SmallCifarNet", "--batch-size", 100, "--tta", 2,
                            "--data-dir", data, "--out-dir", tmp_path / "run")
    wait_for_line(process, "--- [7/10]")
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr
    assert "Traceback" not in stderr and "finishing this step" not in stderr
    assert "SIGTERM during the final evaluation: training is complete and saved" in stderr
    assert "[eval]" not in stdout
    assert_all_finite(tmp_path / "run" / "best_model.pth")


def test_sigterm_before_training_stops_with_143_and_leaves_no_folder(tiny_data, tmp_path):
    """While a --budget run probes (or the data loads), before any handler of the training loop is installed."""
    process = start_trainer("--budget", "10m", "--data-dir", tiny_data, "--out-dir", tmp_path / "run", *TINY, *QUICK)
    wait_for_line(process, "[run] outputs go to")
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr
    assert "[stop] SIGTERM before any training; nothing was written" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "run").exists()  # the folder it made is gone, its lock with it


def test_a_stop_while_the_last_epoch_saves_leaves_the_final_evaluation_to_resume(tiny_data, tmp_path, monkeypatch):
    run, data = build_tiny_run(tiny_data, tmp_path, 100)
    save_outputs = train.save_outputs

    def save_as_ctrl_c_arrives(run, **kwargs):
        save_outputs(run, **kwargs)
        if len(run.history["epochs"]) == run.epochs_planned:
            run.stop.signal = signal.SIGINT

    monkeypatch.setattr(train, "save_outputs", save_as_ctrl_c_arrives)
    assert train.train_loop(run, data) is False  # stopped, not completed: no minutes of TTA after a Ctrl-C
    assert torch.load(tmp_path / "last.pth", weights_only=True)["epoch"] == run.epochs_planned
    monkeypatch.undo()
    resumed = run_cli("--resume", tmp_path / "last.pth")
    assert resumed.returncode == 0, resumed.stderr
    assert "--- [10/10] Done" in resumed.stdout and "Epoch [" not in resumed.stdout  # only the final evaluation


def test_a_reader_that_stops_early_ends_the_trainer_with_141_not_a_traceback():
    process = start_trainer("--dry-run", "--simulate-gpus", "NVIDIA H100:80,NVIDIA H100:80")
    process.stdout.readline()  # `| head -1`
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait(timeout=60) == train.EXIT_BROKEN_PIPE == 141
    assert "Traceback" not in stderr and "the output's reader stopped reading" in stderr

def test_printed_resume_commands_can_be_pasted_into_a_shell():
    assert train.resume_command(train.Dist(), Path("runs/my run")) == "python train.py --resume 'runs/my run/last.pth'"
    assert train.resume_command(train.Dist(), Path("cv 1"), cross_validation=True) == \
        "python train.py --resume --out-dir 'cv 1'"


def test_omp_num_threads_is_respected_and_named_in_the_plan(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    plan = train.make_plan(train.Hardware((), 2), threads=train.threads_from_environment())
    assert (plan["threads"], plan["reasons"]["threads"]) == (1, "set by OMP_NUM_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "lots")
    with pytest.raises(train.UserError, match="OMP_NUM_THREADS is 'lots'; it must be a whole number"):
        train.threads_from_environment()


def test_under_torchrun_the_trainers_message_comes_last(tiny_data, finished_run):
    result = run_trainer("--epochs", 1, "--data-dir", tiny_data, "--out-dir", finished_run, *TINY, *QUICK, ranks=2)
    assert result.returncode != 0
    assert "already holds a run" in result.stderr
    # torchrun prints its own traceback and failure summary; the summary ends with the trainer's paragraph.
    summary = result.stderr[result.stderr.rindex("Root Cause"):]
    assert "error: --out-dir" in summary and "already holds a run" in summary
    assert "exitcode  : 2" in summary
