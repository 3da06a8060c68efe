"""datasets.py: CIFAR-100 in its official format, image folders, the decode cache, and choosing a dataset."""
import dataclasses
import hashlib
import io
import os
import pickle
import shutil
import tarfile
import threading
import warnings
from multiprocessing import Pool

import numpy as np
import pytest
import torch
from PIL import Image

import datasets
from datasets import DATASETS, DataError, choose_dataset, ensure_dataset, fetch_dataset, load_dataset
from tiny_cifar import CLASS_NAMES, write_archive, write_image_split, write_tiny_cifar, write_tiny_cifar100

CIFAR100 = DATASETS["cifar100"]
FOLDER = DATASETS["folder"]


# ----------------------------------------------------------------------------------------------
# CIFAR


def read_raw(path):
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def test_cifar100_loads_fine_and_coarse_labels(tmp_path):
    folder = write_tiny_cifar100(tmp_path, train_size=60, test_size=20)
    data = load_dataset(CIFAR100, tmp_path)
    assert data.train_images.shape == (60, 3, 32, 32) and data.train_images.dtype == torch.uint8
    assert data.test_images.shape == (20, 3, 32, 32) and data.test_labels.dtype == torch.int64
    assert len(data.class_names) == 100 and data.class_names[7] == "fine_07"
    raw = read_raw(folder / "train")
    assert data.train_labels.tolist() == raw["fine_labels"]
    assert torch.equal(data.train_images[3, 2, 5], torch.from_numpy(raw["data"][3, 2048 + 160:2048 + 192]))
    train_coarse, test_coarse = data.extra_labels["coarse_labels"]
    assert train_coarse.tolist() == raw["coarse_labels"] and test_coarse.shape == (20,)
    assert (data.mean, data.std) == (CIFAR100.mean, CIFAR100.std)
    assert data.source == f"CIFAR-100 from {folder}" and data.notes == []


def test_cifar10_reads_its_names_from_batches_meta(tmp_path):
    write_tiny_cifar(tmp_path, per_batch=10, test_size=10)
    data = load_dataset(DATASETS["cifar10"], tmp_path)
    assert data.train_images.shape == (50, 3, 32, 32) and data.test_images.shape == (10, 3, 32, 32)
    assert data.class_names == CLASS_NAMES and data.extra_labels == {}
    assert data.mean == (0.4914, 0.4822, 0.4465) and data.std == (0.2470, 0.2435, 0.2616)


def rewrite(path, change):
    batch = read_raw(path)
    change(batch)
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)


def refused(data_dir, match, dataset=CIFAR100):
    with pytest.raises(DataError, match=match) as info:
        load_dataset(dataset, data_dir)
    return str(info.value)


def test_cifar100_without_fine_labels_is_refused_naming_file_and_key(tmp_path):
    folder = write_tiny_cifar100(tmp_path, train_size=20, test_size=10)
    rewrite(folder / "test", lambda batch: batch.pop("fine_labels"))
    message = refused(tmp_path, "it has no 'fine_labels' entry")
    assert f"CIFAR-100 file {folder / 'test'} is not valid" in message


@pytest.mark.parametrize("key, value, match", [
    ("fine_labels", 100, r"its fine_labels range over \d+..100, expected integers 0..99"),
    ("coarse_labels", -1, r"its coarse_labels range over -1..\d+, expected non-negative integers"),
])
def test_cifar100_labels_out_of_range(tmp_path, key, value, match):
    folder = write_tiny_cifar100(tmp_path, train_size=20, test_size=10)
    rewrite(folder / "train", lambda batch: batch[key].__setitem__(4, value))
    assert str(folder / "train") in refused(tmp_path, match)


