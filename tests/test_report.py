"""The evaluation report against small confusion matrices whose metrics were worked out by hand."""
import io
import json

import pytest
import torch
from PIL import Image

import report
from report import confusion_matrix, confusion_png, metrics, misclassified_png, most_confident_errors, summary_table

# Rows are the true class, columns the prediction. Row sums (images) 5, 4, 3; column sums (predicted) 7, 3, 2.
THREE_CLASSES = [[4, 1, 0],
                 [2, 2, 0],
                 [1, 0, 2]]
NAMES = ["cat", "dog", "frog"]


def close(value):
    return pytest.approx(value, abs=1e-6)


def three_class_report(top5=None):
    return metrics(torch.tensor(THREE_CLASSES), NAMES, top5=top5)


def test_confusion_matrix_counts_label_prediction_pairs():
    labels = torch.tensor([2, 0, 1, 0, 0, 1, 2, 0, 1, 0, 2, 1])
    predictions = torch.tensor([2, 0, 0, 1, 0, 1, 0, 0, 1, 0, 2, 0])
    confusion = confusion_matrix(labels, predictions, 4)  # class 3 has neither images nor predictions
    assert confusion.dtype == torch.int64 and confusion.device.type == "cpu"
    assert confusion.tolist() == [[4, 1, 0, 0], [2, 2, 0, 0], [1, 0, 2, 0], [0, 0, 0, 0]]


def test_three_classes_per_class():
    per_class = three_class_report()["per_class"]
    assert [entry["class"] for entry in per_class] == NAMES
    assert [entry["images"] for entry in per_class] == [5, 4, 3]
    assert [entry["accuracy"] for entry in per_class] == [close(80.0), close(50.0), close(66.666667)]
    assert [entry["precision"] for entry in per_class] == [close(0.571429), close(0.666667), close(1.0)]  # 4/7 2/3 1
    assert [entry["recall"] for entry in per_class] == [close(0.8), close(0.5), close(0.666667)]  # 4/5 1/2 2/3
    assert [entry["f1"] for entry in per_class] == [close(0.666667), close(0.571429), close(0.8)]  # 2/3 4/7 4/5
    assert [entry["most_confused_with"] for entry in per_class] == ["dog", "cat", "cat"]


def test_three_classes_summary_metrics():
    result = three_class_report()
    assert result["images"] == 12
    assert result["accuracy"] == close(66.666667)  # 8 / 12
    assert result["top5"] is None
    assert result["macro"] == {"precision": close(0.746032), "recall": close(0.655556),  # 47/63, 59/90
                               "f1": close(0.679365)}  # 214/315
    assert result["weighted"] == {"precision": close(0.710317), "recall": close(0.666667),  # 179/252, 2/3
                                  "f1": close(0.668254)}  # 421/630
    assert result["cohen_kappa"] == close(0.472527)  # p_o 96/144, p_e 53/144: 43/91
    assert result["class_accuracy"] == {"mean": close(65.555556), "std": close(12.272623),  # 59/90, sqrt(122)/90
                                        "worst": {"class": "dog", "accuracy": close(50.0)},
                                        "best": {"class": "cat", "accuracy": close(80.0)}}
    assert result["confusion"] == THREE_CLASSES and result["class_names"] == NAMES


def test_report_is_plain_json_and_every_key_documented():
    result = three_class_report(top5=97.5)
    assert result["top5"] == 97.5
    assert json.loads(json.dumps(result)) == result
    assert all(type(value) is int for row in result["confusion"] for value in row)
    keys = {*result, *result["per_class"][0], *result["class_accuracy"], *result["macro"]}
    assert [key for key in keys if key not in report.__doc__] == []


def test_perfect_classifier():
    result = metrics(torch.tensor([[3, 0], [0, 5]]), ["a", "b"])
    assert result["accuracy"] == 100.0 and result["cohen_kappa"] == 1.0
    assert result["macro"]["f1"] == 1.0 and result["weighted"]["f1"] == 1.0
    assert [entry["most_confused_with"] for entry in result["per_class"]] == [None, None]
    assert result["class_accuracy"]["std"] == 0.0


def test_single_class_all_correct_has_kappa_one():
    assert metrics(torch.tensor([[4]]), ["only"])["cohen_kappa"] == 1.0  # p_e = 1: 0 / 0 by the formula


def test_class_never_predicted_has_precision_zero():
    result = metrics(torch.tensor([[2, 0, 1], [1, 0, 1], [0, 0, 3]]), NAMES)
    never_predicted = result["per_class"][1]
    assert (never_predicted["precision"], never_predicted["recall"], never_predicted["f1"]) == (0.0, 0.0, 0.0)
    # dog's errors tie between cat and frog: the lower index wins.
    assert [entry["most_confused_with"] for entry in result["per_class"]] == ["frog", "cat", None]
    assert result["macro"]["precision"] == close(0.422222)  # (2/3 + 0 + 3/5) / 3
    assert result["cohen_kappa"] == close(0.4)  # p_o 40/64, p_e 24/64
    assert result["class_accuracy"]["worst"] == {"class": "dog", "accuracy": 0.0}


