"""The plan is a pure function of a hardware description: every rule tested with made-up GPUs."""
import dataclasses

import pytest
import torch

from train import MUON_LR, GPU, Hardware, UserError, cpu_has_bf16, make_plan, parse_simulated_gpus, torchrun_command


def gpus(*specs):
    return Hardware(tuple(GPU(i, name, gb) for i, (name, gb) in enumerate(specs)), cpu_count=16)


A6000, RTX3090, H100, A100_40, T4_4GB = ("NVIDIA RTX A6000", 48), ("NVIDIA GeForce RTX 3090", 24), \
    ("NVIDIA H100 80GB HBM3", 80), ("NVIDIA A100-SXM4-40GB", 40), ("Tesla T4 small", 4)


def test_mixed_a6000_and_two_3090s_uses_the_3090s_with_master_cuda1():
    plan = make_plan(gpus(A6000, RTX3090, RTX3090))
    assert plan["device"] == "cuda:1"
    assert plan["device_ids"] == [1, 2]
    assert plan["parallel"] == "DataParallel"
    assert plan["ignored_gpus"] == ["GPU 0 NVIDIA RTX A6000"]
    assert plan["model"] == "PowerCifarNet" and plan["model_kwargs"] == {"width_mult": 1.5}
    hint = torchrun_command(2, plan["device_ids"])
    assert "CUDA_VISIBLE_DEVICES=1,2 torchrun --standalone --nproc_per_node=2" in hint


def test_single_24gb_gpu_gets_the_full_size_network_not_the_smallest():
    plan = make_plan(gpus(RTX3090))
    assert plan["device"] == "cuda:0" and plan["parallel"] == "none"
    assert plan["model"] == "PowerCifarNet" and plan["model_kwargs"] == {"width_mult": 1.0}
    assert plan["batch_size"] == 2000 and plan["lr"] == MUON_LR and plan["epochs"] == 8
    assert plan["precision"] == "bf16"


def test_single_large_gpu_gets_the_wider_network():
    plan = make_plan(gpus(H100))
    assert plan["model_kwargs"] == {"width_mult": 1.5}
    assert plan["batch_size"] == 2000


@pytest.mark.parametrize("count, width", [(2, 1.5), (3, 2.5), (4, 2.5)])
def test_identical_gpus(count, width):
    plan = make_plan(gpus(*[RTX3090] * count))
    assert plan["device_ids"] == list(range(count))
    assert plan["device"] == "cuda:0"
    assert plan["parallel"] == "DataParallel"
    assert plan["model_kwargs"] == {"width_mult": width}
    assert plan["batch_size"] == 2000  # the global batch, split over the GPUs
    assert plan["lr"] == MUON_LR
    assert plan["ignored_gpus"] == []


def test_eight_mixed_gpus_keep_the_most_common_model():
    hw = gpus(A100_40, RTX3090, A100_40, RTX3090, RTX3090, A6000, RTX3090, A100_40)
    plan = make_plan(hw)
    assert plan["device_ids"] == [1, 3, 4, 6]
    assert plan["device"] == "cuda:1"
    assert len(plan["ignored_gpus"]) == 4
    assert plan["model_kwargs"] == {"width_mult": 2.5}  # 4 GPUs, 96 GB


def test_tie_between_gpu_models_goes_to_more_memory():
    plan = make_plan(gpus(RTX3090, A6000))
    assert plan["device_ids"] == [1] and plan["gpu_name"] == "NVIDIA RTX A6000"
    assert plan["model_kwargs"] == {"width_mult": 1.5}  # 48 GB


def test_small_4gb_gpu_gets_the_small_network_and_batch():
    plan = make_plan(gpus(T4_4GB))
    assert plan["model"] == "SmallCifarNet"
    assert plan["batch_size"] == 2000


def test_old_gpus_without_bf16_use_fp16_with_scaler():
    hw = Hardware((GPU(0, "Tesla V100", 16, bf16=False),), cpu_count=8)
    assert make_plan(hw)["precision"] == "fp16"


def test_no_gpu_trains_on_cpu_in_fp32():
    plan = make_plan(Hardware((), cpu_count=2))
    assert plan["device"] == "cpu" and plan["device_ids"] == [] and plan["parallel"] == "none"
    assert plan["precision"] == "fp32"
    assert plan["threads"] == 2
    assert plan["model"] == "SmallCifarNet"


def test_cpu_with_bf16_units_trains_the_airbench94_network_in_bf16():
    plan = make_plan(Hardware((), cpu_count=2, cpu_bf16=True))
    assert plan["device"] == "cpu" and plan["precision"] == "bf16"
    assert plan["model"] == "PowerCifarNet" and plan["model_kwargs"] == {"width_mult": 1.0} and plan["epochs"] == 8
    with_gpu = make_plan(dataclasses.replace(gpus(T4_4GB), cpu_bf16=True))  # the GPUs decide, not the CPU
    assert with_gpu["device"] == "cuda:0" and with_gpu["model"] == "SmallCifarNet"