def test_cifar100_label_count_and_meta_problems(tmp_path):
    folder = write_tiny_cifar100(tmp_path, train_size=20, test_size=10)
    rewrite(folder / "train", lambda batch: batch.__setitem__("coarse_labels", batch["coarse_labels"][:5]))
    refused(tmp_path, "it has 5 coarse_labels for 20 images")
    write_tiny_cifar100(tmp_path, train_size=20, test_size=10)
    rewrite(folder / "meta", lambda meta: meta.__setitem__("fine_label_names", ["a", "b"]))
    refused(tmp_path, "meta is not valid: its 'fine_label_names' is not a list of 100 class names")
    (folder / "meta").unlink()
    refused(tmp_path, f"CIFAR-100 file {folder / 'meta'} is missing")


class RunsCode:
    def __reduce__(self):
        return (print, ("this pickle ran code",))


def test_pickle_asking_for_a_function_is_refused(tmp_path, capsys):
    folder = write_tiny_cifar100(tmp_path, train_size=20, test_size=10)
    rewrite(folder / "train", lambda batch: batch.__setitem__("data", RunsCode()))
    refused(tmp_path, r"asks for __builtin__.print, which CIFAR files never contain")
    assert "ran code" not in capsys.readouterr().out


def test_cifar_refuses_other_image_sizes_and_never_downloads_in_load(tmp_path):
    with pytest.raises(DataError, match="--image-size 24: CIFAR-100 images are 32x32"):
        load_dataset(CIFAR100, tmp_path, image_size=24)
    refused(tmp_path, f"CIFAR-100 is not in {tmp_path / 'cifar-100-python'}")
    assert list(tmp_path.iterdir()) == []


