"""CIFAR-10's loader reads the real on-disk format and rejects broken files clearly; training batches are
augmented correctly. (Downloads, CIFAR-100 and image folders: test_datasets.py.)"""
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from datasets import DATASETS, DataError, load_dataset
from tiny_cifar import write_batch, write_tiny_cifar
from train import DEFAULT_DATA_DIR, TrainBatches, translate_batch

CIFAR10 = DATASETS["cifar10"]
NORMALIZATION = (CIFAR10.mean, CIFAR10.std)


def test_loader_reads_official_format(tiny_data):
    data = load_dataset(CIFAR10, tiny_data)
    train_x, train_y, test_x, test_y = data.train_images, data.train_labels, data.test_images, data.test_labels
    assert data.class_names[0] == "airplane"
    assert train_x.shape == (1000, 3, 32, 32) and train_x.dtype == torch.uint8
    assert test_x.shape == (200, 3, 32, 32) and test_y.dtype == torch.int64
    # Pixel layout: the pickle's 3072 bytes are the R plane, then G, then B (row-major).
    with open(tiny_data / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="latin1")
    assert torch.equal(train_x[0, 1, 2], torch.from_numpy(raw["data"][0, 1024 + 64:1024 + 96]))
    assert train_y[:200].tolist() == raw["labels"]


@pytest.fixture
def data_copy(tmp_path):
    write_tiny_cifar(tmp_path, per_batch=20, test_size=20)
    return tmp_path / "cifar-10-batches-py"


def assert_load_refused(folder, match):
    with pytest.raises(DataError, match=match) as info:
        load_dataset(CIFAR10, folder.parent)
    assert str(folder) in str(info.value)


def test_truncated_file(data_copy):
    path = data_copy / "data_batch_3"
    path.write_bytes(path.read_bytes()[:5000])
    assert_load_refused(data_copy, "data_batch_3 is truncated")


def test_not_a_pickle(data_copy):
    (data_copy / "test_batch").write_text("hello, I am not a pickle")
    assert_load_refused(data_copy, "test_batch is truncated or not a CIFAR-10 pickle")


def test_missing_file(data_copy):
    (data_copy / "data_batch_5").unlink()
    assert_load_refused(data_copy, "data_batch_5 is missing")


def test_wrong_shape(data_copy):
    with open(data_copy / "data_batch_2", "wb") as f:
        pickle.dump({"data": np.zeros((20, 100), np.uint8), "labels": [0] * 20}, f)
    assert_load_refused(data_copy, r"data_batch_2 is not valid: its images have shape \(20, 100\)")


def test_labels_out_of_range(data_copy):
    write_batch(data_copy / "data_batch_1", np.array([3] * 19 + [10]), np.zeros((20, 3, 32, 32), np.uint8))
    assert_load_refused(data_copy, r"labels range over 3..10")


def test_label_count_mismatch(data_copy):
    write_batch(data_copy / "data_batch_1", np.array([3] * 5), np.zeros((20, 3, 32, 32), np.uint8))
    assert_load_refused(data_copy, "5 labels for 20 images")


def test_batch_file_that_is_a_folder(data_copy):
    (data_copy / "test_batch").unlink()
    (data_copy / "test_batch").mkdir()
    assert_load_refused(data_copy, r"test_batch cannot be read \(Is a directory\)")


def test_labels_that_are_not_integers(data_copy):
    with open(data_copy / "data_batch_3", "wb") as f:
        pickle.dump({"data": np.zeros((20, 3072), np.uint8), "labels": np.linspace(0, 9, 20)}, f, protocol=2)
    assert_load_refused(data_copy, "its labels are of type float64, expected integers 0..9")


def test_batch_with_no_images(data_copy):
    write_batch(data_copy / "test_batch", np.zeros(0, np.int64), np.zeros((0, 3, 32, 32), np.uint8))
    assert_load_refused(data_copy, "test_batch is not valid: it holds no images")


def test_pickle_of_wrong_type(data_copy):
    with open(data_copy / "data_batch_4", "wb") as f:
        pickle.dump([1, 2, 3], f)
    assert_load_refused(data_copy, "no 'data' and 'labels'")


def test_loader_reads_the_jpeg_copy_when_built():
    """The shared build script's output is the real archive's format; check the loader on it if present."""
    folder = Path(DEFAULT_DATA_DIR)
    if not (folder / "cifar-10-batches-py" / "test_batch").exists():
        pytest.skip("full CIFAR-10 not built here (python ../shared/cifar10/build.py data)")
    data = load_dataset(CIFAR10, folder)
    assert data.train_images.shape == (50000, 3, 32, 32) and data.test_images.shape == (10000, 3, 32, 32)
    assert torch.bincount(data.train_labels).tolist() == [5000] * 10


