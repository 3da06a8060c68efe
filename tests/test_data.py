"""The loader reads the real on-disk format, rejects broken files clearly, and augments correctly."""
import hashlib
import io
import os
import pickle
import tarfile
import threading

import numpy as np
import pytest
import torch

import train
from tiny_cifar import write_batch, write_tiny_cifar
from train import (TrainBatches, UserError, download_cifar10, load_cifar10,
                   safe_extract, translate_batch)


def test_loader_reads_official_format(tiny_data):
    train_x, train_y, test_x, test_y = load_cifar10(tiny_data)
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
    with pytest.raises(UserError, match=match) as info:
        load_cifar10(folder.parent, download=False)
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


def test_data_dir_that_is_a_file(tmp_path):
    target = tmp_path / "a_file"
    target.write_text("keep me")
    with pytest.raises(UserError, match=f"--data-dir: {target} is a file, but it should be a folder"):
        load_cifar10(target)
    assert target.read_text() == "keep me"


def test_pickle_of_wrong_type(data_copy):
    with open(data_copy / "data_batch_4", "wb") as f:
        pickle.dump([1, 2, 3], f)
    assert_load_refused(data_copy, "no 'data' and 'labels'")


def test_offline_download_fails_with_a_clear_message(tmp_path):
    with pytest.raises(UserError, match="downloading it from .* failed") as info:
        download_cifar10(tmp_path, url=(tmp_path / "nowhere.tar.gz").as_uri())
    assert "extract it so that" in str(info.value)
    assert not list(tmp_path.glob("*.part"))


def make_tar(path, members):
    with tarfile.open(path, "w:gz") as tar:
        for name, kind, target in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = 3
                tar.addfile(info, io.BytesIO(b"abc"))
            else:
                info.type, info.linkname = (tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE), target
                tar.addfile(info)


@pytest.mark.parametrize("members", [
    [("../escape.txt", "file", None)],
    [("/tmp/absolute.txt", "file", None)],
    [("cifar-10-batches-py/../../escape.txt", "file", None)],
    [("cifar-10-batches-py/link", "symlink", "/etc/passwd")],
    [("cifar-10-batches-py/link", "symlink", "../../outside")],
    [("cifar-10-batches-py/hard", "hardlink", "/etc/passwd")],
])
def test_extraction_refuses_members_leaving_the_folder(tmp_path, members):
    archive = tmp_path / "evil.tar.gz"
    make_tar(archive, members)
    target = tmp_path / "target"
    target.mkdir()
    with pytest.raises(UserError, match="Refusing to extract"):
        safe_extract(archive, target)
    assert not (tmp_path / "escape.txt").exists()
    assert list(target.iterdir()) == []


def test_download_checks_md5_then_extracts(tmp_path, monkeypatch):
    source = tmp_path / "src"
    write_tiny_cifar(source, per_batch=10, test_size=10)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    dest = tmp_path / "dest"
    with pytest.raises(UserError, match="expected MD5"):
        download_cifar10(dest, url=archive.as_uri())
    assert not (dest / "cifar-10-batches-py").exists()
    monkeypatch.setattr(train, "CIFAR10_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    download_cifar10(dest, url=archive.as_uri())
    assert load_cifar10(dest, download=False)[0].shape == (50, 3, 32, 32)
    assert sorted(p.name for p in dest.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]  # no staging


def test_loader_reads_the_jpeg_copy_when_built():
    """The shared build script's output is the real archive's format; check the loader on it if present."""
    folder = train.Path(train.DEFAULT_DATA_DIR)
    if not (folder / "cifar-10-batches-py" / "test_batch").exists():
        pytest.skip("full CIFAR-10 not built here (python ../shared/cifar10/build.py data)")
    train_x, train_y, test_x, test_y = load_cifar10(folder, download=False)
    assert train_x.shape == (50000, 3, 32, 32) and test_x.shape == (10000, 3, 32, 32)
    assert torch.bincount(train_y).tolist() == [5000] * 10


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
    batches = TrainBatches(images, labels, batch_size=16, seed=0)
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


def test_same_seed_same_batches():
    images = torch.randint(0, 255, (40, 3, 32, 32), dtype=torch.uint8)
    a = [x for x, _ in TrainBatches(images, torch.arange(40), 8, seed=3).epoch(0)]
    b = [x for x, _ in TrainBatches(images, torch.arange(40), 8, seed=3).epoch(0)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))


class RunsCode:
    def __reduce__(self):
        import os
        return (os.system, ("touch /tmp/cifar_trainer_pwned",))


def test_pickle_that_would_run_code_is_refused(data_copy):
    marker = train.Path("/tmp/cifar_trainer_pwned")
    marker.unlink(missing_ok=True)
    with open(data_copy / "data_batch_1", "wb") as f:
        pickle.dump({"data": RunsCode(), "labels": []}, f, protocol=2)
    assert_load_refused(data_copy, "asks for posix.system")
    assert not marker.exists()


def test_only_each_machines_first_process_downloads_and_the_others_wait(tmp_path, monkeypatch):
    second_process = train.Dist(rank=3, world_size=4, local_rank=1, local_world_size=2)
    monkeypatch.setattr(train, "download_cifar10", lambda data_dir: pytest.fail("LOCAL_RANK 1 downloaded"))

    def first_process_finishes_its_download():  # the folder appears whole, renamed into place
        write_tiny_cifar(tmp_path / "staging", per_batch=10, test_size=10)
        os.replace(tmp_path / "staging" / "cifar-10-batches-py", tmp_path / "data" / "cifar-10-batches-py")

    (tmp_path / "data").mkdir()
    threading.Timer(1.0, first_process_finishes_its_download).start()
    train.fetch_dataset(tmp_path / "data", second_process, wait_s=60)
    assert load_cifar10(tmp_path / "data", download=False)[0].shape == (50, 3, 32, 32)
    with pytest.raises(UserError, match="Waited 0 minutes for this machine's first process"):
        train.fetch_dataset(tmp_path / "never", second_process, wait_s=1)

    downloads = []
    monkeypatch.setattr(train, "download_cifar10", downloads.append)
    train.fetch_dataset(tmp_path / "empty", train.Dist(rank=2, world_size=4, local_rank=0, local_world_size=2))
    assert downloads == [tmp_path / "empty"]  # each machine's first process downloads its own copy