def test_class_without_images_is_left_out_of_class_accuracy_and_macro():
    result = metrics(torch.tensor([[2, 1, 0], [0, 0, 0], [1, 0, 3]]), NAMES)
    empty = result["per_class"][1]
    assert empty == {"class": "dog", "images": 0, "accuracy": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0,
                     "most_confused_with": None}
    assert result["class_accuracy"] == {"mean": close(70.833333), "std": close(4.166667),  # of 2/3 and 3/4
                                        "worst": {"class": "cat", "accuracy": close(66.666667)},
                                        "best": {"class": "frog", "accuracy": close(75.0)}}
    assert result["macro"] == {"precision": close(0.833333), "recall": close(0.708333),  # 5/6, 17/24
                               "f1": close(0.761905)}  # (2/3 + 6/7) / 2
    assert result["weighted"] == {"precision": close(0.857143), "recall": close(0.714286),  # 6/7, 5/7
                                  "f1": close(0.775510)}  # 38/49
    assert result["cohen_kappa"] == close(0.5)  # p_o 35/49, p_e 21/49
    dog_row = next(line for line in summary_table(result, "test").splitlines() if line.split()[:1] == ["dog"])
    assert dog_row.split()[1:] == ["0", "(no", "images", "in", "this", "split:", "left", "out", "of", "the", "means)"]


def class_rows(table, prefix):
    return [line.split()[0] for line in table.splitlines() if line.split() and line.split()[0].startswith(prefix)]


def test_summary_table_has_the_key_numbers():
    table = summary_table(three_class_report(top5=97.5), "test")
    for text in ["test", "12 images", "66.67%", "top-5 97.50%", "65.56% +/- 12.27%", "worst dog 50.00%",
                 "best cat 80.00%", "macro F1 0.6794", "weighted F1 0.6683", "kappa 0.4725"]:
        assert text in table
    cat_row = next(line for line in table.splitlines() if line.split()[:1] == ["cat"]).split()
    assert cat_row == ["cat", "5", "80.00%", "0.5714", "0.8000", "0.6667", "dog"]
    assert class_rows(table, "frog") == ["frog"] and "top-5" not in summary_table(three_class_report(), "validation")


def hundred_classes():
    # Class k has 100 images, k + 1 of them right and the rest predicted as class k + 1: accuracy k + 1 %.
    confusion = torch.zeros(100, 100, dtype=torch.int64)
    for k in range(100):
        confusion[k, k] = k + 1
        confusion[k, (k + 1) % 100] += 99 - k
    return confusion, [f"fine_{k:02d}" for k in range(100)]


def test_summary_table_for_100_classes_lists_only_the_5_worst_and_5_best():
    confusion, names = hundred_classes()
    table = summary_table(metrics(confusion, names), "test")
    assert class_rows(table, "fine_") == ["fine_00", "fine_01", "fine_02", "fine_03", "fine_04",
                                          "fine_99", "fine_98", "fine_97", "fine_96", "fine_95"]
    assert max(map(len, table.splitlines())) < 100


def test_summary_table_truncates_long_class_names():
    names = ["a class name far too long for any table", "short"]
    table = summary_table(metrics(torch.tensor([[3, 1], [0, 4]]), names), "test")
    assert names[0] not in table and "a class name ..." in table
    assert max(map(len, table.splitlines())) < 100


def png_size(data):
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image.size


def test_confusion_png_for_10_and_100_classes():
    ten = torch.eye(10, dtype=torch.int64) * 90 + 1
    ten_size = png_size(confusion_png(ten, [f"class {k}" for k in range(10)], "CIFAR-10 test"))
    hundred_size = png_size(confusion_png(*hundred_classes(), "CIFAR-100 test"))
    assert hundred_size[0] > ten_size[0] and hundred_size[1] > ten_size[1]


def test_most_confident_errors_picks_wrong_images_by_confidence():
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    predictions = torch.tensor([0, 2, 2, 0, 1, 5])  # wrong: 1, 3 and 4
    confidences = torch.tensor([0.99, 0.6, 0.95, 0.9, 0.6, 0.99])
    assert most_confident_errors(labels, predictions, confidences, 2).tolist() == [3, 1]
    assert most_confident_errors(labels, predictions, confidences, 32).tolist() == [3, 1, 4]  # a tie keeps order


def test_misclassified_png_with_and_without_errors():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (40,), generator=generator)
    confidences = torch.rand(40, generator=generator)
    names = [f"class {k}" for k in range(10)]
    with_errors = png_size(misclassified_png(images, labels, (labels + 1) % 10, confidences, names))
    without_errors = png_size(misclassified_png(images, labels, labels, confidences, names))
    assert with_errors[0] > without_errors[0] and with_errors[1] > without_errors[1]
