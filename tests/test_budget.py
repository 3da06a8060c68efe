"""Issue 16: --budget. The chooser (pure) with made-up probes, the pace control on a run slowed after its probe and
on one that runs faster than its probe said, and a budgeted run interrupted and resumed."""
import dataclasses
import json
import math
import signal
import time
from types import SimpleNamespace

import pytest
import torch

import budget
import train
from budget import Candidate, Probe, Workload
from conftest import (ROOT, build_tiny_run, history_of, load_test_split, run_cli, run_trainer, start_trainer,
                      wait_for_line)
from tiny_cifar import write_tiny_cifar100

CIFAR10 = Workload(train_images=50_000, eval_images=0, final_eval_images=10_000,
                   spent_seconds=10.0, curves_seconds=0.5, curves_every_seconds=30, report_seconds=6.0,
                   stem_bias_epochs=3)
SAVE = 1.5  # seconds a made-up probe takes to write an epoch's checkpoints
PROBE_DATA = SimpleNamespace(class_names=[str(c) for c in range(10)], train_images=torch.zeros(5000, 3, 32, 32))
PROBE_WORKLOAD = Workload(train_images=5000, eval_images=0, final_eval_images=1000, spent_seconds=0.0,
                          curves_seconds=0.5, curves_every_seconds=30, report_seconds=1.0, stem_bias_epochs=3)
SMALL = Candidate("SmallCifarNet", {}, "fp32", 2000, points=((1, 70.0), (2, 77.0), (5, 86.0), (10, 89.0)),
                  source="made up")
POWER = Candidate("PowerCifarNet", {"width_mult": 1.0}, "fp32", 2000, points=((4, 88.0), (8, 91.0)), source="made up")
WIDE = Candidate("PowerCifarNet", {"width_mult": 1.5}, "bf16", 2000, points=((10, 94.5), (16, 95.0)),
                 source="made up")


def table_entry(batch_size, points, backprop_fraction=1.0, small_crop_epochs=0):
    """A configuration in bench/accuracy_table.json's layout: SmallCifarNet fp32 on a CPU, with made-up points."""
    return {"model": "SmallCifarNet", "model_kwargs": {}, "precision": "fp32", "batch_size": batch_size,
            "backprop_fraction": backprop_fraction, "small_crop_epochs": small_crop_epochs, "device_type": "cpu",
            "source": "made up",
            "points": [{"epochs": e, "test_acc_tta": a, "data": "made up"} for e, a in points]}


def probe_all(plan, candidates, budget_seconds):
    """train.probe_candidates on PROBE_DATA, as a 1-process run with PROBE_WORKLOAD and --tta 2."""
    return train.probe_candidates(plan, candidates, PROBE_DATA, train.Dist(), budget_seconds, PROBE_WORKLOAD, tta=2,
                                  out_dir=None)


def instant_probes(monkeypatch):
    """Make train.probe_throughput return at once, 6,000 training images/s; returns the list of the networks it
    probes, in order."""
    probed = []

    def instant_probe(plan, data, dist, out_dir, small_crops=False):
        probed.append(plan["model"])
        return Probe(6000.0, 1500.0, SAVE, 6000.0)

    monkeypatch.setattr(train, "probe_throughput", instant_probe)
    return probed


def latest_fitting_epochs(candidate, probe, workload, budget_seconds):
    limit = budget_seconds * (1 - budget.MARGIN)
    return max(e for e in budget.epoch_grid(candidate, by_time=False)
               if budget.forecast_seconds(probe, workload, e, tta=2) <= limit)


def test_durations_are_read_with_their_units_and_bare_numbers_are_refused():
    assert [budget.parse_duration(t) for t in ("90s", "10m", "1.5h", "1h30m", "2 min")] == [90, 600, 5400, 5400, 120]
    assert budget.duration_text(564.5) == budget.duration_text(564.54) == "9 min 25 s"  # a plan rounds to 0.1 s
    for text in ("10", "ten minutes", "5x", "m", ""):
        with pytest.raises(ValueError):
            budget.parse_duration(text)
    result = run_cli("--budget", "10")
    assert result.returncode == 2 and "90s, 10m, 1.5h" in result.stderr and "Traceback" not in result.stderr
    for flags, clash in [(["--epochs", "3"], "--epochs"), (["--folds", "3"], "--folds"),
                         (["--disable-auto"], "--disable-auto")]:
        result = run_cli("--budget", "10m", *flags, "--dry-run")
        assert result.returncode == 2 and clash in result.stderr, result.stderr
    result = run_cli("--budget", "10m", "--dry-run")
    assert result.returncode == 0 and "to be chosen by --budget" in result.stdout


def test_accuracy_is_interpolated_between_measured_points_and_never_extrapolated():
    # Linear in 1/epochs: 3 epochs is halfway from 2 to 6 (1/2, 1/3, 1/6), and 8 is 3/4 of the way from 5 to 10
    # (1/5, 1/8, 1/10), above the straight line in epochs (3/5 of the way).
    assert budget.expected_accuracy(((2, 80.0), (6, 86.0)), 3) == pytest.approx(83.0)
    assert budget.expected_accuracy(SMALL.points, 8) == pytest.approx(86.0 + 3.0 * 3 / 4)
    assert budget.expected_accuracy(SMALL.points, 10) == 89.0
    assert budget.expected_accuracy(SMALL.points, 0.5) is None and budget.expected_accuracy(SMALL.points, 11) is None
    assert budget.expected_accuracy(((8, 94.01),), 8) == 94.01 and budget.expected_accuracy(((8, 94.01),), 7) is None


def test_a_table_point_below_an_earlier_one_is_left_out():
    """Seed noise must not make fewer epochs the better choice: with 4 epochs at 86.62% and 5 at 86.55%, a budget
    that fits 5 epochs trains them, forecast between 4 and 7."""
    table = [table_entry(500, ((3, 85.38), (4, 86.62), (5, 86.55), (7, 88.11)))]
    candidate, = budget.table_candidates(table, "cpu", "fp32")
    assert candidate.points == ((3, 85.38), (4, 86.62), (7, 88.11))
    probe = Probe(530, 1500, SAVE, 530)
    choice = budget.choose([candidate], [probe], CIFAR10, 570, tta=2)
    assert choice.best.epochs == latest_fitting_epochs(candidate, probe, CIFAR10, 570) == 5
    assert choice.best.accuracy == pytest.approx(86.62 + (88.11 - 86.62) * (1 / 4 - 1 / 5) / (1 / 4 - 1 / 7))


def test_the_seeds_run_for_an_epoch_count_are_averaged():
    """One seed's point can sit a few tenths above its configuration's mean: the forecast reads each epoch count's
    seeds' mean, and a later point below one lucky seed but above the mean is kept."""
    entry = table_entry(2000, ((8, 90.60), (10, 91.30), (10, 90.90), (10, 91.00), (12, 91.25)))
    for point, seed in zip(entry["points"], (0, 0, 1, 2, 0)):
        point["seed"] = seed
    candidate, = budget.table_candidates([entry], "cpu", "fp32")
    assert [epochs for epochs, _ in candidate.points] == [8, 10, 12]
    assert candidate.points[1][1] == pytest.approx((91.30 + 90.90 + 91.00) / 3)
    assert budget.entry_points(dict(entry, points=entry["points"][:2] + entry["points"][4:])) == (
        (8, 90.60), (10, 91.30))  # seed 0 alone: the 12-epoch point is left out