def test_download_checks_md5_then_extracts(tmp_path):
    archive = write_archive(write_tiny_cifar100(tmp_path / "src", train_size=20, test_size=10),
                            tmp_path / "cifar-100-python.tar.gz")
    dest = tmp_path / "dest"
    wrong = dataclasses.replace(CIFAR100, url=archive.as_uri(), md5="0" * 32)
    with pytest.raises(DataError, match="does not have the expected MD5 0{32}; it was deleted"):
        ensure_dataset(wrong, dest)
    assert not dest.exists()  # the .part file is gone, nothing was extracted, and the folder made for it

    mirror = dataclasses.replace(CIFAR100, url=archive.as_uri(), md5=hashlib.md5(archive.read_bytes()).hexdigest())
    ensure_dataset(mirror, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["cifar-100-python", "cifar-100-python.tar.gz"]  # no staging
    assert load_dataset(mirror, dest).train_images.shape == (20, 3, 32, 32)
    ensure_dataset(dataclasses.replace(mirror, url="file:///nowhere"), dest)  # present: not downloaded again


def test_offline_download_says_what_to_do(tmp_path):
    offline = dataclasses.replace(CIFAR100, url=(tmp_path / "nowhere.tar.gz").as_uri())
    with pytest.raises(DataError, match="downloading it from .* failed") as info:
        ensure_dataset(offline, tmp_path / "data")
    assert "holds train, test, meta" in str(info.value) and "CIFAR100_URL" in str(info.value)
    assert not (tmp_path / "data").exists()  # the folder it made for the download is gone with it


def test_data_dir_that_is_a_file(tmp_path):
    target = tmp_path / "a_file"
    target.write_text("keep me")
    with pytest.raises(DataError, match=f"--data-dir: {target} is a file, but it should be a folder"):
        ensure_dataset(CIFAR100, target)
    assert target.read_text() == "keep me"


def test_a_data_dir_that_cannot_be_made_is_named_not_a_traceback(tmp_path):
    (tmp_path / "a_file").write_text("keep me")
    with pytest.raises(DataError, match=r"a_file/data cannot be made to download it into \(Not a directory\)"):
        ensure_dataset(CIFAR100, tmp_path / "a_file" / "data")


def test_a_data_dir_that_is_the_data_itself_is_refused_not_downloaded_into(tmp_path):
    offline = dataclasses.replace(DATASETS["cifar10"], url=(tmp_path / "nowhere.tar.gz").as_uri())
    batches = write_tiny_cifar(tmp_path / "data")  # data/cifar-10-batches-py
    with pytest.raises(DataError, match=f"{batches} is CIFAR-10's own folder .*holds it, {tmp_path / 'data'}"):
        ensure_dataset(offline, batches)
    hundred = write_tiny_cifar100(tmp_path / "c100", train_size=10, test_size=10)
    with pytest.raises(DataError, match="is CIFAR-100's own folder .*, with --dataset cifar100"):
        ensure_dataset(offline, hundred)
    write_image_split(tmp_path / "photos" / "train", per_class=2)
    with pytest.raises(DataError, match="holds folders of images \\(cat, dog, fox\\) but no train/ folder"):
        ensure_dataset(offline, tmp_path / "photos" / "train")
    assert not (batches / "cifar-10-batches-py").exists()
    assert not (tmp_path / "photos" / "train" / "cifar-10-batches-py").exists()
    write_image_split(tmp_path / "data" / "flowers" / "train", per_class=1)  # another dataset beside CIFAR's folder
    shutil.rmtree(batches)
    with pytest.raises(DataError, match="downloading it from"):  # still CIFAR-10 to download, not class folders
        ensure_dataset(offline, tmp_path / "data")
    with pytest.raises(DataError, match="is an image folder \\(it holds train/\\), not CIFAR-10. To train on its"):
        ensure_dataset(offline, tmp_path / "photos")  # --dataset cifar10 given for an image folder


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
    with pytest.raises(DataError, match="Refusing to extract .* not the official CIFAR-10 one"):
        datasets.safe_extract(archive, target, "CIFAR-10")
    assert not (tmp_path / "escape.txt").exists()
    assert list(target.iterdir()) == []


def test_only_each_machines_first_process_downloads_and_the_others_wait(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "download", lambda dataset, data_dir: pytest.fail("LOCAL_RANK 1 downloaded"))
    (tmp_path / "data").mkdir()
    threading.Timer(0.5, write_tiny_cifar100, (tmp_path / "data",), dict(train_size=10, test_size=10)).start()
    fetch_dataset(CIFAR100, tmp_path / "data", local_rank=1, wait_s=60)
    with pytest.raises(DataError, match="Waited 0 minutes for this machine's first process"):
        fetch_dataset(CIFAR100, tmp_path / "never", local_rank=1, wait_s=0.5)
    with pytest.raises(DataError, match="not an image folder"):  # nothing to wait for: every process checks
        fetch_dataset(FOLDER, tmp_path / "never", local_rank=1, wait_s=60)

    downloads = []
    monkeypatch.setattr(datasets, "download", lambda dataset, data_dir: downloads.append(data_dir))
    fetch_dataset(CIFAR100, tmp_path / "empty", local_rank=0, wait_s=60)
    assert downloads == [tmp_path / "empty"]


# ----------------------------------------------------------------------------------------------
# Image folders


def test_under_torchrun_only_each_machines_first_process_decodes_an_image_folder(tmp_path, monkeypatch, capsys):
    write_image_split(tmp_path / "train", per_class=4)
    with pytest.raises(DataError, match="Waited 0 minutes for this machine's first process .* to decode"):
        fetch_dataset(FOLDER, tmp_path, local_rank=1, wait_s=0.5, local_world_size=2)
    assert not (tmp_path / ".cache").exists()  # the waiting process decoded nothing
    fetch_dataset(FOLDER, tmp_path, local_rank=0, wait_s=60, local_world_size=2)
    assert "for this machine's other processes to read" in capsys.readouterr().out
    monkeypatch.setattr(datasets, "decode_split", lambda *args: pytest.fail("decoded a second time"))
    fetch_dataset(FOLDER, tmp_path, local_rank=1, wait_s=0.5, local_world_size=2)
    fetch_dataset(FOLDER, tmp_path, local_rank=0, wait_s=60, local_world_size=2)
    assert len(load(tmp_path).train_images) == 9  # from the cache: 12 images, 1 of each class held out

    unwritable = tmp_path / "other"
    write_image_split(unwritable / "train", per_class=4)
    (unwritable / ".cache").write_text("a file where the cache folder would go")
    monkeypatch.undo()
    with pytest.raises(DataError, match="shared through the cache .* cannot be written"):
        fetch_dataset(FOLDER, unwritable, local_rank=0, wait_s=60, local_world_size=2)

def load(data_dir, capsys=None, **kwargs):
    data = load_dataset(FOLDER, data_dir, **kwargs)
    return (data, capsys.readouterr().out) if capsys else data


def assert_labels_match_colours(data):
    for images, labels in ((data.train_images, data.train_labels), (data.test_images, data.test_labels)):
        assert torch.equal(images.float().mean((2, 3)).argmax(1), labels)


def test_image_folder_loads_skipping_a_broken_file(tmp_path, capsys):
    write_image_split(tmp_path / "train", per_class=34)
    write_image_split(tmp_path / "test", per_class=4, seed=1)
    exact = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(exact).save(tmp_path / "train" / "dog" / "a" / "exact.png")
    (tmp_path / "train" / "cat" / "broken.jpg").write_bytes(b"not an image at all" * 10)  # 1 of 104 files
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image: ignored")
    (tmp_path / "train" / "fox" / ".hidden.png").write_bytes(b"hidden files are ignored")
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()  # a hidden folder is not a class

    data, out = load(tmp_path, capsys)
    assert data.class_names == ["cat", "dog", "fox"]
    assert data.train_images.shape == (103, 3, 32, 32) and data.train_images.dtype == torch.uint8
    assert data.test_images.shape == (12, 3, 32, 32) and data.test_labels.dtype == torch.int64
    assert torch.bincount(data.train_labels).tolist() == [34, 35, 34]
    assert_labels_match_colours(data)
    match = (data.train_images == torch.from_numpy(exact).permute(2, 0, 1)).flatten(1).all(1)
    assert match.sum() == 1 and data.train_labels[match].item() == 1  # a 32x32 PNG is kept exactly
    assert data.notes == [f"skipped train/cat/broken.jpg (not an image format Pillow reads) in {tmp_path}"]
    assert f"[data] warning: {data.notes[0]}" in out and "[data] decoded 115 images in" in out
    assert data.source == f"image folder {tmp_path} (test split: test/)" and data.extra_labels == {}
    expected_mean = data.train_images.double().mean((0, 2, 3)) / 255
    expected_std = (data.train_images.double() / 255).std((0, 2, 3), correction=0)
    assert isinstance(data.mean, tuple) and all(type(x) is float for x in data.mean + data.std)
    assert torch.allclose(torch.tensor(data.mean, dtype=torch.float64), expected_mean)
    assert torch.allclose(torch.tensor(data.std, dtype=torch.float64), expected_std)


def test_decoding_turns_phone_photos_upright_scales_16_bit_grey_and_refuses_float_pixels(tmp_path, monkeypatch):
    sideways = np.zeros((32, 64, 3), np.uint8)
    sideways[:, :32] = (255, 0, 0)  # stored: red left half, blue right half
    sideways[:, 32:] = (0, 0, 255)
    image = Image.fromarray(sideways)
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display, so red is on top
    image.save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    pixels, _ = datasets.decode_image(tmp_path / "phone.jpg", 32)
    assert pixels[:16, :, 0].mean() > 240 and pixels[16:, :, 2].mean() > 240

    grey = np.random.default_rng(0).integers(0, 65536, (32, 32), dtype=np.uint16)
    Image.fromarray(grey).save(tmp_path / "grey16.png")
    pixels, _ = datasets.decode_image(tmp_path / "grey16.png", 32)
    assert np.abs(pixels[..., 0].astype(float) - grey / 257).max() <= 0.5 and (pixels[..., 0] == pixels[..., 2]).all()

    Image.new("RGB", (64, 64)).save(tmp_path / "large.jpg")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # 64x64 is then "large": Pillow warns, and it decodes
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert datasets.decode_image(tmp_path / "large.jpg", 32)[0].shape == (32, 32, 3)

    Image.fromarray(np.random.default_rng(1).random((32, 32)).astype(np.float32), mode="F").save(tmp_path / "f.tif")
    assert datasets.decode_image(tmp_path / "f.tif", 32) == (None, "floating-point pixels (mode F); save the image "
                                                                  "with 8 or 16 bits a channel")


def test_a_file_name_that_is_not_utf8_loads_and_a_class_name_is_refused(tmp_path, capsys):
    write_image_split(tmp_path / "train", per_class=3)
    write_image_split(tmp_path / "test", per_class=1, seed=1)
    cat = bytes(tmp_path / "train" / "cat")
    src = next(p for p in (tmp_path / "train" / "cat").iterdir() if p.is_file())
    os.rename(bytes(src), cat + b"/caf\xe9" + src.suffix.encode())  # a latin-1 name
    data, _ = load(tmp_path, capsys)
    assert data.train_images.shape[0] == 9 and data.notes == []
    os.rename(cat, cat[:-3] + b"c\xe0t")  # a class folder's name: it goes into the report and plots
    with pytest.raises(DataError, match=r"class folders whose names are not UTF-8 text: c\\xe0t. Rename them"):
        load(tmp_path)


def test_decoding_over_a_process_pool_gives_the_same_data(tmp_path, monkeypatch, capsys):
    write_image_split(tmp_path / "train", per_class=34)
    (tmp_path / "train" / "cat" / "broken.jpg").write_bytes(b"garbage")
    one_process, _ = load(tmp_path, capsys)
    shutil.rmtree(tmp_path / ".cache")

    pool_sizes = []

    def counting_pool(processes, **kwargs):
        pool_sizes.append(processes)
        return Pool(processes, **kwargs)

    monkeypatch.setattr(datasets, "POOL_MIN_FILES", 0)
    monkeypatch.setattr(datasets.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(datasets.multiprocessing, "Pool", counting_pool)
    pooled, _ = load(tmp_path, capsys)
    assert pool_sizes == [2]  # one split (the test split is held out of train/), one process per core
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        assert torch.equal(getattr(pooled, field), getattr(one_process, field))
    assert (pooled.notes, pooled.mean, pooled.std) == (one_process.notes, one_process.mean, one_process.std)
    assert "broken.jpg" in pooled.notes[0]


def test_image_size_resizes_every_image(tmp_path):
    write_image_split(tmp_path / "train", per_class=3)
    write_image_split(tmp_path / "val", per_class=3, seed=1)
    data = load(tmp_path, image_size=24)
    assert data.train_images.shape == (9, 3, 24, 24) and data.test_images.shape == (9, 3, 24, 24)
    assert data.source == f"image folder {tmp_path} (test split: val/)"  # val/ serves as the test split
    assert_labels_match_colours(data)


def test_test_split_is_preferred_to_val(tmp_path):
    write_image_split(tmp_path / "train", per_class=3)
    write_image_split(tmp_path / "val", per_class=2)
    write_image_split(tmp_path / "test", per_class=1)
    data = load(tmp_path)
    assert len(data.test_images) == 3 and data.source.endswith("(test split: test/)")


def test_an_unlabelled_test_split_is_passed_over_for_a_labelled_one(tmp_path, capsys):
    write_image_split(tmp_path / "train", per_class=10)
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "0001.jpg").write_bytes(b"a competition's unlabelled test image")
    write_image_split(tmp_path / "val", per_class=2)
    data, out = load(tmp_path, capsys)
    assert data.source == f"image folder {tmp_path} (test split: val/)" and len(data.test_images) == 6
    assert data.notes == [f"{tmp_path / 'test'} holds no class folders (unlabelled images?), so it cannot be tested "
                          f"on: not used"]
    assert f"[data] warning: {data.notes[0]}" in out

    shutil.rmtree(tmp_path / "val")  # no labelled split left: the hold-out
    data = load(tmp_path)
    assert data.source.endswith("(no test split: 10% of train/ held out, stratified, fixed)")
    assert len(data.test_images) == 3 and len(data.notes) == 1


def test_test_split_may_lack_classes(tmp_path):
    write_image_split(tmp_path / "train", per_class=3)
    write_image_split(tmp_path / "test", per_class=2)
    shutil.rmtree(tmp_path / "test" / "dog")
    data = load(tmp_path)
    assert data.class_names == ["cat", "dog", "fox"] and data.test_labels.tolist() == [0, 0, 2, 2]


def test_no_test_split_holds_out_ten_percent_of_each_class_fixed(tmp_path, capsys):
    write_image_split(tmp_path / "train", per_class=20)
    torch.manual_seed(1)
    data, out = load(tmp_path, capsys)
    assert data.source == f"image folder {tmp_path} (no test split: 10% of train/ held out, stratified, fixed)"
    assert torch.bincount(data.test_labels).tolist() == [2, 2, 2]
    assert torch.bincount(data.train_labels).tolist() == [18, 18, 18]
    assert_labels_match_colours(data)
    held_out = data.test_images.flatten(1)
    assert not (data.train_images.flatten(1)[:, None] == held_out[None]).all(2).any()  # disjoint
    expected_mean = data.train_images.double().mean((0, 2, 3)) / 255  # statistics of the kept training images
    assert torch.allclose(torch.tensor(data.mean, dtype=torch.float64), expected_mean)

    for path in (tmp_path / ".cache").iterdir():
        path.unlink()
    torch.manual_seed(2)  # the run's seed does not move the split
    assert torch.equal(load(tmp_path).test_images, data.test_images)


def test_cache_serves_the_second_load_and_notices_changes(tmp_path, capsys):
    write_image_split(tmp_path / "train", per_class=4)
    write_image_split(tmp_path / "test", per_class=2)
    first, out = load(tmp_path, capsys)
    cache_files = list((tmp_path / ".cache").iterdir())
    assert len(cache_files) == 1 and cache_files[0].name.startswith("decoded-") and cache_files[0].suffix == ".pt"
    assert "[data] decoded 18 images in" in out and f"(cached for the next run in {cache_files[0]})" in out

    second, out = load(tmp_path, capsys)
    assert f"[data] 18 images from the cache {cache_files[0]} in" in out
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        assert torch.equal(getattr(first, field), getattr(second, field))
    assert (second.class_names, second.mean, second.std, second.source) == (
        first.class_names, first.mean, first.std, first.source)

    with open(next((tmp_path / "train" / "dog").glob("*.png")), "ab") as f:
        f.write(b"\0" * 7)  # bytes after a PNG's end: the same image, a new size
    _, out = load(tmp_path, capsys)
    assert "[data] decoded 18 images in" in out
    assert len(list((tmp_path / ".cache").iterdir())) == 2
    _, out = load(tmp_path, capsys, image_size=16)  # another size is another cache
    assert "[data] decoded 18 images in" in out


def test_corrupt_cache_is_rebuilt(tmp_path, capsys):
    write_image_split(tmp_path / "train", per_class=3)
    first, _ = load(tmp_path, capsys)
    (cache,) = (tmp_path / ".cache").iterdir()
    cache.write_bytes(cache.read_bytes()[:1000])
    rebuilt, out = load(tmp_path, capsys)
    assert f"[data] warning: ignoring the unreadable cache {cache}" in out and "[data] decoded 9 images" in out
    assert torch.equal(rebuilt.train_images, first.train_images)
    _, out = load(tmp_path, capsys)
    assert "from the cache" in out


def test_cache_that_cannot_be_written_only_warns(tmp_path, capsys):
    write_image_split(tmp_path / "train", per_class=3)
    (tmp_path / ".cache").write_text("a file where the cache folder would go")
    data, out = load(tmp_path, capsys)
    assert "[data] warning: cannot write the cache" in out and "(not cached)" in out
    assert len(data.train_images) + len(data.test_images) == 9
    assert (tmp_path / ".cache").read_text() == "a file where the cache folder would go"


def test_cached_notes_are_printed_again(tmp_path, capsys):
    write_image_split(tmp_path / "train", per_class=34)
    (tmp_path / "train" / "fox" / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    first, _ = load(tmp_path, capsys)
    second, out = load(tmp_path, capsys)
    assert "from the cache" in out and second.notes == first.notes and len(first.notes) == 1
    assert f"[data] warning: {first.notes[0]}" in out and "train/fox/a/broken.png" in first.notes[0]


@pytest.mark.parametrize("folder, match", [
    ("train/owl/nested", "Class folder {d}/train/owl holds no images"),  # only a sub-folder and a text file
    ("test/wolf", "{d}/test has class folders that {d}/train does not have: wolf"),
])
def test_image_folder_layout_problems(tmp_path, folder, match):
    write_image_split(tmp_path / "train", per_class=2)
    (tmp_path / folder).mkdir(parents=True)
    (tmp_path / folder / "readme.txt").write_text("not an image")
    with pytest.raises(DataError, match=match.format(d=tmp_path)):
        load(tmp_path)


def test_train_without_class_folders(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "loose.png").write_bytes(b"images must be inside class folders")
    with pytest.raises(DataError, match=f"{tmp_path}/train holds no class folders"):
        load(tmp_path)
    (tmp_path / "train" / "cat").mkdir()
    with pytest.raises(DataError, match="holds one class folder \\(cat\\): a classifier needs two classes"):
        load(tmp_path)


def test_too_many_broken_files(tmp_path):
    write_image_split(tmp_path / "train", per_class=10)
    for i in range(2):
        (tmp_path / "train" / "dog" / f"bad{i}.jpg").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"2 of the 32 image files in .*train \(6.2%\) cannot be read as images, for "
                                        r"example train/dog/bad0.jpg \(not an image format Pillow reads\); "
                                        r"train/dog/bad1.jpg .* Up to 1% "):
        load(tmp_path)


def test_missing_image_folder(tmp_path):
    with pytest.raises(DataError, match=f"--data-dir {tmp_path} is not an image folder: {tmp_path} has no train/"):
        load(tmp_path)
    (tmp_path / "train").write_text("a file")
    with pytest.raises(DataError, match="train is a file, not a folder"):
        ensure_dataset(FOLDER, tmp_path)


# ----------------------------------------------------------------------------------------------
# Choosing


def test_choose_dataset(tmp_path):
    assert choose_dataset(None, tmp_path) is DATASETS["cifar10"]
    assert choose_dataset(None, tmp_path / "absent") is DATASETS["cifar10"]
    with pytest.raises(DataError, match="has no train/ folder"):
        choose_dataset("folder", tmp_path)
    (tmp_path / "train").mkdir()
    assert choose_dataset(None, tmp_path) is FOLDER
    assert choose_dataset("folder", tmp_path) is FOLDER
    assert choose_dataset("cifar100", tmp_path) is CIFAR100  # a train/ folder does not override the choice
    assert choose_dataset("cifar10", str(tmp_path)) is DATASETS["cifar10"]
    with pytest.raises(DataError, match="--dataset imagenet is not one this trainer knows: choose one of "
                                        "cifar10, cifar100, folder"):
        choose_dataset("imagenet", tmp_path)
