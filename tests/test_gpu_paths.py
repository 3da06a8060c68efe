"""The GPU code paths' faults that can be shown without a GPU, each reproduced on the CPU.

What cannot be shown here (CUDA kernels, NCCL, real DataParallel replicas, the CUDA caching allocator and
so the per-epoch reset of peak GPU memory and its report for every GPU of a DataParallel group) is tested by
tests/test_gpu.py wherever CUDA exists. Not tested at all: that the epoch timer starts after the out-of-memory
safety copy (an ordering in train_loop), and starting on Windows (no fcntl or resource module there; both
imports are guarded).
"""
import dataclasses
import json
import signal
import threading
import weakref

import pytest
import torch

import train
from conftest import build_tiny_run, run_trainer, start_trainer, wait_for_line
from models import SmallCifarNet


def dtype_inside_a_replica_thread(module, net, autocast_dtype):
    """What nn.DataParallel does per replica (torch/nn/parallel/parallel_apply.py, _worker): a new thread
    re-enters autocast with the parent's on/off flag only. Returns the dtype net's first conv computed in."""
    seen = []
    hook = net.layers[0].conv1.register_forward_hook(lambda m, i, out: seen.append(out.dtype))

    def replica(enabled):
        with torch.autocast("cpu", enabled=enabled):  # no dtype given
            module(torch.randn(2, 3, 32, 32))

    with torch.autocast("cpu", dtype=autocast_dtype):  # the trainer's step, in the main thread
        thread = threading.Thread(target=replica, args=(torch.is_autocast_enabled("cpu"),))
        thread.start()
        thread.join()
    hook.remove()
    return seen[0]


def test_dataparallel_replicas_keep_the_planned_autocast_dtype():
    net = SmallCifarNet()
    # The fault: a bare network in a replica thread computes in the device's default autocast dtype (the CPU's
    # is bf16, CUDA's fp16), not in the one the step asked for.
    assert dtype_inside_a_replica_thread(net, net, torch.float16) == torch.bfloat16
    # The fix: autocast entered inside the replicated module.
    for dtype in (torch.float16, torch.bfloat16):
        assert dtype_inside_a_replica_thread(train.AutocastForward(net, dtype), net, dtype) == dtype


class CountHostSyncs:
    """Counts, while active, what makes a GPU step wait: tensors built from host values on the training
    device (torch.tensor(..., device=...)) and reads of device values (.item(), .tolist())."""

    def __init__(self, monkeypatch):
        self.constructions, self.reads = 0, 0
        tensor, item, tolist = torch.tensor, torch.Tensor.item, torch.Tensor.tolist

        def counting_tensor(*args, **kwargs):
            self.constructions += kwargs.get("device") is not None
            return tensor(*args, **kwargs)

        def counting(read):
            def wrapper(t):
                self.reads += 1
                return read(t)
            return wrapper

        monkeypatch.setattr(torch, "tensor", counting_tensor)
        monkeypatch.setattr(torch.Tensor, "item", counting(item))
        monkeypatch.setattr(torch.Tensor, "tolist", counting(tolist))


@pytest.fixture
def one_rank_group():
    """A real gloo process group of one process, so the loop runs its torchrun branch in this process."""
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("torchrun", [False, True])
def test_no_host_sync_per_training_step(tiny_data, tmp_path, monkeypatch, torchrun, request):
    run, data = build_tiny_run(tiny_data, tmp_path, 50, "--log-every", "20")
    if torchrun:
        request.getfixturevalue("one_rank_group")
        run.dist = train.Dist(rank=0, world_size=2)  # takes the torchrun branches; the group itself has one rank
    counter = CountHostSyncs(monkeypatch)
    assert train.train_one_epoch(run, epoch=0)  # 20 steps, one log point (its last)
    # Only the log point reads the device (the loss streak, the running sums, under torchrun the stop vote).
    assert counter.constructions <= 1 and counter.reads <= 3, (counter.constructions, counter.reads)


def test_newton_schulz_runs_in_bf16_only_where_the_gpu_computes_it(monkeypatch):
    # No CUDA here: the capability query is answered as a V100 (7.0) and an A100 (8.0) would answer it.
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (7, 0))
    assert train.newton_schulz_dtype(gpu) == torch.float32
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (8, 0))
    assert train.newton_schulz_dtype(gpu) == torch.bfloat16
    assert train.newton_schulz_dtype(torch.device("cpu")) == torch.float32