def test_a_2_core_cpu_gets_the_light_network_for_as_many_epochs_as_fit():
    # Measured-like: PowerCifarNet is 3.3x slower on this CPU.
    probes = [Probe(530, 1500, SAVE, 530), Probe(160, 450, SAVE, 160)]
    choice = budget.choose([SMALL, POWER], probes, CIFAR10, 600, tta=2)
    assert choice.best.candidate is SMALL and choice.runner_up is None  # 4 epochs of POWER take 21 minutes
    assert choice.best.epochs == latest_fitting_epochs(SMALL, probes[0], CIFAR10, 600)
    assert 4 < choice.best.epochs < 6 and choice.best.seconds <= 600 * (1 - budget.MARGIN)
    assert budget.forecast_seconds(probes[0], CIFAR10, choice.best.epochs + 0.1, 2) > 600 * (1 - budget.MARGIN)
    assert choice.best.accuracy == pytest.approx(budget.expected_accuracy(SMALL.points, choice.best.epochs))
    # An hour: PowerCifarNet's 8 epochs fit and forecast more than SmallCifarNet's longest measured run.
    choice = budget.choose([SMALL, POWER], probes, CIFAR10, 3600, tta=2)
    assert choice.best.candidate is POWER and choice.best.epochs == 8 and choice.beyond_table
    assert choice.runner_up.candidate is SMALL and choice.runner_up.epochs == 10


def test_the_printed_choice_says_the_tables_accuracy_is_at_tta_2(capsys):
    probes = [Probe(530, 1500, SAVE, 530), Probe(160, 450, SAVE, 160)]
    choice = budget.choose([SMALL, POWER], probes, CIFAR10, 3600, tta=0)
    train.print_budget_choice(choice, 3600, tta=0)
    out = capsys.readouterr().out
    assert f"forecast {choice.best.accuracy:.2f}% with TTA" in out and "runner-up: SmallCifarNet" in out
    assert "the table's accuracy is with test-time augmentation level 2: at --tta 0 expect less" in out
    train.print_budget_choice(choice, 3600, tta=2)
    assert "expect less" not in capsys.readouterr().out


def test_the_epochs_after_the_stem_bias_freezes_are_forecast_at_their_own_speed():
    """The first stem_bias_epochs train at the probe's first speed, the rest at its frozen-stem speed (quicker: the
    first conv's input gradient is no longer computed), so more epochs fit than the first speed alone would say."""
    probe, unchanged = Probe(500, 1500, SAVE, 600), Probe(500, 1500, SAVE, 500)
    assert budget.training_seconds(probe, CIFAR10, 2.5) == pytest.approx(50_000 * 2.5 / 500)
    assert budget.training_seconds(probe, CIFAR10, 5) == pytest.approx(50_000 * (3 / 500 + 2 / 600))
    assert budget.forecast_seconds(probe, CIFAR10, 5, 2) - budget.forecast_seconds(unchanged, CIFAR10, 5, 2) == \
        pytest.approx(50_000 * 2 * (1 / 600 - 1 / 500))
    assert latest_fitting_epochs(SMALL, probe, CIFAR10, 900) > latest_fitting_epochs(SMALL, unchanged, CIFAR10, 900)


def test_a_small_gpu_and_a_big_gpu_choose_differently_from_the_same_table():
    small_gpu = [Probe(9_000, 30_000, SAVE, 9_000), Probe(2_500, 9_000, SAVE, 2_500)]
    big_gpu = [Probe(60_000, 200_000, SAVE, 60_000), Probe(25_000, 90_000, SAVE, 25_000)]
    candidates = [POWER, WIDE]
    on_small = budget.choose(candidates, small_gpu, CIFAR10, 120, tta=2)
    assert on_small.best.candidate is POWER and on_small.runner_up is None  # 10 epochs of WIDE: over 3 minutes
    on_big = budget.choose(candidates, big_gpu, CIFAR10, 120, tta=2)
    assert on_big.best.candidate is WIDE and on_big.runner_up.candidate is POWER
    assert on_big.best.epochs == latest_fitting_epochs(WIDE, big_gpu[1], CIFAR10, 120)
    # A candidate whose probe ran out of memory is left out.
    assert budget.choose(candidates, [small_gpu[0], None], CIFAR10, 3600, tta=2).best.candidate is POWER


def test_a_budget_that_fits_nothing_names_the_smallest_that_would():
    probes = [Probe(530, 1500, SAVE, 530), Probe(160, 450, SAVE, 160)]
    with pytest.raises(budget.NoFit) as refused:
        budget.choose([SMALL, POWER], probes, CIFAR10, 60, tta=2)
    smallest = refused.value.smallest_budget
    assert refused.value.quickest.candidate is SMALL and refused.value.quickest.epochs == 1
    assert budget.choose([SMALL, POWER], probes, CIFAR10, smallest + 0.01, tta=2).best.epochs == 1
    with pytest.raises(budget.NoFit):
        budget.choose([SMALL, POWER], probes, CIFAR10, smallest * 0.99, tta=2)


def test_a_budget_spent_before_training_or_a_batch_larger_than_the_data_is_refused_before_the_probe(tiny_data,
                                                                                                     tmp_path):
    result = run_trainer("--budget", "0.1s", "--data-dir", tiny_data, "--out-dir", tmp_path / "a", "--model",
                         "SmallCifarNet", "--batch-size", 100)  # a process of its own: its start-up is counted
    assert result.returncode == 2 and "--budget 0.1 s was spent before training could start" in result.stderr
    assert "[budget] probe" not in result.stdout and not (tmp_path / "a").exists()
    write_tiny_cifar100(tmp_path / "c100", train_size=60, test_size=20)
    result = run_cli("--budget", "10h", "--dataset", "cifar100", "--data-dir", tmp_path / "c100", "--batch-size", 100,
                     "--out-dir", tmp_path / "b")
    assert result.returncode == 2 and "The batch size, 100, is larger than the 60 training images" in result.stderr
    assert "[budget] probe" not in result.stdout and not (tmp_path / "b").exists()


def test_without_measured_accuracy_the_most_epochs_that_fit_win():
    unknown = Candidate("ResNet18", {}, "fp32", 128)
    choice = budget.choose([unknown], [Probe(30, 100, SAVE, 30)], CIFAR10, 7200, tta=0, by_time=True)
    assert choice.best.accuracy is None and not choice.beyond_table
    assert choice.best.epochs == max(e for e in budget.epoch_grid(unknown, by_time=True)
                                     if budget.forecast_seconds(Probe(30, 100, SAVE, 30), CIFAR10, e, 0) <= 7200 * 0.96)


def test_the_repository_table_is_well_formed():
    table = budget.load_table()
    assert {entry["device_type"] for entry in table} == {"cpu", "cuda"}
    for entry in table:
        assert entry["points"] and entry["source"]
        runs = [(p["epochs"], p["seed"]) for p in entry["points"]]  # one point per epoch count and seed
        assert runs == sorted(set(runs)) and all(0 < p["test_acc_tta"] < 100 for p in entry["points"])
        assert 0 < entry["backprop_fraction"] <= 1
        assert 0 <= entry["small_crop_epochs"] < entry["points"][0]["epochs"]  # whole images in every point's run
    assert budget.table_candidates(table, "cpu", "fp32")[0].model == "SmallCifarNet"
    configurations = [json.dumps({k: v for k, v in entry.items() if k not in ("points", "source")}, sort_keys=True)
                      for entry in table]
    assert len(configurations) == len(set(configurations)), "two entries of one configuration"
    for entry in table:  # every point was measured on its entry's device type
        assert all((" CPU, " in p["device"]) == (entry["device_type"] == "cpu") for p in entry["points"])