def test_precision_flag_overrides_and_refuses_what_the_device_cannot_run():
    assert make_plan(Hardware((), 2, cpu_bf16=True), precision="fp32")["precision"] == "fp32"
    assert make_plan(gpus(RTX3090), precision="fp16")["precision"] == "fp16"
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        make_plan(Hardware((), 2), precision="fp16")
    with pytest.raises(UserError, match="Tesla V100 lacks bf16"):
        make_plan(Hardware((GPU(0, "Tesla V100", 16, bf16=False),), 8), precision="bf16")


def test_user_overrides_win():
    plan = make_plan(gpus(RTX3090), epochs=3, batch_size=256)
    assert plan["epochs"] == 3 and plan["batch_size"] == 256
    assert plan["lr"] == MUON_LR  # Muon's step does not depend on the batch; SGD's rates are per example
    assert plan["reasons"]["epochs"] == "set by --epochs"
    plan = make_plan(gpus(RTX3090), lr=0.1, weight_decay=0.0)
    assert plan["lr"] == 0.1 and plan["weight_decay"] == 0.0
    assert make_plan(gpus(RTX3090))["backprop_fraction"] == 1.0  # every example, unless --backprop-fraction
    plan = make_plan(gpus(RTX3090), backprop_fraction=0.5)
    assert plan["backprop_fraction"] == 0.5 and plan["reasons"]["backprop_fraction"] == "set by --backprop-fraction"
    assert make_plan(gpus(RTX3090))["small_crop_epochs"] == 0  # whole images, unless --small-crop-epochs
    plan = make_plan(gpus(RTX3090), small_crop_epochs=2)
    assert plan["small_crop_epochs"] == 2 and plan["reasons"]["small_crop_epochs"] == "set by --small-crop-epochs"


def test_disable_auto_uses_documented_defaults_and_the_first_gpu():
    plan = make_plan(gpus(A6000, RTX3090, RTX3090), batch_size=128, lr=0.01, disable_auto=True)
    assert plan["device"] == "cuda:0" and plan["parallel"] == "none"
    assert plan["model"] == "PowerCifarNet" and plan["model_kwargs"] == {"width_mult": 1.0}
    assert plan["batch_size"] == 128 and plan["lr"] == 0.01 and plan["epochs"] == 8


def test_model_flags_override_the_tier():
    assert make_plan(Hardware((), 2), width_mult=0.5)["model_kwargs"] == {"width_mult": 0.5}
    assert make_plan(gpus(RTX3090), model="SmallCifarNet")["model"] == "SmallCifarNet"


def test_plan_is_pure():
    hw = gpus(A6000, RTX3090, RTX3090)
    assert make_plan(hw) == make_plan(hw)


def test_parse_simulated_gpus():
    spec = "NVIDIA RTX A6000:48,NVIDIA GeForce RTX 3090:24, NVIDIA GeForce RTX 3090:24"
    hw = parse_simulated_gpus(spec, Hardware((), 8))
    assert [g.name for g in hw.gpus] == ["NVIDIA RTX A6000", "NVIDIA GeForce RTX 3090", "NVIDIA GeForce RTX 3090"]
    assert [g.memory_gb for g in hw.gpus] == [48, 24, 24]
    assert hw.simulated
    assert parse_simulated_gpus("Tesla V100:16:7.0", Hardware((), 8)).gpus[0].bf16 is False


@pytest.mark.parametrize("spec", ["", "RTX 3090", "RTX:abc", ":24", "RTX:-1", "RTX:24:x", "a:1:2:3"])
def test_malformed_simulated_gpus_are_refused(spec):
    with pytest.raises(UserError, match="--simulate-gpus"):
        parse_simulated_gpus(spec, Hardware((), 8))


def test_cpu_bf16_probe_missing_from_torch_means_the_fp32_plan(monkeypatch):
    assert cpu_has_bf16() in (True, False)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert cpu_has_bf16() is False


def test_resnets_get_the_sgd_recipe_and_cifarnets_airbench():
    resnet = make_plan(gpus(RTX3090), model="ResNet50")
    assert (resnet["recipe"], resnet["batch_size"], resnet["lr"], resnet["weight_decay"]) == ("sgd", 128, 0.1, 5e-4)
    assert "Nesterov SGD" in resnet["reasons"]["recipe"]
    assert make_plan(gpus(RTX3090))["recipe"] == "muon"
