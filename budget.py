"""--budget: what the trainer knows of accuracy against epochs, and the choice of what to train in a given time.

Pure functions, no torch: train.py measures this machine (its throughput probe), this module forecasts each
candidate's time and accuracy and chooses; tests/test_budget.py drives it with made-up probes.

The knowledge is bench/accuracy_table.json: for each configuration (model, width, precision, batch, backprop
fraction, small-crop epochs, device type), test accuracy with TTA after E epochs, measured here by
bench/accuracy_table.py (an entry from elsewhere names its source). Accuracy between two points is interpolated
linearly in 1/epochs; outside the measured epochs it is not forecast.
"""
from __future__ import annotations

import bisect
import json
import math
import re
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

ACCURACY_TABLE = Path(__file__).resolve().parent / "bench" / "accuracy_table.json"
TABLE_DATASET = "cifar10"  # the table's accuracies are CIFAR-10's; other data gets epochs chosen by time alone
TABLE_TTA = 2  # the test-time augmentation level of the table's accuracy (train.py --tta)
MARGIN = 0.04  # of the budget, kept free: the forecast's error and the pace control's room to react
EPOCH_RESOLUTION = 10  # epochs are chosen in tenths: a run may end part-way through its last epoch
MAX_EPOCHS_BY_TIME = 50  # without measured accuracy, at most this many epochs (airbench96, the longest recipe, ~46)
DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(sec|min|s|m|h)\s*")  # one part of 1h30m
UNIT_SECONDS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}


def parse_duration(text):
    """'90s', '10m', '1.5h', '1h30m' -> seconds. A bare number is refused: minutes or seconds would be a guess."""
    text = text.strip().lower()
    if not re.fullmatch(f"(?:{DURATION.pattern})+", text):
        raise ValueError(f"{text!r} is not a duration such as 90s, 10m, 1.5h or 1h30m")
    return sum(float(number) * UNIT_SECONDS[unit] for number, unit in DURATION.findall(text))


def duration_text(seconds):
    """12 min 5 s, 1 h 3 min, 45 s; 0.1 s."""
    if seconds < 0.5:
        return f"{seconds:.1g} s"
    seconds = math.floor(seconds + 0.5)  # halves up: round() would print 564.5 and 564.54 a second apart
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


@dataclass(frozen=True)
class Candidate:
    """A configuration the chooser may pick: how to train, and what the table says it reaches."""
    model: str
    model_kwargs: dict
    precision: str
    batch_size: int
    backprop_fraction: float = 1.0  # of each batch, its hardest examples (train.training_step)
    small_crop_epochs: int = 0  # the first epochs, on small crops (train.TrainBatches)
    points: tuple = ()  # ((epochs, test accuracy % with TTA), ...) sorted by epochs; () when not known
    source: str = ""  # where the points come from, said with the forecast

    @property
    def label(self):
        kwargs = ", ".join(f"{k}={v}" for k, v in self.model_kwargs.items())
        hardest = f", hardest {self.backprop_fraction:.0%} backpropagated" if self.backprop_fraction < 1 else ""
        crops = f", first {self.small_crop_epochs} epoch{'s' * (self.small_crop_epochs > 1)} on small crops" \
            if self.small_crop_epochs else ""
        return f"{self.model}({kwargs}) {self.precision}, batch {self.batch_size}{hardest}{crops}"


@dataclass(frozen=True)
class Probe:
    """What the throughput probe measured for a candidate on this machine."""
    train_images_per_s: float  # while the stem bias trains (the first Workload.stem_bias_epochs)
    eval_images_per_s: float
    save_seconds: float  # writing an epoch's checkpoints of the candidate's model
    frozen_stem_train_images_per_s: float  # once it freezes: quicker, the conv after the stem skips its input gradient
    small_crop_train_images_per_s: float | None = None  # on small crops, the stem bias training; None: not probed
    batch_size: int = 0  # images a training step the speeds above hold for (0: not said, any batch's)
    update_seconds: float = 0.0  # a training step's optimiser update, as long at any batch

    @property
    def frozen_stem_speedup(self):
        return self.frozen_stem_train_images_per_s / self.train_images_per_s

    @property
    def small_crop_speedup(self):
        return self.small_crop_train_images_per_s / self.train_images_per_s if self.small_crop_train_images_per_s \
            else 1.0