def test_translate_with_zero_shift_is_identity_and_shifts_move_pixels():
    images = torch.randn(4, 3, 32, 32)
    zero = torch.zeros(4, 2, dtype=torch.long)
    assert torch.equal(translate_batch(images, zero), images)
    shifts = torch.tensor([[1, 0], [0, 2], [-2, -1], [2, 2]])
    out = translate_batch(images, shifts)
    assert torch.equal(out[0, :, :-1], images[0, :, 1:])  # dy=+1: row r shows input row r+1
    assert torch.equal(out[1, :, :, :-2], images[1, :, :, 2:])
    assert torch.equal(out[2, :, 2:, 1:], images[2, :, :-2, :-1])
    assert torch.equal(out[3, :, :-2, :-2], images[3, :, 2:, 2:])


def test_batches_cover_every_image_once_and_flips_alternate():
    n = 64
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 32, 32).contiguous()
    images[:, :, :, :6] = 255  # a marker band on the left shows whether an image was flipped
    labels = torch.arange(n)
    batches = TrainBatches(images, labels, NORMALIZATION, batch_size=16, seed=0)
    assert len(batches) == 4
    flipped_by_epoch = []
    for epoch in range(2):
        seen, flipped = [], {}
        for inputs, y in batches.epoch(epoch):
            assert inputs.shape == (16, 3, 32, 32) and inputs.dtype == torch.float32
            seen += y.tolist()
            # Translation moves the band by at most TRANSLATE_PIXELS; it stays on its side.
            row = inputs[:, 0, 16]
            for label, is_flipped in zip(y.tolist(), (row[:, -8:].mean(1) > row[:, :8].mean(1)).tolist()):
                flipped[label] = is_flipped
        assert sorted(seen) == list(range(n))
        flipped_by_epoch.append(flipped)
    assert 0 < sum(flipped_by_epoch[0].values()) < n
    assert all(flipped_by_epoch[0][i] != flipped_by_epoch[1][i] for i in range(n))


def test_small_crop_epochs_yield_windows_of_the_whole_images_then_whole_images():
    images = torch.randint(0, 255, (48, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(48)
    whole = TrainBatches(images, labels, NORMALIZATION, 16, seed=5)
    cropped = TrainBatches(images, labels, NORMALIZATION, 16, seed=5, small_crop_epochs=1)
    corners = set()
    for (full, y), (crop, y_crop) in zip(whole.epoch(0), cropped.epoch(0)):
        assert crop.shape == (16, 3, 24, 24) and torch.equal(y, y_crop)  # the same images, order and augmentation
        # One window of the batch's translated images, anywhere inside them.
        found = [(top, left) for top in range(9) for left in range(9)
                 if torch.equal(crop, full[:, :, top:top + 24, left:left + 24])]
        assert len(found) == 1
        corners.add(found[0])
    assert len(corners) > 1  # each batch draws its own window
    assert all(inputs.shape == (16, 3, 32, 32) for inputs, _ in cropped.epoch(1))


def test_a_resumed_crop_epoch_and_each_ranks_share_cut_the_same_windows():
    """A resume sets the data generator back to the epoch's start and skips the batches done: the rest must be
    the same crops. Under torchrun each rank takes its slice of every global batch, cut by the same window."""
    images = torch.randint(0, 255, (64, 3, 32, 32), dtype=torch.uint8)
    batches = TrainBatches(images, torch.arange(64), NORMALIZATION, 16, seed=2, small_crop_epochs=2)
    epoch_start = batches.generator.get_state()
    whole_epoch = [x for x, _ in batches.epoch(0)]
    batches.generator.set_state(epoch_start)
    resumed = [x for x, _ in batches.epoch(0, skip=2)]
    assert len(resumed) == 2 and all(torch.equal(a, b) for a, b in zip(resumed, whole_epoch[2:]))
    ranks = [TrainBatches(images, torch.arange(64), NORMALIZATION, 16, seed=2, rank=r, world_size=2,
                          small_crop_epochs=2) for r in (0, 1)]
    for whole, half0, half1 in zip(whole_epoch, *([x for x, _ in rank.epoch(0)] for rank in ranks)):
        assert torch.equal(torch.cat([half0, half1]), whole)


def test_same_seed_same_batches():
    images = torch.randint(0, 255, (40, 3, 32, 32), dtype=torch.uint8)
    a = [x for x, _ in TrainBatches(images, torch.arange(40), NORMALIZATION, 8, seed=3).epoch(0)]
    b = [x for x, _ in TrainBatches(images, torch.arange(40), NORMALIZATION, 8, seed=3).epoch(0)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
