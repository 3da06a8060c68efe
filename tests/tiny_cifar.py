"""Write tiny CIFAR-10 and CIFAR-100 datasets in the official on-disk formats, for tests.

The images are learnable: each class has its own mean colour and a bright square in its own
corner region, plus noise, so a couple of epochs must beat chance by a wide margin.
"""
import pickle
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def make_images(labels, rng, num_classes=10):
    n = len(labels)
    images = rng.normal(0, 30, size=(n, 3, 32, 32))
    palette = np.linspace(40, 215, num_classes)
    for k in range(num_classes):
        chosen = labels == k
        images[chosen, k % 3] += palette[k]
        images[chosen, (k + 1) % 3] += palette[num_classes - 1 - k]
        spot = k % 16  # 16 square positions; beyond 16 classes, classes sharing one differ in colour
        row, col = 4 + 6 * (spot // 4), 4 + 8 * (spot % 4)
        images[chosen, :, row:row + 6, col:col + 6] += 120
    return np.clip(images + 60, 0, 255).astype(np.uint8)


def write_batch(path, labels, images, label="training batch"):
    batch = {"batch_label": label, "labels": [int(x) for x in labels], "data": images.reshape(len(images), 3 * 32 * 32),
             "filenames": [f"img_{i}.png" for i in range(len(images))]}
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)


def write_tiny_cifar(data_dir, per_batch=200, test_size=200, seed=0):
    """Create data_dir/cifar-10-batches-py/ with 5 training batches and a test batch. Returns that folder."""
    folder = Path(data_dir) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(1, 6):
        labels = rng.integers(0, 10, per_batch)
        write_batch(folder / f"data_batch_{i}", labels, make_images(labels, rng), f"training batch {i} of 5")
    labels = rng.integers(0, 10, test_size)
    write_batch(folder / "test_batch", labels, make_images(labels, rng), "testing batch 1 of 1")
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CLASS_NAMES, "num_cases_per_batch": per_batch, "num_vis": 3072}, f, protocol=2)
    return folder


def write_tiny_cifar100(data_dir, train_size=500, test_size=100, seed=0):
    """Create data_dir/cifar-100-python/ with train, test and meta as the official archive has them
    (100 fine classes, 20 coarse ones; the names are placeholders). Returns that folder."""
    folder = Path(data_dir) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, size, label in (("train", train_size, "training batch 1 of 1"),
                              ("test", test_size, "testing batch 1 of 1")):
        fine = rng.integers(0, 100, size)
        batch = {"filenames": [f"img_{i}.png" for i in range(size)], "batch_label": label,
                 "fine_labels": [int(x) for x in fine], "coarse_labels": [int(x) // 5 for x in fine],
                 "data": make_images(fine, rng, num_classes=100).reshape(size, 3 * 32 * 32)}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    meta = {"fine_label_names": [f"fine_{k:02d}" for k in range(100)],
            "coarse_label_names": [f"coarse_{k:02d}" for k in range(20)]}
    with open(folder / "meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return folder


def write_archive(folder, archive):
    """A .tar.gz of folder, holding it under its own name as the official archives do. Returns the archive."""
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=Path(folder).name)
    return Path(archive)


COLOURS = {"cat": (220, 30, 30), "dog": (30, 220, 30), "fox": (30, 30, 220)}  # the label shows in the pixels
SHAPES = (("png", (32, 32)), ("jpg", (40, 28)), ("bmp", (64, 64)))  # format, (width, height)


def write_image_split(split_dir, per_class, seed=0):
    """An image folder's split (DIR/train or DIR/test): per_class images of each class, in mixed formats and sizes,
    at three depths inside the class folder."""
    rng = np.random.default_rng(seed)
    for name, colour in COLOURS.items():
        for i in range(per_class):
            extension, (width, height) = SHAPES[i % 3]
            folder = split_dir / name / ("", "a", "a/b")[i % 3]
            folder.mkdir(parents=True, exist_ok=True)
            pixels = np.clip(np.array(colour) + rng.integers(-25, 25, (height, width, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:03d}.{extension.upper() if i % 4 == 0 else extension}")
