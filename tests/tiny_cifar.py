"""Write tiny CIFAR-10 datasets in the official on-disk format, for tests.

The images are learnable: each class has its own mean colour and a bright square in its own
corner region, plus noise, so a couple of epochs must beat chance by a wide margin.
"""
import pickle
from pathlib import Path

import numpy as np

CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def make_images(labels, rng):
    n = len(labels)
    images = rng.normal(0, 30, size=(n, 3, 32, 32))
    palette = np.linspace(40, 215, 10)
    for k in range(10):
        chosen = labels == k
        images[chosen, k % 3] += palette[k]
        images[chosen, (k + 1) % 3] += palette[9 - k]
        row, col = 4 + 6 * (k // 4), 4 + 8 * (k % 4)
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
