"""How well `--budget` forecasts accuracy between two table points: each inner point of bench/accuracy_table.json
forecast from its two neighbours, and its error, interpolating linearly in epochs**p for a few powers p (p = 0:
log epochs), and as the trainer does (budget.expected_accuracy).

    python bench/interpolation.py

The neighbours of a point left out are further apart than the points a forecast falls between, so the errors here
are larger than the chooser's. Reads the table only: no training, seconds.
"""
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import budget  # noqa: E402

POWERS = (1, 0.5, 0, -0.5, -1, -1.5)  # 1: a straight line in epochs


def along(power):
    """Interpolation between two points linearly in epochs**power (log epochs at 0)."""
    def scale(epochs):  # rising with epochs for every power
        return math.log(epochs) if power == 0 else math.copysign(epochs ** power, power)

    def forecast(neighbours, epochs):
        (e0, a0), (e1, a1) = neighbours
        return a0 + (a1 - a0) * (scale(epochs) - scale(e0)) / (scale(e1) - scale(e0))
    return forecast


def left_out_errors(points, forecast):
    """Forecast minus measured accuracy of each inner point, from its neighbours."""
    return [forecast((before, after), epochs) - accuracy
            for before, (epochs, accuracy), after in zip(points, points[1:], points[2:])]


def main():
    curves = {}
    for entry in budget.load_table():
        points = budget.entry_points(entry)
        label = budget.Candidate(entry["model"], entry["model_kwargs"], entry["precision"], entry["batch_size"],
                                 entry["backprop_fraction"], entry["small_crop_epochs"]).label
        curves[f"{label} ({entry['device_type']})"] = points
    print("interpolation | points | mean error | mean |error| | largest |error| | forecast above measured")
    ways = [(f"epochs**{power:g}", along(power)) for power in POWERS] + [("the trainer's", budget.expected_accuracy)]
    for name, forecast in ways:
        errors = [e for points in curves.values() for e in left_out_errors(points, forecast)]
        print(f"{name:13} | {len(errors):6d} | {statistics.mean(errors):+10.2f} | "
              f"{statistics.mean(map(abs, errors)):12.2f} | {max(map(abs, errors)):15.2f} | "
              f"{sum(e > 0 for e in errors)}")
    print("\nper point, forecast minus measured: a straight line in epochs / the trainer's")
    for label, points in curves.items():
        for (epochs, accuracy), linear, trainer in zip(points[1:], left_out_errors(points, along(1)),
                                                       left_out_errors(points, budget.expected_accuracy)):
            print(f"  {label}, {epochs:g} epochs, {accuracy:.2f}%: {linear:+.2f} / {trainer:+.2f}")


if __name__ == "__main__":
    main()
