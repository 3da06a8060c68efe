"""The evaluation report of a trained classifier: every metric computed from one confusion matrix.

The trainer counts the confusion matrix once (confusion_matrix), turns it into the report dict (metrics),
writes that dict as report.json, prints summary_table and draws confusion_png and misclassified_png.

The keys of the report dict (report.json); C is the number of classes, N the number of images:
    images              N, the number of images evaluated.
    accuracy            % of images classified correctly: trace / N * 100.
    top5                top-5 accuracy in %, as measured by the caller; null when not reported.
    per_class           one entry per class, in class order:
        class               the class name.
        images              the class's images (its row sum).
        accuracy            the class's recall in %.
        precision           correct / predicted as this class, 0..1; 0 for a class never predicted.
        recall              correct / images of this class, 0..1; 0 for a class with no images.
        f1                  2PR / (P + R), 0..1; 0 when P + R = 0.
        most_confused_with  the class this one is most often mistaken for (the largest off-diagonal entry of
                            its row; a tie goes to the lower class index); null when the row has no errors.
    class_accuracy      the spread of the per-class accuracies in %:
        mean, std           their mean and population standard deviation (ddof=0).
        worst, best         {"class", "accuracy"} of the lowest and highest (a tie goes to the lower index).
    macro               {"precision", "recall", "f1"}: unweighted means over the classes with images.
    weighted            {"precision", "recall", "f1"}: means weighted by each class's images (its support);
                        weighted recall equals accuracy / 100.
    cohen_kappa         (p_o - p_e) / (1 - p_e), with p_o = trace / N and p_e = sum_k(row_k * col_k) / N^2:
                        agreement beyond chance. 1.0 when p_e = 1, which happens only when every image is
                        of one class and predicted correctly.
    confusion           the C x C matrix as lists of ints: rows are the true class, columns the prediction.
    class_names         the C class names, in class order.
A class with no images in the evaluated split is left out of class_accuracy and macro (its recall is
undefined, not 0); it keeps its per_class entry and its column in the matrix.
"""
import io
import math

import numpy
import torch

MAX_CLASS_ROWS = 20  # more classes than this: the summary lists only the RANKED_ROWS worst and best
RANKED_ROWS = 5
MAX_ANNOTATED_CLASSES = 20  # more classes than this: no numbers in the heat map's cells, they would not fit
GRID_COLUMNS = 8