def test_the_table_script_files_a_gpu_point_apart_from_the_same_network_on_a_cpu(monkeypatch):
    """bench/accuracy_table.py once added GPU points to the CPU entry of the same network and precision (its key left
    out the device type), so --budget on a GPU never saw them and the CPU entry's point was overwritten. Small-crop
    epochs are part of the key too."""
    monkeypatch.syspath_prepend(ROOT / "bench")
    import accuracy_table

    cpu_entry = dict(table_entry(2000, ((8, 90.84),)), model="PowerCifarNet", model_kwargs={"width_mult": 1.0},
                     precision="bf16")
    table = {"configurations": [cpu_entry]}
    gpu_plan = {"model": "PowerCifarNet", "model_kwargs": {"width_mult": 1.0}, "batch_size": 2000,
                "backprop_fraction": 1.0, "small_crop_epochs": 0, "device": "cuda:0"}
    gpu_entry = accuracy_table.entry_for(table, gpu_plan, "bf16")
    assert gpu_entry is not cpu_entry and gpu_entry["device_type"] == "cuda" and gpu_entry["points"] == []
    assert table["configurations"] == [cpu_entry, gpu_entry]
    assert accuracy_table.entry_for(table, dict(gpu_plan, device="cpu"), "bf16") is cpu_entry
    assert accuracy_table.entry_for(table, dict(gpu_plan, device="cuda:1"), "bf16") is gpu_entry
    crops_entry = accuracy_table.entry_for(table, dict(gpu_plan, device="cpu", small_crop_epochs=2), "bf16")
    assert crops_entry not in (cpu_entry, gpu_entry) and crops_entry["small_crop_epochs"] == 2


def test_candidates_that_differ_only_in_batch_share_one_probe_on_a_cpu(monkeypatch, capsys):
    """A CPU probes every batch at PROBE_CPU_BATCH (500): batch 2000 and 500 of one network are one measurement,
    so noise between two probes cannot pick between them, each read at its own batch (budget.at_batch); batch 250
    is probed at its own size. A configuration on small crops shares the probe too, which then times the crops as
    well."""
    probed = []

    def counted_probe(plan, data, dist, out_dir, small_crops=False):
        probed.append((plan["batch_size"], small_crops))
        batch = train.probe_batch_size(plan, data, dist)
        return Probe(400.0 + len(probed), 1500.0, SAVE, 400.0 + len(probed), 700.0 if small_crops else None, batch,
                     update_seconds=0.05)

    monkeypatch.setattr(train, "probe_throughput", counted_probe)
    plan = train.make_plan(train.Hardware((), 2), precision="fp32")
    candidates = [dataclasses.replace(SMALL, batch_size=batch) for batch in (2000, 500, 250)]
    candidates.append(dataclasses.replace(SMALL, small_crop_epochs=2))
    probes, records = probe_all(plan, candidates, budget_seconds=600)
    assert probed == [(2000, True), (250, False)]
    assert probes[0] == probes[3] == budget.at_batch(probes[1], 2000) and probes[1].batch_size == 500
    assert probes[2].train_images_per_s == 402.0
    assert records[1]["train_images_per_s"] == 401.0 < records[0]["train_images_per_s"]
    assert records[0]["probe_batch_size"] == records[1]["probe_batch_size"] == 500
    assert records[0]["update_seconds"] == 0.05
    assert records[1]["small_crop_train_images_per_s"] == 700.0 and records[2]["small_crop_train_images_per_s"] is None
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[budget] probe")]
    assert "413 images/s training" in lines[0] and "timed at batch 500: 401, with 50 ms of optimiser update" in lines[0]
    assert "401 images/s training" in lines[1] and "timed at batch" not in lines[1]


def test_a_probe_is_read_at_the_run_batch_by_its_optimiser_update_which_any_batch_takes_alike():
    """Steps of 500 images in 1.25 s (400 images/s), 0.05 s of it the update: 2.4 ms an image besides, so steps of
    2000 take 4.85 s (412 images/s) and of 250 0.65 s (385 images/s); every training speed alike."""
    probe = Probe(400.0, 1500.0, SAVE, 500.0, 800.0, batch_size=500, update_seconds=0.05)
    at_2000 = budget.at_batch(probe, 2000)
    assert at_2000.train_images_per_s == pytest.approx(2000 / 4.85)
    assert at_2000.frozen_stem_train_images_per_s == pytest.approx(2000 / (4 * (1.0 - 0.05) + 0.05))
    assert at_2000.small_crop_train_images_per_s == pytest.approx(2000 / (4 * (0.625 - 0.05) + 0.05))
    assert at_2000.batch_size == 2000 and at_2000.eval_images_per_s == 1500.0 and at_2000.update_seconds == 0.05
    assert budget.at_batch(probe, 250).train_images_per_s == pytest.approx(250 / 0.65)
    assert budget.at_batch(probe, 500) is probe and budget.at_batch(Probe(400, 1500, SAVE, 400), 2000).batch_size == 0


@pytest.mark.parametrize("gpus, probed_batches", [((), [2000]), ((train.GPU(0, "made-up GPU", 24.0),), [2000, 250])])
def test_the_probe_share_bounds_every_probe_on_a_cpu_and_those_after_the_first_on_a_gpu(monkeypatch, gpus,
                                                                                        probed_batches):
    """A GPU's first probe runs whatever it costs: it pays the device's start (context, cuDNN's kernel search) that
    training would pay anyway, 5-10 s on an H100, which cut a 1- or 2-minute budget's probing short before the wider
    network. On a CPU every probe counts against PROBE_SHARE of the budget."""
    probed = []

    def slow_probe(plan, data, dist, out_dir, small_crops=False):
        probed.append(plan["batch_size"])
        time.sleep(0.3)
        return Probe(40000.0, 40000.0, 0.01, 40000.0)  # quick: every run fits, the share alone decides

    monkeypatch.setattr(train, "probe_throughput", slow_probe)
    plan = train.make_plan(train.Hardware(gpus, 2), precision="fp32")
    candidates = [dataclasses.replace(SMALL, batch_size=batch) for batch in (2000, 250, 100)]  # three probe batches
    budget_seconds = 0.2 / train.PROBE_SHARE  # the share, 0.2 s, is less than one probe
    probes, records = probe_all(plan, candidates, budget_seconds)
    assert probed == probed_batches and probes[2] is None and "share of the budget" in records[2]["skipped"]