def at_batch(probe, batch_size):
    """The probe's training speeds for steps of batch_size images. A step's time, less its optimiser update, grows
    with its images; the update's does not (Muon orthogonalises each filter matrix once a step). A CPU probes steps
    of fewer images than its runs take, and read per image as they were, its speeds read a run's 2000-image steps
    slow (bench/RESULTS.md, thirtieth session)."""
    if not probe.batch_size or batch_size == probe.batch_size:
        return probe

    def speed(images_per_s):
        if not images_per_s:
            return images_per_s
        per_image = (probe.batch_size / images_per_s - probe.update_seconds) / probe.batch_size
        return batch_size / (per_image * batch_size + probe.update_seconds)

    return replace(probe, train_images_per_s=speed(probe.train_images_per_s),
                   frozen_stem_train_images_per_s=speed(probe.frozen_stem_train_images_per_s),
                   small_crop_train_images_per_s=speed(probe.small_crop_train_images_per_s), batch_size=batch_size)


@dataclass(frozen=True)
class Workload:
    """What a run does besides training steps, in images and seconds, for the forecast."""
    train_images: int  # per epoch (the ragged last batch is dropped, as training does)
    eval_images: int  # evaluated after every epoch: the validation split, if any (the test set waits for the end)
    final_eval_images: int  # evaluated once at the end, each image seen tta_passes times: test, and validation if any
    spent_seconds: float  # since the process started, up to the choice (start-up, data, probe)
    curves_seconds: float  # drawing the training curves, which the trainer does once in curves_every_seconds at most
    curves_every_seconds: float
    report_seconds: float  # the report's figures and the last saves
    stem_bias_epochs: int  # epochs trained at the probe's first speed; the later ones run at its frozen-stem speed


@dataclass(frozen=True)
class Option:
    candidate: Candidate
    probe: Probe
    epochs: float
    seconds: float  # forecast wall time of the whole run, from process start
    accuracy: float | None  # forecast test accuracy with TTA, None where the table has nothing


@dataclass(frozen=True)
class Choice:
    best: Option
    runner_up: Option | None  # the best option of another configuration
    beyond_table: bool  # the budget allows more than the table's longest run of the chosen configuration


class NoFit(Exception):
    """Nothing fits the budget; smallest_budget is the least that would (seconds)."""

    def __init__(self, smallest_budget, quickest):
        super().__init__(smallest_budget)
        self.smallest_budget, self.quickest = smallest_budget, quickest


def load_table(path=ACCURACY_TABLE):
    return json.loads(Path(path).read_text())["configurations"]


def table_candidates(table, device_type, precision, model=None, width_mult=None):
    """The table's configurations for this device type ('cpu' or 'cuda') and precision, optionally one model."""
    found = []
    for entry in table:
        if entry["device_type"] != device_type or entry["precision"] != precision:
            continue
        if model is not None and entry["model"] != model:
            continue
        if width_mult is not None and entry["model_kwargs"].get("width_mult") != width_mult:
            continue
        points = entry_points(entry)
        source = entry["source"] if entry["source"] != "measured" else \
            f"bench/accuracy_table.json, measured here on {entry['points'][0]['data']}"
        found.append(Candidate(entry["model"], dict(entry["model_kwargs"]), entry["precision"], entry["batch_size"],
                               entry["backprop_fraction"], entry["small_crop_epochs"], points, source))
    return found


def entry_points(entry):
    """A table entry's ((epochs, accuracy with TTA), ...) for the forecast: the mean of the seeds run for each epoch
    count (one seed's accuracy varies by a few tenths of a point from another's, bench/RESULTS.md), then rising."""
    by_epochs = {}
    for point in entry["points"]:
        by_epochs.setdefault(point["epochs"], []).append(point["test_acc_tta"])
    return rising(sorted((epochs, statistics.fmean(accuracies)) for epochs, accuracies in by_epochs.items()))