def confusion_matrix(labels, predictions, num_classes):
    """torch int64 tensor (num_classes, num_classes) on the CPU: rows are the true class, columns the predicted
    class. labels and predictions: 1-D int64 tensors on any device."""
    # Counted on the CPU: CUDA's bincount refuses to run under torch.use_deterministic_algorithms.
    cells = labels.cpu() * num_classes + predictions.cpu()
    return torch.bincount(cells, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def ratio(numerator, denominator):
    """numerator / denominator elementwise, 0 where the denominator is 0 (scikit-learn's zero_division=0)."""
    return torch.where(denominator > 0, numerator / denominator, 0.0)


def metrics(confusion, class_names, top5=None):
    """The report dict described in the module docstring, computed only from `confusion` (a (C, C) int tensor)
    and `top5`, the top-5 accuracy in % (None when not reported)."""
    counts = confusion.cpu().to(torch.int64)
    matrix = counts.to(torch.float64)
    correct = matrix.diagonal()
    support = matrix.sum(dim=1)
    predicted = matrix.sum(dim=0)
    total = matrix.sum()

    precision = ratio(correct, predicted)
    recall = ratio(correct, support)
    f1 = ratio(2 * precision * recall, precision + recall)
    has_images = support > 0

    errors = counts.clone()
    errors.fill_diagonal_(0)
    confused_index = errors.argmax(dim=1).tolist()
    row_has_errors = (errors.sum(dim=1) > 0).tolist()

    per_class = [
        {"class": name, "images": int(images), "accuracy": 100 * r, "precision": p, "recall": r, "f1": f,
         "most_confused_with": class_names[confused] if wrong else None}
        for name, images, p, r, f, confused, wrong in zip(
            class_names, counts.sum(dim=1).tolist(), precision.tolist(), recall.tolist(), f1.tolist(),
            confused_index, row_has_errors)]

    present = [entry for entry, keep in zip(per_class, has_images.tolist()) if keep]
    class_accuracies = 100 * recall[has_images]
    worst = min(present, key=lambda entry: entry["accuracy"])
    best = max(present, key=lambda entry: entry["accuracy"])

    # Exact integer arithmetic for kappa, so that the p_e = 1 case is recognised without a float tolerance.
    images = int(counts.sum())
    agreements = int(counts.trace())
    chance_agreements = int((counts.sum(dim=1) * counts.sum(dim=0)).sum())
    if chance_agreements == images * images:
        cohen_kappa = 1.0
    else:
        cohen_kappa = (agreements * images - chance_agreements) / (images * images - chance_agreements)

    return {
        "images": images,
        "accuracy": float(100 * correct.sum() / total),
        "top5": None if top5 is None else float(top5),
        "per_class": per_class,
        "class_accuracy": {
            "mean": float(class_accuracies.mean()),
            "std": float(class_accuracies.std(correction=0)),
            "worst": {"class": worst["class"], "accuracy": worst["accuracy"]},
            "best": {"class": best["class"], "accuracy": best["accuracy"]},
        },
        "macro": {"precision": float(precision[has_images].mean()), "recall": float(recall[has_images].mean()),
                  "f1": float(f1[has_images].mean())},
        "weighted": {"precision": float((precision * support).sum() / total),
                     "recall": float((recall * support).sum() / total),
                     "f1": float((f1 * support).sum() / total)},
        "cohen_kappa": float(cohen_kappa),
        "confusion": counts.tolist(),
        "class_names": list(class_names),
    }


def short_name(name, width=16):
    return name if len(name) <= width else name[:width - 3] + "..."


def summary_table(report, split):
    """A short printable table of `report` (a metrics() dict) on the named split ("test" or "validation")."""
    spread = report["class_accuracy"]
    worst, best = spread["worst"], spread["best"]
    top5 = "" if report["top5"] is None else f", top-5 {report['top5']:.2f}%"
    lines = [
        f"[report] {split}: {report['images']:,} images, accuracy {report['accuracy']:.2f}%{top5}",
        f"  class accuracy {spread['mean']:.2f}% +/- {spread['std']:.2f}%, "
        f"worst {short_name(worst['class'])} {worst['accuracy']:.2f}%, "
        f"best {short_name(best['class'])} {best['accuracy']:.2f}%",
        f"  macro F1 {report['macro']['f1']:.4f}, weighted F1 {report['weighted']['f1']:.4f}, "
        f"Cohen's kappa {report['cohen_kappa']:.4f}",
    ]

    header = (f"  {'class':<16} {'images':>7} {'accuracy':>9} {'precision':>9} {'recall':>7} {'F1':>7}  "
              f"most confused with")

    def row(entry):
        if entry["images"] == 0:  # no score to show: zeros would read as a class the model never gets right
            return f"  {short_name(entry['class']):<16} {0:>7}  (no images in this split: left out of the means)"
        confused = entry["most_confused_with"]
        return (f"  {short_name(entry['class']):<16} {entry['images']:>7,} {entry['accuracy']:>8.2f}% "
                f"{entry['precision']:>9.4f} {entry['recall']:>7.4f} {entry['f1']:>7.4f}  "
                f"{'-' if confused is None else short_name(confused)}")

    per_class = report["per_class"]
    if len(per_class) <= MAX_CLASS_ROWS:
        lines += ["", header, *map(row, per_class)]
    else:
        # Ranked among the classes with images, as class_accuracy is; sorted() is stable, so ties keep class order.
        ranked = sorted((entry for entry in per_class if entry["images"] > 0), key=lambda entry: entry["accuracy"])
        worst_rows = ranked[:RANKED_ROWS]
        best_rows = ranked[RANKED_ROWS:][-RANKED_ROWS:][::-1]
        lines += ["", f"  {len(worst_rows)} worst classes", header, *map(row, worst_rows),
                  "", f"  {len(best_rows)} best classes", header, *map(row, best_rows)]
    return "\n".join(lines)


# What a cross-validation's table shows of each fold (train.fold_result): key, column heading, decimals.
FOLD_COLUMNS = (("val_acc", "val accuracy %", 2), ("val_macro_f1", "val macro-F1", 4),
                ("val_kappa", "val kappa", 4), ("test_acc", "test accuracy %", 2))


def cross_validation_summary(results):
    """{key: {"mean", "std"}} over the folds (2 or more) for each of FOLD_COLUMNS; std is the sample standard
    deviation (ddof=1, as the spread of an estimate from K folds is usually given)."""
    summary = {}
    for key, _, _ in FOLD_COLUMNS:
        values = torch.tensor([result[key] for result in results], dtype=torch.float64)
        summary[key] = {"mean": float(values.mean()), "std": float(values.std(correction=1))}
    return summary


def cross_validation_table(results, summary):
    """A Markdown table: one row per fold (its saved epoch and FOLD_COLUMNS), then mean +/- std."""
    lines = ["| fold | saved epoch | " + " | ".join(heading for _, heading, _ in FOLD_COLUMNS) + " |",
             "|---:|---:|" + "---:|" * len(FOLD_COLUMNS)]
    for result in results:
        cells = [f"{result[key]:.{decimals}f}" for key, _, decimals in FOLD_COLUMNS]
        lines.append(f"| {result['fold']} | {result['epoch']} | " + " | ".join(cells) + " |")
    cells = [f"{summary[key]['mean']:.{decimals}f} ± {summary[key]['std']:.{decimals}f}"
             for key, _, decimals in FOLD_COLUMNS]
    lines.append("| mean ± std | | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def png_bytes(fig):
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def confusion_png(confusion, class_names, title):
    """PNG bytes: the row-normalised confusion matrix (% of each true class) as a heat map."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = confusion.cpu().to(torch.float64)
    percent = 100 * matrix / matrix.sum(dim=1, keepdim=True).clamp(min=1)  # a class without images: a row of 0
    num_classes = len(class_names)
    annotated = num_classes <= MAX_ANNOTATED_CLASSES
    # About a sixth of an inch a class keeps 100 tick labels in 6-point type apart.
    side = max(7.0, 0.17 * num_classes + 3)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    image = ax.imshow(percent.numpy(), cmap="Blues", vmin=0, vmax=100)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="% of the true class")
    ticks = range(num_classes)
    label_size = 9 if annotated else 6
    ax.set_xticks(ticks, class_names, rotation=45 if annotated else 90, ha="right" if annotated else "center",
                  fontsize=label_size)
    ax.set_yticks(ticks, class_names, fontsize=label_size)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    if annotated:
        for (true_class, predicted_class), value in numpy.ndenumerate(percent.numpy()):
            ax.text(predicted_class, true_class, f"{value:.1f}", ha="center", va="center", fontsize=7,
                    color="white" if value > 50 else "black")
    fig.tight_layout()
    return png_bytes(fig)


def most_confident_errors(labels, predictions, confidences, count):
    """Indices (int64 tensor) of the at most `count` images with predictions != labels, by the confidence of the
    wrong prediction, highest first; ties keep image order."""
    wrong = (predictions != labels).nonzero().flatten()
    order = torch.sort(confidences[wrong], descending=True, stable=True).indices
    return wrong[order[:count]]


def misclassified_png(images, labels, predictions, confidences, class_names, count=32):
    """PNG bytes: a grid of the `count` most confidently wrong images, each titled with its true and predicted
    class and the confidence in %; when nothing is wrong, a small figure that says so.
    images: uint8 CPU tensor (N, 3, H, W); labels, predictions: int64 (N,); confidences: float (N,) in 0..1,
    the probability of the predicted class."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = most_confident_errors(labels, predictions, confidences, count).tolist()
    if not chosen:
        fig, ax = plt.subplots(figsize=(4, 1))
        ax.text(0.5, 0.5, "No misclassified images", ha="center", va="center")
        ax.axis("off")
        return png_bytes(fig)

    columns = min(GRID_COLUMNS, len(chosen))
    rows = math.ceil(len(chosen) / columns)
    height = 2.2 * rows + 0.8
    fig, axes = plt.subplots(rows, columns, figsize=(1.8 * columns, height), squeeze=False)
    # Fixed margins instead of tight_layout, which costs seconds on 32 axes: 0.8 inch above the first row for the
    # suptitle and that row's two-line titles.
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.8 / height, wspace=0.1, hspace=0.3)
    for ax in axes.flat:
        ax.axis("off")
    for ax, index in zip(axes.flat, chosen):
        ax.imshow(images[index].permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(f"true {short_name(class_names[labels[index]], 14)}\n"
                     f"pred {short_name(class_names[predictions[index]], 14)} {100 * float(confidences[index]):.0f}%",
                     fontsize=8)
    fig.suptitle("Most confident mistakes")
    return png_bytes(fig)