@pytest.mark.parametrize("share_seconds, probed_batches", [(0.6, [250]), (0.8, [250, 500])])
def test_a_cpu_probe_that_would_pass_the_share_is_not_started(monkeypatch, share_seconds, probed_batches):
    """On a CPU the next probe's seconds are foretold from the last one's: its steps' by their work, the rest as the
    last's. Here each probe spends 0.2 s outside its steps, and batch 250's steps take 0.1 s; batch 2000, probed at
    500 images a step, is foretold 0.2 + 0.2 s, and started only if the share has room for it. Before, a probe started
    whenever the share was not yet spent: a 1.5-wide network's would have taken a 5-minute budget's probing on a bf16
    CPU from 10 s to about 25 s, past its 15 s share."""
    probed = []
    images_per_s = (train.PROBE_STEPS + 1) * 2 * 250 / 0.1  # batch 250's steps take 0.1 s

    def timed_probe(plan, data, dist, out_dir, small_crops=False):
        probed.append(train.probe_batch_size(plan, data, dist))
        time.sleep(0.2 + probed[-1] * 2 * (train.PROBE_STEPS + 1) / images_per_s)
        return Probe(images_per_s, 1500.0, SAVE, images_per_s)

    monkeypatch.setattr(train, "probe_throughput", timed_probe)
    plan = train.make_plan(train.Hardware((), 2), precision="fp32")
    candidates = [dataclasses.replace(SMALL, batch_size=batch) for batch in (250, 2000)]
    probes, records = probe_all(plan, candidates, share_seconds / train.PROBE_SHARE)
    assert probed == probed_batches
    assert records[0]["probe_seconds"] >= 0.3 and records[0]["foretold_seconds"] is None
    if len(probed) == 2:  # scaled whole, it would have been foretold 0.6 s and not started
        assert records[1]["foretold_seconds"] == pytest.approx(0.4, abs=0.03)
    else:
        assert probes[1] is None and "it would take the probes past their share" in records[1]["skipped"]
    # A Selective-Backprop step of 1000 images, half backpropagated, adds a gradient-free forward of all 1000 to the
    # plain step of 500: 5/3 of its work.
    assert train.step_work(1, 1000, 0.5) / train.step_work(1, 500, 1.0) == pytest.approx(5 / 3)


@pytest.mark.parametrize("gpus, budget_seconds, probed_models", [
    ((), 145, ["SmallCifarNet"]), ((), 160, ["SmallCifarNet", "PowerCifarNet"]),
    ((train.GPU(0, "made-up GPU", 24.0),), 145, ["SmallCifarNet", "PowerCifarNet"])])
def test_a_cpu_candidate_whose_shortest_run_cannot_fit_is_not_probed(monkeypatch, gpus, budget_seconds,
                                                                     probed_models):
    """SmallCifarNet's probe, 6,000 images/s, foretells PowerCifarNet's, read FORETELLING_OVERESTIMATE (1.6) times
    quick: 6,000 * 1.6 over its work per image against SmallCifarNet's (3.57), 2,687 images/s. Its shortest measured
    run, 40 epochs of 5,000 images, is then foretold at 74 s of steps, 60 s of checkpoints and 9 s of final
    evaluation: 152 s with the margin. It is left out of a 145 s budget, not of a 160 s one; its probe, foretold at
    0 s, fits either budget's share. Before, it was probed though it could not fit: a 1.5-wide network's probe took
    16 s of a 10-minute budget on a bf16 CPU, for a run of 16 minutes. A GPU's probes are not foretold (a new
    network's kernel search, a small network's idle device)."""
    probed = instant_probes(monkeypatch)
    plan = train.make_plan(train.Hardware(gpus, 2), precision="fp32")
    long_power = dataclasses.replace(POWER, points=((40, 90.0), (50, 91.0)))
    probes, records = probe_all(plan, [long_power, SMALL], budget_seconds)
    assert probed == probed_models
    if len(probed) == 1:
        assert probes[0] is None and records[0]["skipped"] == (
            "not probed: even 1.6 times quicker than the probe of SmallCifarNet() fp32, batch 2000 foretells, its "
            "shortest measured run (40 epochs) would not fit the budget")
    else:
        assert probes[0] is not None and records[0]["probe_seconds"] < 1


def test_after_the_first_probe_a_cpu_probes_first_what_could_win_and_leaves_out_what_could_not(monkeypatch):
    """Each made-up probe spends 0.1 s besides its steps, which take their work's time: 0.2 s for SmallCifarNet's,
    5/3 of that for its Selective-Backprop configuration's (1,000 images a step, half backpropagated), 3.57 times
    that for PowerCifarNet's. The first probe, SmallCifarNet's, foretells the others. PowerCifarNet could reach 91%
    in the budget and is probed next, foretold at 0.81 s; the Selective-Backprop configuration, whose table stops at
    90%, could beat SmallCifarNet's 89% but not what PowerCifarNet then measured, and is left out. Cheapest first, it
    would have been probed second, and PowerCifarNet would have taken the probes to 1.54 s, past the 1.5 s share:
    so a 10-minute fp32 budget trained SmallCifarNet (forecast 89.13%) where PowerCifarNet reaches 90%."""
    probed, images_per_s = [], 30_000.0
    steps_seconds = {("SmallCifarNet", 1.0): 0.2, ("SmallCifarNet", 0.5): 0.2 * 5 / 3, ("PowerCifarNet", 1.0): 0.714}

    def timed_probe(plan, data, dist, out_dir, small_crops=False):
        probed.append((plan["model"], plan["backprop_fraction"]))
        time.sleep(0.1 + steps_seconds[probed[-1]])
        return Probe(images_per_s, images_per_s, 0.01, images_per_s)

    monkeypatch.setattr(train, "probe_throughput", timed_probe)
    plan = train.make_plan(train.Hardware((), 2), precision="fp32")
    hardest_half = dataclasses.replace(SMALL, batch_size=1000, backprop_fraction=0.5, points=((2, 80.0), (8, 90.0)))
    probes, records = probe_all(plan, [SMALL, hardest_half, POWER], budget_seconds=1.5 / train.PROBE_SHARE)
    assert probed == [("SmallCifarNet", 1.0), ("PowerCifarNet", 1.0)]
    assert records[2]["foretold_seconds"] == pytest.approx(0.81, abs=0.1)
    assert probes[1] is None and records[1]["skipped"] == (
        "not probed: the most its table holds, 90.00% after 8 epochs, is below the 91.00% forecast for what was "
        "measured")


def test_a_cpu_probes_next_what_it_is_foretold_to_reach_most_not_what_could_reach_most(monkeypatch):
    """SmallCifarNet's probe foretells the others' speeds by their work per image. At that speed a 0.75-wide
    PowerCifarNet fits its 8 epochs (90.5%) and the 1.0-wide one not even its shortest run (6 epochs); only read 1.6
    times quick could the 1.0-wide reach more (92%). Each probe sleeps what its steps take at its network's speed,
    plus 0.05 s, and the share has room for one wide probe after SmallCifarNet's: the 0.75-wide goes first. Ordered
    by what they could reach at best, the 1.0-wide was probed second and the 0.75-wide then did not fit the share: a
    10-minute bf16 budget on a Zen 4 trained SmallCifarNet (89.59%) where the 0.75-wide reaches 90.1%."""
    work = {None: train.count_macs(train.build_model("SmallCifarNet"), 32)}
    work.update({w: train.count_macs(train.build_model("PowerCifarNet", width_mult=w), 32) for w in (0.75, 1.0)})
    probed = []

    def timed_probe(plan, data, dist, out_dir, small_crops=False):
        width = plan["model_kwargs"].get("width_mult")
        probed.append(width)
        speed = 50_000 * work[None] / work[width]  # images/s, in proportion to the network's work
        time.sleep(0.05 + train.probe_steps_seconds(Probe(speed, 1e5, 0.01, speed), 500))
        return Probe(speed, 1e5, 0.01, speed)

    monkeypatch.setattr(train, "probe_throughput", timed_probe)
    monkeypatch.setattr(train, "PROBE_SHARE", 0.8 / 208)  # 0.8 s of a 208 s budget
    plan = train.make_plan(train.Hardware((), 2), precision="fp32")
    mid = Candidate("PowerCifarNet", {"width_mult": 0.75}, "fp32", 2000, points=((4, 88.0), (8, 90.5)),
                    source="made up")
    power = dataclasses.replace(POWER, points=((6, 89.5), (8, 92.0)))
    workload = dataclasses.replace(PROBE_WORKLOAD, train_images=500_000)  # epochs of seconds, probes of tenths
    probes, records = train.probe_candidates(plan, [SMALL, power, mid], PROBE_DATA, train.Dist(), 208, workload,
                                             tta=2, out_dir=None)
    assert probed == [None, 0.75]
    assert probes[1] is None and "past their share" in records[1]["skipped"]
    assert budget.choose([SMALL, power, mid], probes, workload, 208, 2).best.candidate is mid