def test_optimizer_allocates_momentum_buffers_once(monkeypatch):
    net = SmallCifarNet()
    optimizer = train.make_optimizer(net, {"recipe": "muon", "weight_decay": 0.0})
    allocations, zeros_like = [], torch.zeros_like
    monkeypatch.setattr(torch, "zeros_like", lambda t: allocations.append(t.shape) or zeros_like(t))
    for _ in range(3):
        net(torch.randn(4, 3, 32, 32)).sum().backward()
        optimizer.step()
    trained = [p for p in net.parameters() if p.requires_grad]
    assert len(allocations) == len(trained)  # the first step's, none after


def test_out_of_memory_back_off_runs_after_the_failed_steps_tensors_are_freed(tiny_data, tmp_path, monkeypatch):
    run, data = build_tiny_run(tiny_data, tmp_path, 200)
    forward, failed_step_tensors = run.model.forward, []

    def forward_running_out(x):
        if run.model.training and not failed_step_tensors:
            activation = forward(x)  # what the failed step had built when memory ran out
            failed_step_tensors.append(weakref.ref(activation))
            raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")
        return forward(x)

    monkeypatch.setattr(run.model, "forward", forward_running_out)
    back_off, alive_at_back_off = train.back_off_batch_size, []

    def back_off_spy(*a):
        alive_at_back_off.append(failed_step_tensors[0]() is not None)
        return back_off(*a)

    monkeypatch.setattr(train, "back_off_batch_size", back_off_spy)
    assert train.train_loop(run, data)
    # On a GPU, empty_cache() can only return memory that nothing references any more.
    assert alive_at_back_off == [False]


