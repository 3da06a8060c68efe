"""torchrun with the gloo backend on this CPU: two ranks training one model."""
import json
import re

import pytest
import torch

from conftest import load_test_split, run_trainer, start_trainer
from tiny_cifar import write_tiny_cifar
from train import RUN_FILES, evaluate, load_trained_model

# 3 ranks: with 2, every float sum a + b is the same in any order, which would hide a resume that reduces
# gradients in another order; 4 epochs: past STEM_BIAS_EPOCHS, where a parameter stops training; Selective-Backprop:
# each rank ranks its own slice of 66 and backpropagates 33 of it.
DDP_RUN = ["--model", "SmallCifarNet", "--epochs", 4, "--batch-size", 198, "--backprop-fraction", 0.5, "--seed", 4,
           "--tta", 1]


@pytest.fixture(scope="module")
def ddp_data(tmp_path_factory):
    """Smaller than tiny_data: 2 steps of 198 an epoch keep the 3-rank runs short."""
    data_dir = tmp_path_factory.mktemp("ddp_data")
    write_tiny_cifar(data_dir, per_batch=80, test_size=100)
    return data_dir


@pytest.fixture(scope="module")
def ddp_run(ddp_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    result = run_trainer(*DDP_RUN, "--data-dir", ddp_data, "--out-dir", out, ranks=3)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result


def test_three_ranks_train_and_write_outputs_once(ddp_run):
    out, result = ddp_run
    assert sorted(p.name for p in out.iterdir()) == sorted(RUN_FILES)
    assert result.stdout.count("--- [1/10] Starting ---") == 1  # only rank 0 prints
    assert "DistributedDataParallel over 3 ranks" in result.stdout
    history = json.loads((out / "training_history.json").read_text())
    assert history["plan"]["parallel"] == "DistributedDataParallel"
    assert history["plan"]["world_size"] == 3 and history["plan"]["batch_size"] == 198
    assert history["plan"]["backprop_fraction"] == 0.5
    assert [row["batch_size"] for row in history["epochs"]] == [198] * 4
    assert [row["epoch"] for row in history["epochs"]] == [1, 2, 3, 4]


def test_distributed_accuracy_equals_rank0_only_evaluation(ddp_run, ddp_data):
    out, _ = ddp_run
    model, checkpoint = load_trained_model(out / "best_model.pth")
    test_split = load_test_split(ddp_data)
    assert evaluate(model, *test_split, tta=0)[1] == pytest.approx(checkpoint["test_acc"])
    assert evaluate(model, *test_split, tta=1)[1] == pytest.approx(checkpoint["test_acc_tta"])


def running_losses(stdout):
    return [float(x) for x in re.findall(r"Batch \[\d+/\d+\] \| Loss: ([0-9.]+)", stdout)]


def test_two_ranks_with_batch_b_follow_one_process_with_batch_2b(tiny_data, tmp_path):
    common = ["--epochs", 1, "--batch-size", 200, "--log-every", 1, "--data-dir", tiny_data, "--model",
              "SmallCifarNet", "--seed", 4, "--tta", 1]
    single = run_trainer(*common, "--out-dir", tmp_path / "single")
    double = run_trainer(*common, "--out-dir", tmp_path / "ddp", ranks=2)
    assert single.returncode == 0 and double.returncode == 0, single.stderr + double.stderr
    single_losses, ddp_losses = running_losses(single.stdout), running_losses(double.stdout)
    assert len(single_losses) == len(ddp_losses) == 5
    # Same batches, same gradients up to BatchNorm statistics, which are per rank (100 images, not 200):
    # the curves agree to within 2% of the loss.
    for a, b in zip(single_losses, ddp_losses):
        assert b == pytest.approx(a, rel=0.02)


def test_rank_on_a_gpu_of_the_wrong_model_stops_before_the_group_forms():
    from train import GPU, Hardware, UserError, make_plan

    hw = Hardware((GPU(0, "NVIDIA RTX A6000", 48), GPU(1, "NVIDIA GeForce RTX 3090", 24),
                   GPU(2, "NVIDIA GeForce RTX 3090", 24)), cpu_count=16)
    with pytest.raises(UserError, match="CUDA_VISIBLE_DEVICES=1,2 torchrun --standalone --nproc_per_node=2"):
        make_plan(hw, world_size=3, local_rank=0, local_world_size=3)
    plan = make_plan(hw, world_size=2, local_rank=1, local_world_size=2)
    assert plan["device"] == "cuda:1" and plan["parallel"] == "DistributedDataParallel"
    assert plan["batch_size"] == 2000  # the global batch
    with pytest.raises(UserError, match="must divide evenly"):
        make_plan(Hardware((), 2), batch_size=301, world_size=2, local_world_size=2)


def test_sigterm_under_torchrun_saves_and_resume_matches_the_uninterrupted_run(ddp_run, ddp_data, tmp_path):
    process = start_trainer(*DDP_RUN, "--data-dir", ddp_data, "--out-dir", tmp_path, ranks=3)
    for line in process.stdout:
        if "[epoch 1/4]" in line:
            break
    process.terminate()  # torchrun passes SIGTERM on to every rank
    _, stderr = process.communicate(timeout=120)
    assert "Resume with: torchrun --standalone --nproc_per_node=3 train.py --resume" in stderr
    stopped_at = json.loads((tmp_path / "training_history.json").read_text())["epochs"]
    assert 1 <= len(stopped_at) < 4

    result = run_trainer("--resume", "--out-dir", tmp_path, ranks=3)
    assert result.returncode == 0, result.stderr[-3000:]
    history = json.loads((tmp_path / "training_history.json").read_text())
    assert [row["epoch"] for row in history["epochs"]] == [1, 2, 3, 4]
    assert history["events"][0]["resumed"].endswith("last.pth")
    uninterrupted, _ = ddp_run
    expected = torch.load(uninterrupted / "last.pth", weights_only=True)["model"]
    for name, tensor in torch.load(tmp_path / "last.pth", weights_only=True)["model"].items():
        assert torch.equal(tensor, expected[name]), name


def test_resuming_a_torchrun_run_without_torchrun_is_refused(ddp_run):
    out, _ = ddp_run
    before = (out / "last.pth").read_bytes()
    result = run_trainer("--resume", "--out-dir", out)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "is a run of 3 process(es) and this is 1" in result.stderr
    assert (out / "last.pth").read_bytes() == before