@pytest.mark.parametrize("gpus", [(), (train.GPU(0, "made-up GPU", 24.0),)])
def test_on_any_device_a_candidate_whose_table_tops_out_below_what_was_measured_is_not_probed(monkeypatch, gpus):
    """SmallCifarNet, probed first, is forecast its table's 89% in the budget; a Selective-Backprop configuration
    whose table stops at 80% cannot beat that at any speed, on a CPU or a GPU: its probe would only spend the share."""
    probed = instant_probes(monkeypatch)
    plan = train.make_plan(train.Hardware(gpus, 2), precision="fp32")
    capped = dataclasses.replace(SMALL, batch_size=1000, backprop_fraction=0.5, points=((1, 70.0), (2, 80.0)))
    probes, records = probe_all(plan, [SMALL, capped], budget_seconds=145)
    assert probed == ["SmallCifarNet"] and probes[1] is None and records[1]["skipped"] == (
        "not probed: the most its table holds, 80.00% after 2 epochs, is below the 89.00% forecast for what was "
        "measured")


def test_a_probe_times_the_checkpoints_on_the_runs_disk_and_leaves_nothing_there(tmp_path, monkeypatch):
    written = []
    real_write_synced = train.write_synced

    def counted_write_synced(path, data):
        written.append((path.parent, len(data)))
        real_write_synced(path, data)

    monkeypatch.setattr(train, "write_synced", counted_write_synced)
    model = train.build_model("SmallCifarNet", num_classes=10)
    plan = train.make_plan(train.Hardware((), 2), precision="fp32")
    optimizer = train.make_optimizer(model, plan)
    seconds = train.checkpoint_seconds(model, optimizer, tmp_path)
    assert 0 < seconds < 60 and list(tmp_path.iterdir()) == []
    weights_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    (first_dir, first), (second_dir, second) = written  # best_model.pth's, then last.pth's
    assert first_dir == second_dir == tmp_path and first > weights_bytes and second > 2 * weights_bytes


def test_the_probe_times_each_step_kind_in_turns_so_a_slow_spell_slows_them_alike(tiny_data, tmp_path, monkeypatch):
    """The real probe on the tiny data, its training steps made sleeps: 12.5 ms, 10 with the stem bias frozen (1.25
    times quicker), 7 ms on small crops, each 2.5 times as long during a slow spell of the first 9 steps. Timed one
    kind after another, the spell would fall on the first kind's steps alone (it read the frozen stem 3 times
    quicker); taking turns, it falls on the warm-up and two timed steps of each, and the medians read the ratios."""
    calls = []

    def sleeping_step(model, optimizer, scaler, inputs, labels, *args):
        frozen = not any(p.requires_grad for p in model.parameter_groups()["stem_bias"])
        seconds = 0.007 if inputs.shape[-1] < 32 else 0.010 if frozen else 0.0125
        calls.append(frozen)
        time.sleep(seconds * (2.5 if len(calls) <= 9 else 1))

    monkeypatch.setattr(train, "training_step", sleeping_step)
    plan = train.make_plan(train.Hardware((), 2), precision="fp32", model="SmallCifarNet", batch_size=100)
    data, _ = train.load_data(train.DATASETS["cifar10"], tiny_data, 32)
    data = train.place_data(data, plan["val_split"], 0, torch.device("cpu"))
    probe = train.probe_throughput(plan, data, train.Dist(), tmp_path, small_crops=True)
    assert probe.frozen_stem_speedup == pytest.approx(1.25, rel=0.1)
    assert probe.small_crop_speedup == pytest.approx(12.5 / 7, rel=0.1)
    assert probe.train_images_per_s == pytest.approx(train.probe_batch_size(plan, data, train.Dist()) / 0.0125, rel=0.1)
    # The real update on a CPU, timed too, for the run's batch (budget.at_batch): a part of the quickest step.
    assert probe.batch_size == train.probe_batch_size(plan, data, train.Dist())
    assert 0 < probe.update_seconds <= 0.007 * 1.1
    assert len(calls) == 3 * (train.PROBE_STEPS + 1) and calls[:3] == [False, True, False]


def test_a_selective_backprop_configuration_is_its_own_candidate_probed_at_its_own_batch(monkeypatch):
    """Selective-Backprop's step has a pass of its own to time: it never shares the plain step's probe, and on a CPU
    it is probed backpropagating PROBE_CPU_BATCH images, as many as the plain step."""
    probed = []

    def counted_probe(plan, data, dist, out_dir, small_crops=False):
        probed.append((train.probe_batch_size(plan, data, dist), plan["backprop_fraction"]))
        return Probe(400.0 + len(probed), 1500.0, SAVE, 400.0 + len(probed))

    monkeypatch.setattr(train, "probe_throughput", counted_probe)
    table = [table_entry(1000, ((4, 85.0),), backprop_fraction=fraction) for fraction in (1.0, 0.5)]
    plan = train.make_plan(train.Hardware((), 2), precision="fp32")
    args = SimpleNamespace(model=None, width_mult=None, batch_size=None, backprop_fraction=None, small_crop_epochs=None)
    cifar10 = SimpleNamespace(key="cifar10")
    candidates, by_time = train.budget_candidates(args, plan, cifar10, table)
    assert not by_time and [c.backprop_fraction for c in candidates] == [1.0, 0.5]
    assert candidates[1].label == "SmallCifarNet() fp32, batch 1000, hardest 50% backpropagated"
    probe_all(plan, candidates, budget_seconds=600)
    assert sorted(probed) == [(500, 1.0), (1000, 0.5)]
    # --backprop-fraction picks the table's configurations of that fraction; with --model it must match the plan's.
    chosen, _ = train.budget_candidates(args_with(args, backprop_fraction=0.5), plan, cifar10, table)
    assert [c.backprop_fraction for c in chosen] == [0.5]
    fixed_plan = train.make_plan(train.Hardware((), 2), precision="fp32", model="SmallCifarNet", batch_size=1000,
                                 backprop_fraction=0.5)
    chosen, by_time = train.budget_candidates(args_with(args, model="SmallCifarNet", batch_size=1000,
                                                        backprop_fraction=0.5), fixed_plan, cifar10, table)
    assert not by_time and [c.backprop_fraction for c in chosen] == [0.5]
    assert train.candidate_plan(plan, chosen[0])["backprop_fraction"] == 0.5
    # Small crops the same way, except that --model leaves them to the chooser unless --small-crop-epochs is given.
    table.append(table_entry(1000, ((4, 85.5),), small_crop_epochs=2))
    chosen, _ = train.budget_candidates(args_with(args, small_crop_epochs=0), plan, cifar10, table)
    assert [(c.backprop_fraction, c.small_crop_epochs) for c in chosen] == [(1.0, 0), (0.5, 0)]
    fixed_plan = train.make_plan(train.Hardware((), 2), precision="fp32", model="SmallCifarNet", batch_size=1000)
    chosen, _ = train.budget_candidates(args_with(args, model="SmallCifarNet", batch_size=1000), fixed_plan, cifar10,
                                        table)
    assert [c.small_crop_epochs for c in chosen] == [0, 2]
    chosen, _ = train.budget_candidates(args_with(args, model="SmallCifarNet", batch_size=1000, small_crop_epochs=2),
                                        fixed_plan, cifar10, table)
    assert [c.small_crop_epochs for c in chosen] == [2]
    assert train.candidate_plan(plan, chosen[0])["small_crop_epochs"] == 2