def test_out_of_memory_inside_the_fp16_scaler_step_retries_with_a_fresh_scaler(tiny_data, tmp_path, monkeypatch):
    run, data = build_tiny_run(tiny_data, tmp_path, 200)
    # The gradient scaler of the fp16 plan, here around fp32 arithmetic (emulated fp16 is slow on a CPU); the
    # scaler's stages are the same.
    run.scaler = torch.amp.GradScaler("cpu")
    step, calls = run.optimizer.step, {"n": 0}

    def step_running_out(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # the scaler has unscaled the gradients when the optimiser runs out of memory
            raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")
        return step(*a, **k)

    monkeypatch.setattr(run.optimizer, "step", step_running_out)
    assert train.train_loop(run, data)
    assert run.history["events"] == [{"out_of_memory": {"epoch": 1, "batch_size": 100}}]
    # With the old scaler the retried epoch's first step applied still-scaled gradients (x65536) to the
    # biases and head, and training fell apart.
    assert run.history["epochs"][-1]["test_acc"] > 50
    assert all(torch.isfinite(p).all() for p in run.model.parameters())


def test_evaluation_out_of_memory_retries_with_smaller_batches(tiny_data, tmp_path, monkeypatch, capsys):
    run, data = build_tiny_run(tiny_data, tmp_path, 200)
    test_split = data.test_images, data.test_labels, run.normalization
    expected = train.evaluate(run.model, *test_split, tta=2)
    forward = run.model.forward
    monkeypatch.setattr(run.model, "forward", lambda x: (_ for _ in ()).throw(torch.OutOfMemoryError("injected"))
                        if len(x) > 50 else forward(x))
    assert train.evaluate(run.model, *test_split, tta=2) == pytest.approx(expected)
    assert "retrying with batch size 50" in capsys.readouterr().err


# Resume on other hardware: checkpoints of GPU runs, made by editing a CPU run's last.pth the way a GPU run
# writes it (its plan's devices, and a CUDA generator's 16-byte state for the data order).

A100 = train.GPU(0, "NVIDIA A100-SXM4-80GB", 80)


def test_each_torchrun_rank_resumes_on_its_own_gpu():
    hw = train.Hardware((A100, dataclasses.replace(A100, index=1)), cpu_count=16)
    saved = train.make_plan(hw, world_size=2, local_rank=0, local_world_size=2)  # rank 0's, as last.pth holds
    for rank in (0, 1):
        plan, changes = train.place_resumed_plan(saved, hw, world_size=2, local_rank=rank, local_world_size=2)
        assert (plan["device"], plan["device_ids"], plan["parallel"], changes) == (f"cuda:{rank}", [rank],
                                                                                   "DistributedDataParallel", [])


def test_a_resumed_plan_follows_the_gpus_there_are():
    four = train.Hardware(tuple(dataclasses.replace(A100, index=i) for i in range(4)), cpu_count=16)
    saved = train.make_plan(four)
    assert saved["parallel"] == "DataParallel" and saved["device_ids"] == [0, 1, 2, 3]
    two = train.Hardware(four.gpus[:2], cpu_count=16)
    plan, changes = train.place_resumed_plan(saved, two)
    assert (plan["device_ids"], plan["parallel"]) == ([0, 1], "DataParallel")
    assert changes == ["it trained on 4 x NVIDIA A100-SXM4-80GB and continues on 2 x NVIDIA A100-SXM4-80GB"]
    plan, changes = train.place_resumed_plan(saved, train.Hardware((), cpu_count=2))
    assert (plan["device"], plan["parallel"], plan["precision"]) == ("cpu", "none", "bf16")
    assert "continues on the CPU" in changes[0]
    fp16 = train.make_plan(four, precision="fp16")
    with pytest.raises(train.UserError, match="this run trains in fp16, which the CPU here cannot run"):
        train.place_resumed_plan(fp16, train.Hardware((), cpu_count=2))


def as_if_trained_on_a_gpu(path, precision):
    state = torch.load(path, weights_only=True)
    state["plan"].update(device="cuda:0", device_ids=[0], gpu_name=A100.name, precision=precision)
    state["data_rng"] = torch.zeros(16, dtype=torch.uint8)  # a CUDA generator's state: seed and offset
    state["rng"]["cuda"] = [torch.zeros(16, dtype=torch.uint8)]
    torch.save(state, path)


@pytest.fixture(scope="module")
def stopped_cpu_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("stopped")
    process = start_trainer("--epochs", 3, "--seed", 1, "--batch-size", 100, "--model", "SmallCifarNet",
                            "--tta", 0, "--data-dir", tiny_data, "--out-dir", out)
    wait_for_line(process, "[epoch 1/3]")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 143
    return out


# fp32 for the run that continues: a CPU without bf16 units would emulate a bf16 run's arithmetic, slowly.
@pytest.mark.parametrize("precision, code", [("fp32", 0), ("fp16", 2)])
def test_a_gpu_run_resumes_on_the_cpu_or_says_why_not(stopped_cpu_run, tmp_path, precision, code):
    (tmp_path / "last.pth").write_bytes((stopped_cpu_run / "last.pth").read_bytes())
    as_if_trained_on_a_gpu(tmp_path / "last.pth", precision)
    result = run_trainer("--resume", tmp_path / "last.pth", "--device", "cpu", "--tta", 0)
    assert result.returncode == code, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    if code == 0:
        assert "[resume] on this machine: it trained on 1 x NVIDIA A100-SXM4-80GB and continues on the CPU" \
            in result.stdout
        history = json.loads((tmp_path / "training_history.json").read_text())
        assert [row["epoch"] for row in history["epochs"]] == [1, 2, 3]
        assert history["plan"]["device"] == "cpu" and history["events"][-1]["changes"]
    else:
        assert "this run trains in fp16, which the CPU here cannot run" in result.stderr


def test_peak_memory_of_the_process_is_read_in_the_units_of_the_platform(monkeypatch):
    usage = type("Usage", (), {"ru_maxrss": 3 * 2**30})  # macOS reports bytes
    monkeypatch.setattr(train.resource, "getrusage", lambda who: usage)
    monkeypatch.setattr(train.sys, "platform", "darwin")
    assert train.peak_memory_gb([torch.device("cpu")]) == [3.0]
    usage.ru_maxrss = 3 * 2**20  # Linux reports KiB
    monkeypatch.setattr(train.sys, "platform", "linux")
    assert train.peak_memory_gb([torch.device("cpu")]) == [3.0]
    monkeypatch.setattr(train, "resource", None)  # Windows has no resource module
    assert train.peak_memory_gb([torch.device("cpu")]) == [] and train.memory_text([]) == "n/a"