def rising(points):
    """The points, less any whose accuracy is not above every point at fewer epochs. Such a point is seed noise
    (measured: 86.62% after 4 epochs, 86.55% after 5, one seed each), and kept, it would make the chooser stop at
    the earlier point with time to spare; left out, accuracy is interpolated between its neighbours. A last point
    left out also lowers the longest run the chooser and the pace control may go to."""
    kept = []
    for epochs, accuracy in points:
        if not kept or accuracy > kept[-1][1]:
            kept.append((epochs, accuracy))
    return tuple(kept)


def expected_accuracy(points, epochs):
    """Interpolation between the measured points, linear in 1/epochs; None outside them (no silent extrapolation).
    Between two points accuracy rises steeply, then flattens, as A - B/epochs does: a straight line in epochs read
    most of the table's inner points low (bench/RESULTS.md, eighteenth session)."""
    for (e0, a0), (e1, a1) in zip(points, points[1:]):
        if e0 <= epochs <= e1:
            return a0 + (a1 - a0) * (1 / e0 - 1 / epochs) / (1 / e0 - 1 / e1)
    if points and epochs == points[0][0] == points[-1][0]:
        return points[0][1]
    return None


def tta_passes(tta):
    """Forward passes per image of the final evaluation at each --tta level (train.predict)."""
    return {0: 1, 1: 2, 2: 6}[tta]


def epoch_overhead_seconds(probe, workload):
    """After each epoch: its evaluation, its checkpoints and its share of the curves' drawings (an epoch shorter than
    curves_every_seconds draws them at some epochs only)."""
    curves_share = min(1.0, workload.train_images / probe.train_images_per_s / workload.curves_every_seconds)
    return workload.eval_images / probe.eval_images_per_s + probe.save_seconds + curves_share * workload.curves_seconds


def final_seconds(probe, workload, tta):
    """After the last epoch: the evaluation with test-time augmentation (its first view gives the plain figures),
    the report and the last saves."""
    return tta_passes(tta) * workload.final_eval_images / probe.eval_images_per_s + workload.report_seconds


def step_seconds_ratio(epoch, stem_bias_epochs, small_crop_epochs, frozen_stem_speedup, small_crop_speedup):
    """A training step's time in `epoch` against a step on whole images while the stem bias trains: quicker once
    it freezes, and on small crops. Frozen-stem steps on crops, not probed, are taken as quicker by both ratios."""
    ratio = 1 / frozen_stem_speedup if epoch >= stem_bias_epochs else 1.0
    return ratio / small_crop_speedup if epoch < small_crop_epochs else ratio


def training_seconds(probe, workload, epochs, small_crop_epochs=0):
    """The training steps of `epochs`: the first small_crop_epochs on crops, the first stem_bias_epochs while the
    stem bias trains, each part at its measured speed."""
    ends = sorted({epochs, *(end for end in (small_crop_epochs, workload.stem_bias_epochs) if end < epochs)})
    return sum(workload.train_images * (end - start) / probe.train_images_per_s
               * step_seconds_ratio(start, workload.stem_bias_epochs, small_crop_epochs, probe.frozen_stem_speedup,
                                    probe.small_crop_speedup)
               for start, end in zip([0, *ends], ends))


def forecast_seconds(probe, workload, epochs, tta, small_crop_epochs=0):
    """Wall time of a run of `epochs` (fractional: the last epoch cut short), from process start to exit."""
    return (workload.spent_seconds + training_seconds(probe, workload, epochs, small_crop_epochs)
            + math.ceil(epochs - 1e-9) * epoch_overhead_seconds(probe, workload) + final_seconds(probe, workload, tta))


def epoch_grid(candidate, by_time):
    """The epoch counts the chooser considers: tenths within the measured points, or (by_time) from one epoch on
    whole images up."""
    if by_time:
        low, high = 1.0 + candidate.small_crop_epochs, float(MAX_EPOCHS_BY_TIME)
    else:
        low, high = candidate.points[0][0], candidate.points[-1][0]
    return [k / EPOCH_RESOLUTION for k in range(round(low * EPOCH_RESOLUTION), round(high * EPOCH_RESOLUTION) + 1)]