def args_with(args, **changes):
    return SimpleNamespace(**dict(vars(args), **changes))


def slow_down_training_steps(monkeypatch, seconds, steps=math.inf):
    """Each of the first `steps` training steps after --budget's choice (not the probe's) takes `seconds` longer."""
    slowed = {"left": 0}
    real_step, real_plan_for_budget = train.training_step, train.plan_for_budget

    def slowed_step(*args, **kwargs):
        if slowed["left"]:
            slowed["left"] -= 1
            time.sleep(seconds)
        return real_step(*args, **kwargs)

    def plan_then_slow_down(*args, **kwargs):
        plan = real_plan_for_budget(*args, **kwargs)
        slowed["left"] = steps
        return plan

    monkeypatch.setattr(train, "training_step", slowed_step)
    monkeypatch.setattr(train, "plan_for_budget", plan_then_slow_down)


def test_a_run_that_falls_behind_ends_sooner_and_its_rates_still_reach_zero(tiny_data, tmp_path, monkeypatch):
    """The real trainer, in this process, on the tiny data: every step after the probe is slowed, so the pace the
    forecast assumed is not kept and the pace control must end the schedule sooner to finish within the budget."""
    slow_down_training_steps(monkeypatch, 0.5)
    monkeypatch.setattr(train, "STARTED", time.time())  # this process started long ago; the run starts now
    result = run_cli("--budget", "22s", "--model", "SmallCifarNet", "--batch-size", 100, "--tta", 0, "--seed", 0,
                     "--data-dir", tiny_data, "--out-dir", tmp_path)
    assert result.returncode == 0, result.stderr
    history = history_of(tmp_path)
    paces = [event["pace"] for event in history["events"] if "pace" in event]
    assert paces and paces[0]["end_epoch"] < paces[0]["end_epoch_was"], result.stdout  # (later moves may fine-tune)
    outcome = history["final"]["budget"]
    assert outcome["seconds"] <= 22 and outcome["epochs_trained"] < history["plan"]["epochs"]
    schedule = torch.load(tmp_path / "last.pth", weights_only=True)["schedule"]
    assert schedule["end_epoch"] == pytest.approx(outcome["epochs_trained"], abs=1e-3)  # trained to the bent end
    rates = [row["lr"] for row in history["epochs"]]
    assert rates == sorted(rates, reverse=True)  # bent, never raised
    assert rates[-1] <= train.MUON_LR * 0.1 / (schedule["end_epoch"] - schedule["bend_epoch"])  # one step from 0


def test_the_first_epochs_drawing_of_the_curves_is_not_charged_to_every_epoch(tiny_data, tmp_path, monkeypatch):
    """Epoch 1 always draws training_curves.png, later epochs once in CURVES_EVERY_SECONDS: the pace counts the
    drawing at that share, not as part of each epoch's evaluation and saving (which read short runs behind)."""
    plot_curves = train.plot_curves

    def slow_drawing(*args):
        time.sleep(1.0)
        plot_curves(*args)

    monkeypatch.setattr(train, "plot_curves", slow_drawing)
    run, data = build_tiny_run(tiny_data, tmp_path, 100)
    assert train.train_loop(run, data)
    assert run.curves_seconds >= 1.0 and run.epoch_overhead_seconds < 0.5  # epoch 2 did not draw: the mean of 2

def test_the_pace_control_moves_the_end_only_outside_its_band_and_never_past_the_table():
    """100 s budget, 10 steps an epoch of 1 s each, 2 s after each epoch, 5 s at the end; at step 15 of a run
    planned to end at step 40. Finishing at step 40 leaves seconds_left - 25 - 3 * 2 - 5 spare: the band keeps it
    between 2 and 6 s, the move aims at 4 s."""
    def paced(seconds_left, longest_step=80):
        return budget.paced_final_step(15, 40, longest_step, 10, seconds_left, 100, [(15, 1.0)], 2.0, 5.0)

    assert paced(36 + 2) is None and paced(36 + 6) is None  # within the band: the end stays
    assert paced(36 + 1) == 37  # behind (1 s spare): 3 steps sooner leave 4 s
    assert paced(36 + 7) == 41  # ahead (7 s spare): 1 more step, starting a 5th epoch (2 s more), leaves 4 s
    assert paced(36 + 60) == 80 and paced(36 + 60, longest_step=40) is None  # never past the table's longest run
    assert paced(10) == 16  # hopeless: end after the next step
    # Steps from 30 on (the stem bias frozen) at 0.5 s: ending at 40 costs 15 + 5 s of steps, 6 s after the epochs
    # and 5 s at the end. With 32 s left that is 1 s spare: behind; ending at 34 leaves 4 s (all at 1 s: 32).
    assert budget.paced_final_step(15, 40, 80, 10, 32, 100, [(15, 1.0), (30, 0.5)], 2.0, 5.0) == 34
    assert budget.paced_final_step(15, 40, 80, 10, 31 + 4, 100, [(15, 1.0), (30, 0.5)], 2.0, 5.0) is None


def test_the_pace_pools_only_a_last_epoch_this_process_ended():
    """The pace is measured over the last epoch's row and the current epoch, each after its first step. A row from
    before a resume (other hardware, perhaps), of an epoch resumed part-way (its seconds are two processes'), or from
    before an out-of-memory retry (another batch size: restore_run sets start_epoch to the retried epoch) is left
    out; the last row whose stem bias trained, or whose images were small crops, counts at the pace the probe
    measured for the next epoch's steps."""
    def run_with(*rows, start_epoch=0, began_mid_epoch=False, small_crop_epochs=0):
        return SimpleNamespace(start_epoch=start_epoch, began_mid_epoch=began_mid_epoch,
                               plan={"small_crop_epochs": small_crop_epochs,
                                     "budget": {"frozen_stem_speedup": 1.25, "small_crop_speedup": 1.6}},
                               history={"epochs": [{"epoch": epoch, "seconds": seconds + 2.0, "steps": steps + 1,
                                                    "first_step_seconds": 2.0}
                                                   for epoch, (seconds, steps) in enumerate(rows, 1)]})

    assert train.last_epoch_training(run_with()) == (0.0, 0)
    assert train.last_epoch_training(run_with((90.0, 100), (80.0, 100))) == (80.0, 100)
    assert train.last_epoch_training(run_with((90.0, 100), (80.0, 100), start_epoch=1)) == (80.0, 100)
    assert train.last_epoch_training(run_with((90.0, 100), (80.0, 100), start_epoch=2)) == (0.0, 0)
    # Resumed part-way through epoch 4: its row holds the earlier process's seconds too; epoch 5's does not.
    resumed = [(90.0, 100), (80.0, 100), (85.0, 100), (75.0, 100)]
    assert train.last_epoch_training(run_with(*resumed, start_epoch=3, began_mid_epoch=True)) == (0.0, 0)
    assert train.last_epoch_training(run_with(*resumed, (70.0, 100), start_epoch=3, began_mid_epoch=True)) \
        == (70.0, 100)
    # The last epoch whose stem bias trained (train.STEM_BIAS_EPOCHS = 3), at the pace of the quicker ones after it.
    assert train.last_epoch_training(run_with((90.0, 100), (80.0, 100), (85.0, 100))) == (68.0, 100)
    assert train.last_epoch_training(run_with((90.0, 100), (80.0, 100), (85.0, 100), (70.0, 100))) == (70.0, 100)
    # The last epoch on small crops, at the slower pace of the whole images after it.
    assert train.last_epoch_training(run_with((50.0, 100), small_crop_epochs=2)) == (50.0, 100)
    assert train.last_epoch_training(run_with((50.0, 100), (50.0, 100), small_crop_epochs=2)) == (80.0, 100)


def test_small_crop_epochs_are_forecast_and_paced_at_their_probed_speed():
    """Epochs on small crops train at the probe's small-crop speed: more epochs fit, and a configuration measured
    with them is chosen for what it reaches in the time. The pace control forecasts the steps after the crops end
    and after the stem bias freezes from the pace it measures, by the probe's ratios."""
    probe = Probe(500, 1500, SAVE, 600, 800)  # crops 1.6 times quicker, the frozen stem 1.2 times
    assert budget.training_seconds(probe, CIFAR10, 5, small_crop_epochs=2) == \
        pytest.approx(50_000 * (2 / 800 + 1 / 500 + 2 / 600))
    assert budget.training_seconds(probe, CIFAR10, 1.5, small_crop_epochs=2) == pytest.approx(50_000 * 1.5 / 800)
    # Crops past the stem bias's epochs: quicker by both ratios.
    assert budget.training_seconds(probe, CIFAR10, 5, small_crop_epochs=4) == \
        pytest.approx(50_000 * (3 / 800 + 1 / (600 * 1.6) + 1 / 600))
    assert budget.training_seconds(Probe(500, 1500, SAVE, 600), CIFAR10, 5, small_crop_epochs=2) == \
        budget.training_seconds(probe, CIFAR10, 5)  # not probed on crops: counted as whole images

    table = [table_entry(2000, ((4, 88.0), (8, 91.0))), table_entry(2000, ((4, 87.8), (8, 90.9)), small_crop_epochs=2)]
    plain, cropped = budget.table_candidates(table, "cpu", "fp32")
    assert cropped.small_crop_epochs == 2 and cropped.label.endswith(", first 2 epochs on small crops")
    choice = budget.choose([plain, cropped], [probe, probe], CIFAR10, 720, tta=2)  # 7.7 epochs against 6.8
    assert choice.best.candidate is cropped and choice.runner_up.candidate is plain
    assert choice.best.epochs > choice.runner_up.epochs and choice.best.accuracy > choice.runner_up.accuracy
    assert choice.best.seconds == pytest.approx(budget.forecast_seconds(probe, CIFAR10, choice.best.epochs, 2, 2))

    plan = {"small_crop_epochs": 2, "budget": {"frozen_stem_speedup": 1.25, "small_crop_speedup": 1.6}}
    assert train.step_paces(plan, 5, 10, 1.0) == [(5, 1.0), (20, pytest.approx(1.6)), (30, pytest.approx(1.28))]
    assert train.step_paces(plan, 25, 10, 1.0) == [(25, 1.0), (30, pytest.approx(0.8))]
    assert train.step_paces(plan, 35, 10, 1.0) == [(35, 1.0)]
    # At step 5 of a run planned to end at step 40 (10 steps an epoch, 2 s after each, 5 at the end, 100 s budget):
    # 15 crop steps, 10 whole, 10 frozen take 15 + 16 + 12.8 s; with 43.8 + 4 * 2 + 5 + 4 s left the end stays.
    paces = train.step_paces(plan, 5, 10, 1.0)
    assert budget.paced_final_step(5, 40, 80, 10, 60.8, 100, paces, 2.0, 5.0) is None
    # 3 s fewer leave 1 s spare, under the band's 2: ending 3 frozen steps (1.28 s each) sooner leaves the 4 s margin,
    # 2 would not. Taken at the crops' pace throughout, the same run would look ahead and be lengthened.
    assert budget.paced_final_step(5, 40, 80, 10, 57.8, 100, paces, 2.0, 5.0) == 37
    assert budget.paced_final_step(5, 40, 80, 10, 57.8, 100, [(5, 1.0)], 2.0, 5.0) > 40


def test_the_pace_leaves_out_the_runs_slow_first_step(tiny_data, tmp_path, monkeypatch):
    """The real trainer on the tiny data, its first training step after the probe slowed by 3 s (as a process's
    first step builds the batch shape's kernels and memory). That time is spent, not a pace: neither epoch 1's
    measurements nor epoch 2's, which pool epoch 1's row, may count it."""
    paces = []
    real_keep_pace = train.keep_pace

    def spied_keep_pace(run, seconds_per_step):
        paces.append((run.step, seconds_per_step))
        real_keep_pace(run, seconds_per_step)

    slow_down_training_steps(monkeypatch, 3, steps=1)
    monkeypatch.setattr(train, "keep_pace", spied_keep_pace)
    monkeypatch.setattr(train, "STARTED", time.time())
    result = run_cli("--budget", "30s", "--model", "SmallCifarNet", "--batch-size", 100, "--precision", "fp32",
                     "--tta", 0, "--seed", 0, "--data-dir", tiny_data, "--out-dir", tmp_path)
    assert result.returncode == 0, result.stderr
    rows = history_of(tmp_path)["epochs"]
    assert rows[0]["first_step_seconds"] >= 3 and len(rows) >= 3
    # The steps' real pace: the slowest whole epoch after the first, its first step left out as the pace leaves it out.
    step_seconds = max((row["seconds"] - row["first_step_seconds"]) / (row["steps"] - 1)
                       for row in rows[1:] if row["steps"] == rows[0]["steps"])
    # Counted, the 3 s would read at least 3 s / 3 steps at epoch 1's first measurement, 3 s / 13 at epoch 2's.
    assert {step for step, _ in paces} >= {3, 6, 9, 13, 16, 19}, paces  # measured 3 times in each of epochs 1 and 2
    assert all(seconds < 2 * step_seconds + 0.02 for _, seconds in paces), (paces, step_seconds)