def choose(candidates, probes, workload, budget_seconds, tta, by_time=False):
    """The option of best forecast accuracy whose forecast time fits the budget less its margin, and the best option
    of another configuration. by_time: no accuracy is known (another dataset, a model without table points), so the
    most epochs that fit win (one candidate). Raises NoFit with the smallest budget that would fit.

    candidates and probes are parallel lists; a probe of None (the candidate ran out of memory) is left out."""
    limit = budget_seconds * (1 - MARGIN)
    best_per_candidate, quickest = [], None
    for candidate, probe in zip(candidates, probes):
        if probe is None or not (by_time or candidate.points):
            continue
        options = [Option(candidate, probe, epochs,
                          forecast_seconds(probe, workload, epochs, tta, candidate.small_crop_epochs),
                          None if by_time else expected_accuracy(candidate.points, epochs))
                   for epochs in epoch_grid(candidate, by_time)]
        if quickest is None or options[0].seconds < quickest.seconds:
            quickest = options[0]
        fitting = [o for o in options if o.seconds <= limit]
        if fitting:
            best = max(fitting, key=lambda o: (o.epochs if by_time else o.accuracy, -o.seconds))
            best_per_candidate.append((best, best.epochs == options[-1].epochs))
    if not best_per_candidate:
        if quickest is None:
            raise ValueError("no candidate with a probe and table points")
        raise NoFit(quickest.seconds / (1 - MARGIN), quickest)
    ranked = sorted(best_per_candidate, key=lambda pair: (pair[0].epochs if by_time else pair[0].accuracy,
                                                          -pair[0].seconds), reverse=True)
    (best, at_the_end), runner_up = ranked[0], ranked[1][0] if len(ranked) > 1 else None
    return Choice(best, runner_up, at_the_end and not by_time)


def best_forecast_accuracy(candidates, probes, workload, budget_seconds, tta):
    """The best forecast accuracy of these candidates (parallel probes, None: not measured) within the budget; None
    where none of them has a probe, table points and a run that fits."""
    try:
        return choose(candidates, probes, workload, budget_seconds, tta).best.accuracy
    except (NoFit, ValueError):
        return None


def paced_final_step(step, final_step, longest_step, steps_per_epoch, seconds_left, budget_seconds, step_paces,
                     epoch_overhead_seconds, final_seconds):
    """The pace control's decision at `step`, part-way through an epoch, with seconds_left before the deadline: the
    step at which training should now end, or None to keep final_step. step_paces: ((from step, seconds a step),
    ...), in order, the first from `step`: the steps from each on take its seconds (small crops, then whole images,
    then the stem bias frozen).

    Ending at a step leaves, at those paces, some seconds spare before the deadline. While the
    planned end leaves between MARGIN/2 and 3*MARGIN/2 of the budget spare, it stays. Outside that band it moves to
    the last step that leaves a whole MARGIN: sooner when the run is behind (a noisy machine, or a probe that
    measured it faster than its epochs run), later when it is ahead, but never past longest_step, the table's
    longest run of this configuration: beyond it accuracy is not known. The band keeps small swings of the measured
    pace from moving it."""
    starts = [start for start, _ in step_paces]

    def spare(end_step):  # falls as end_step grows
        epoch_ends = -(-end_step // steps_per_epoch) - step // steps_per_epoch  # this epoch's end and later ones'
        steps_seconds = sum(max(0, min(end_step, until) - start) * pace
                            for (start, pace), until in zip(step_paces, [*starts[1:], end_step]))
        return seconds_left - steps_seconds - epoch_ends * epoch_overhead_seconds - final_seconds

    behind = spare(final_step) < MARGIN / 2 * budget_seconds
    ahead = spare(final_step) > 3 * MARGIN / 2 * budget_seconds and final_step < longest_step
    if not (behind or ahead):
        return None
    ends = range(step + 1, max(final_step, longest_step) + 1)
    too_late = bisect.bisect_left(ends, True, key=lambda end_step: spare(end_step) < MARGIN * budget_seconds)
    new_final_step = ends[max(too_late - 1, 0)]  # at least one more step: the schedule must end after this one
    return None if new_final_step == final_step else new_final_step