def test_a_run_ahead_of_its_forecast_is_lengthened(tiny_data, tmp_path, monkeypatch):
    """The real trainer on the tiny data, its probe reporting half the real training speed: the epochs chosen would
    finish early, so the pace control must lengthen the run, still within the budget and the (made-up) table."""
    points = [(e, 50.0 + e) for e in (1, 2, 4, 8, 16, 32)]
    table = [table_entry(100, points)]
    real_probe = train.probe_throughput

    def slow_probe(*args, **kwargs):
        probe = real_probe(*args, **kwargs)
        return dataclasses.replace(probe, train_images_per_s=probe.train_images_per_s / 2,
                                   frozen_stem_train_images_per_s=probe.frozen_stem_train_images_per_s / 2)

    monkeypatch.setattr(budget, "load_table", lambda: table)
    monkeypatch.setattr(train, "probe_throughput", slow_probe)
    monkeypatch.setattr(train, "STARTED", time.time())
    result = run_cli("--budget", "20s", "--model", "SmallCifarNet", "--batch-size", 100, "--precision", "fp32",
                     "--tta", 0, "--seed", 0, "--data-dir", tiny_data, "--out-dir", tmp_path)
    assert result.returncode == 0, result.stderr
    history = history_of(tmp_path)
    assert history["plan"]["budget"]["max_epochs"] == 32
    paces = [event["pace"] for event in history["events"] if "pace" in event]
    assert paces and paces[0]["end_epoch"] > paces[0]["end_epoch_was"], result.stdout
    for pace in paces:  # each move says what the table gives its new length
        assert pace["table_acc"] == pytest.approx(budget.expected_accuracy(points, pace["end_epoch"]), abs=0.01)
        assert f"ends at epoch {pace['end_epoch']:.2f} (the table's {pace['table_acc']:.2f}% with TTA there)" \
            in result.stdout
    outcome = history["final"]["budget"]
    assert history["plan"]["epochs"] < outcome["epochs_trained"] <= 32 and outcome["seconds"] <= 20
    # What the forecast's parts were, and the epochs' measured overhead, to compare them by (bench/RESULTS.md).
    assert 0 < history["plan"]["budget"]["spent_seconds"] < outcome["seconds"]
    probe = history["plan"]["budget"]["probes"][0]  # timed both ways; frozen, never slower (it does less work)
    assert probe["frozen_stem_train_images_per_s"] >= probe["train_images_per_s"] > 0
    assert 0 < outcome["epoch_overhead_seconds"] < outcome["seconds"]
    assert outcome["table_acc_for_epochs_trained"] == pytest.approx(
        budget.expected_accuracy(points, outcome["epochs_trained"]), abs=0.01)
    schedule = torch.load(tmp_path / "last.pth", weights_only=True)["schedule"]
    assert schedule["end_epoch"] == pytest.approx(outcome["epochs_trained"], abs=1e-3)  # trained to the moved end
    rates = [row["lr"] for row in history["epochs"]]
    assert rates == sorted(rates, reverse=True)  # stretched, never raised


def test_a_resumed_budget_keeps_its_tta_level_and_answers_only_a_tta_given_against_it(capsys):
    plan = {"budget": {"tta": 1}}
    assert train.final_tta(SimpleNamespace(tta=None), plan, resume=True) == 1 and capsys.readouterr().out == ""
    assert train.final_tta(SimpleNamespace(tta=2), plan, resume=True) == 1
    assert "uses test-time augmentation level 1, which the budget's forecast counted, not --tta 2" \
        in capsys.readouterr().out
    assert train.final_tta(SimpleNamespace(tta=None), {"budget": None}, resume=False) == train.DEFAULT_TTA

def test_a_budgeted_run_resumes_on_its_own_plan_and_counts_its_earlier_time(tiny_data, tmp_path):
    flags = ["--model", "SmallCifarNet", "--batch-size", "100", "--tta", "1", "--seed", "0", "--data-dir", tiny_data,
             "--small-crop-epochs", "1"]
    process = start_trainer("--budget", "18s", *flags, "--out-dir", tmp_path)
    wait_for_line(process, "[epoch 1/")
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 130, process.stderr.read()
    state = torch.load(tmp_path / "last.pth", weights_only=True)
    planned = state["plan"]
    assert planned["budget"]["seconds"] == 18 and state["seconds_spent"] > 0
    # The first epoch on small crops: the probe timed them, and the forecast counts their speed.
    probe, = planned["budget"]["probes"]
    assert planned["small_crop_epochs"] == 1 and planned["epochs"] >= 2
    assert planned["budget"]["small_crop_speedup"] == \
        pytest.approx(probe["small_crop_train_images_per_s"] / probe["train_images_per_s"], rel=1e-2)

    refused = run_cli("--resume", "--out-dir", tmp_path, "--budget", "1h")
    assert refused.returncode == 2 and "is a run with --budget 18 s, but --budget 1 h 0 min was given" in refused.stderr
    result = run_trainer("--resume", "--out-dir", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "[budget] probe" not in result.stdout  # the plan is the one chosen at the start
    assert f"[resume] --budget 18 s: {budget.duration_text(state['seconds_spent'])} spent before; training ends at " \
           f"epoch {state['schedule']['end_epoch']:.2f}" in result.stdout
    # The final evaluation's time is the forecast's, so is its test-time augmentation, not --tta's default (2); only
    # a --tta given against it is answered.
    assert "with test-time augmentation level 1 ---" in result.stdout and "which the budget's" not in result.stdout
    history = history_of(tmp_path)
    assert history["plan"]["epochs"] == planned["epochs"] and history["plan"]["model"] == planned["model"]
    assert any("resumed" in event for event in history["events"])
    outcome = history["final"]["budget"]
    assert outcome["seconds"] > state["seconds_spent"] and outcome["forecast_seconds"] <= 18
    assert json.loads((tmp_path / "report.json").read_text())["test"]["accuracy"] == outcome["test_acc_tta"]
    # The test set is evaluated at the end only, its plain figures (from the augmented pass's first view) filed with
    # the saved (last) epoch.
    rows = history["epochs"]
    assert len(rows) >= 2 and all(row["test_acc"] is None for row in rows[:-1])
    model, checkpoint = train.load_trained_model(tmp_path / "best_model.pth")
    autocast_dtype, _ = train.make_precision(history["plan"]["precision"], torch.device("cpu"))  # as the run evaluated
    plain_loss, plain_acc, _ = train.evaluate(model, *load_test_split(tiny_data), tta=0, autocast_dtype=autocast_dtype)
    augmented_loss, augmented_acc, _ = train.evaluate(model, *load_test_split(tiny_data), tta=1,
                                                      autocast_dtype=autocast_dtype)
    # A flip moves this small model's mean loss by only a few parts in 10,000 (0.03-0.07% seen), so the filed loss
    # must match the plain one to a part in a million: a looser check could not tell the plain and augmented apart.
    assert plain_loss != pytest.approx(augmented_loss, rel=1e-5)
    assert plain_acc == pytest.approx(checkpoint["test_acc"]) and checkpoint["epoch"] == rows[-1]["epoch"]
    assert rows[-1]["test_loss"] == pytest.approx(plain_loss, rel=1e-6)
    assert history["final"]["test_acc"] == rows[-1]["test_acc"] == checkpoint["test_acc"]
    assert history["final"]["test_acc_tta"] == pytest.approx(augmented_acc) and history["final"]["tta_level"] == 1
