"""Where the training data comes from: CIFAR-10, CIFAR-100, or a folder of images.

    dataset = choose_dataset(name, data_dir)         # DATASETS["cifar10"], ["cifar100"] or ["folder"]
    fetch_dataset(dataset, data_dir, local_rank, wait_s)   # download and check the archive if needed
    data = load_dataset(dataset, data_dir)            # LoadedData: uint8 images and int64 labels on the CPU

CIFAR comes as the official archive (downloaded, MD5-checked and safely extracted when absent); every file is
validated and a broken one is named. An image folder is DIR/train/<class>/... and DIR/test/<class>/... (or
val/); its images are decoded once with Pillow, resized to a square, and cached in DIR/.cache/.
Every problem the user can fix is a DataError: one paragraph saying what is wrong, where, and what to do.
"""
import functools
import hashlib
import multiprocessing
import os
import pickle
import shutil
import signal
import sys
import tarfile
import time
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
BAD_FILES_LIMIT = 0.01  # unreadable images a split may have (a share of its files); they are skipped with a warning
HOLDOUT_FRACTION = 0.1  # of each class of train/, held out for testing when an image folder has no test split
HOLDOUT_SEED = 0  # fixed, not the run's seed: every run of a folder tests on the same images
CACHE_FORMAT = 2  # part of the cache key: raised when decoding or the hold-out changes, so old caches are not used
CIFAR_IMAGE_SIZE = 32  # CIFAR's images, and image folders' default size
SHOWN_FILES = 5  # unreadable files named one by one; the rest are counted
POOL_MIN_FILES = 2000  # fewer images decode in about a second: not worth starting a process per core


class DataError(Exception):
    """The data cannot be used: one paragraph for the user (the trainer exits with code 2)."""


@dataclass(frozen=True)
class Dataset:
    """One table entry: everything the trainer knows about a dataset."""
    key: str  # what --dataset takes
    title: str  # how messages name it
    url: str | None  # of the archive; None: nothing to download
    md5: str | None  # of the archive
    archive: str | None  # the archive's file name
    folder: str | None  # the folder the archive extracts to
    train_files: tuple  # CIFAR: the training split's pickles; image folder: the training split's folder
    test_files: tuple  # CIFAR: the test split's pickles; image folder: the test split's folder, first one present
    meta_file: str | None  # the pickle holding the class names
    label_key: str | None  # the labels the model learns
    extra_label_keys: tuple  # other labels in the files: read, validated and kept
    names_key: str | None  # the class names' entry in meta_file
    num_classes: int | None  # None: as many as the image folder has class folders
    mean: tuple | None  # per-channel normalisation, in [0, 1] units; None: computed on the training images
    std: tuple | None
    run_prefix: str  # default output folder: runs/<run_prefix>NNN


DATASETS = {
    # CIFAR10_URL / CIFAR100_URL in the environment point the download at a mirror.
    "cifar10": Dataset(
        key="cifar10", title="CIFAR-10",
        url=os.environ.get("CIFAR10_URL", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
        md5="c58f30108f718f92721af3b95e74349a", archive="cifar-10-python.tar.gz", folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)), test_files=("test_batch",),
        meta_file="batches.meta", label_key="labels", extra_label_keys=(), names_key="label_names",
        num_classes=10, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), run_prefix="cifar10-"),
    "cifar100": Dataset(
        key="cifar100", title="CIFAR-100",
        url=os.environ.get("CIFAR100_URL", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
        md5="eb9058c3a382ffc7106e4002c42a8d85", archive="cifar-100-python.tar.gz", folder="cifar-100-python",
        train_files=("train",), test_files=("test",), meta_file="meta", label_key="fine_labels",
        extra_label_keys=("coarse_labels",), names_key="fine_label_names", num_classes=100,
        mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762), run_prefix="cifar100-"),
    "folder": Dataset(
        key="folder", title="image folder", url=None, md5=None, archive=None, folder=None,
        train_files=("train",), test_files=("test", "val"), meta_file=None, label_key=None, extra_label_keys=(),
        names_key=None, num_classes=None, mean=None, std=None, run_prefix="folder-"),
}


@dataclass
class LoadedData:
    """What every dataset yields, as CPU tensors."""
    train_images: torch.Tensor  # uint8 (N, 3, H, W)
    train_labels: torch.Tensor  # int64 (N,)
    test_images: torch.Tensor
    test_labels: torch.Tensor
    class_names: list  # index = label
    mean: tuple  # the normalisation for this data
    std: tuple
    extra_labels: dict  # name -> (train int64, test int64), e.g. CIFAR-100's coarse_labels
    source: str  # one line for the log
    notes: list  # warnings already printed, for the run history
    val_images: torch.Tensor | None = None  # held out of train by the trainer (train.hold_out_validation)
    val_labels: torch.Tensor | None = None


def choose_dataset(name, data_dir):
    """The table entry for --dataset; without it, an image folder if data_dir holds train/, else CIFAR-10."""
    data_dir = Path(data_dir)
    if name is None:
        return DATASETS["folder" if has_dataset(DATASETS["folder"], data_dir) else "cifar10"]
    if name not in DATASETS:
        raise DataError(f"--dataset {name} is not one this trainer knows: choose one of {', '.join(DATASETS)}.")
    if name == "folder":
        check_image_folder(DATASETS[name], data_dir)
    return DATASETS[name]


def has_dataset(dataset, data_dir):
    data_dir = Path(data_dir)
    if dataset.key == "folder":
        return (data_dir / dataset.train_files[0]).is_dir()
    folder = data_dir / dataset.folder
    return folder.is_dir() and any(folder.iterdir())


def ensure_dataset(dataset, data_dir):
    """Download the dataset into data_dir unless it is there (an image folder must be there)."""
    data_dir = Path(data_dir)
    if dataset.key == "folder":
        check_image_folder(dataset, data_dir)
        return
    for path in (data_dir, data_dir / dataset.folder):
        if path.exists() and not path.is_dir():
            raise DataError(f"--data-dir: {path} is a file, but it should be a folder holding {dataset.folder}/. "
                            f"Point --data-dir at the folder that holds {dataset.folder}/, or at an empty folder "
                            f"to download {dataset.title} into.")
    if not has_dataset(dataset, data_dir):
        refuse_data_dir_inside_data(dataset, data_dir)
        download(dataset, data_dir)


def refuse_data_dir_inside_data(dataset, data_dir):
    """A --data-dir that is the data itself (CIFAR's extracted folder, or class folders without train/) would
    otherwise count as missing data: a download into it, or a model trained on data the user did not mean."""
    train = DATASETS["folder"].train_files[0]  # what makes a folder an image folder (has_dataset)
    if (data_dir / train).is_dir():
        raise DataError(f"--data-dir {data_dir} is an image folder (it holds {train}/), not {dataset.title}. "
                        f"To train on its images, leave out --dataset or give --dataset folder; for {dataset.title}, "
                        f"point --data-dir at the folder that holds {dataset.folder}/.")
    for other in DATASETS.values():
        if other.meta_file and all((data_dir / name).is_file() for name in (*other.train_files, other.meta_file)):
            raise DataError(f"--data-dir {data_dir} is {other.title}'s own folder ({other.folder}/); point --data-dir "
                            f"at the folder that holds it, {data_dir.parent}"
                            f"{'' if other is dataset else f', with --dataset {other.key}'}.")
    # Class folders hold images at once or one folder down; a folder with a train/ of its own is another dataset.
    with_images = [name for name in (sub_folders(data_dir) if data_dir.is_dir() else [])
                   if not (data_dir / name / train).is_dir() and holds_images_near_the_top(data_dir / name)]
    if with_images:
        raise DataError(f"--data-dir {data_dir} holds folders of images ({', '.join(with_images)}) but no train/ "
                        f"folder, so it was taken for {dataset.title}, which is not there. An image folder holds "
                        f"train/<class>/<images> and, for testing, test/<class>/<images>: move the class folders "
                        f"into {data_dir / 'train'}/, or, if {data_dir.name}/ is such a split, point --data-dir at "
                        f"the folder above it.")


def is_image_name(file_name):
    return os.path.splitext(file_name)[1].lower() in IMAGE_EXTENSIONS


def holds_images_near_the_top(folder):
    """Whether folder, or a folder in it, holds an image file: a class folder does. Deeper trees are not walked."""
    for root, dirs, file_names in os.walk(folder):
        if any(map(is_image_name, file_names)):
            return True
        if root != str(folder):
            dirs.clear()  # no deeper than one folder down
    return False


def fetch_dataset(dataset, data_dir, local_rank, wait_s, image_size=CIFAR_IMAGE_SIZE, local_world_size=1):
    """The dataset in data_dir on every machine, before the process group forms.

    Only each machine's first process (LOCAL_RANK 0) downloads: machines without shared storage each need a
    copy, and one machine's processes must not download over each other. The others wait for the folder,
    which appears whole. Waiting here rather than in a barrier of the process group keeps NCCL's watchdog
    from aborting the waiting ranks during a slow download. An image folder is never downloaded; under
    torchrun its first process decodes it into the cache and the others wait for that (decode_once_per_machine).
    """
    data_dir = Path(data_dir)
    if dataset.key == "folder":
        if local_world_size > 1:
            decode_once_per_machine(dataset, data_dir, image_size, local_rank, wait_s)
        else:
            check_image_folder(dataset, data_dir)
    elif local_rank == 0:
        ensure_dataset(dataset, data_dir)
    else:
        wait_for(lambda: has_dataset(dataset, data_dir), wait_s,
                 f"download {dataset.title} into {data_dir}, and it is not there")


def wait_for(condition, wait_s, what):
    """Poll until condition() holds; after wait_s seconds, a DataError saying the first process did not `what`."""
    deadline = time.monotonic() + wait_s
    while not condition():
        if time.monotonic() > deadline:
            raise DataError(f"Waited {wait_s / 60:.0f} minutes for this machine's first process (LOCAL_RANK 0) to "
                            f"{what}. See that process's error, or put the data there before starting.")
        time.sleep(1)


def load_dataset(dataset, data_dir, image_size=CIFAR_IMAGE_SIZE):
    """Read the dataset from data_dir (never downloads) and return it as LoadedData."""
    data_dir = Path(data_dir)
    if dataset.key == "folder":
        return load_image_folder(dataset, data_dir, image_size)
    check_image_size(dataset, image_size)
    return load_cifar(dataset, data_dir)


def check_image_size(dataset, image_size):
    if dataset.key != "folder" and image_size != CIFAR_IMAGE_SIZE:
        raise DataError(f"--image-size {image_size}: {dataset.title} images are 32x32 and are used as they are; "
                        f"--image-size applies to image folders only. Drop --image-size.")


# ----------------------------------------------------------------------------------------------
# CIFAR: the official archives, Python 2 pickles of numpy arrays.


def download(dataset, data_dir):
    """Download the official archive, check its MD5 and extract it safely into data_dir."""
    made = not data_dir.exists()
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{dataset.title} is not in {data_dir / dataset.folder}, and {data_dir} cannot be made to "
                        f"download it into ({e.strerror or e}). Point --data-dir at the folder that holds "
                        f"{dataset.folder}/, or at a folder that can be written.") from None
    archive = data_dir / dataset.archive
    partial = archive.with_name(archive.name + ".part")
    folder = data_dir / dataset.folder
    try:
        fetch_archive(dataset, partial)
    except DataError:
        if made and not any(data_dir.iterdir()):  # a failed download leaves no empty folder behind
            data_dir.rmdir()
        raise
    os.replace(partial, archive)
    # Extracted beside the target, then renamed into place: a process waiting for the folder (fetch_dataset)
    # sees it whole or not at all.
    staging = data_dir / f".extracting.{os.getpid()}"
    try:
        safe_extract(archive, staging, dataset.title)
        if folder.is_dir():
            folder.rmdir()  # an empty folder (a full one is never downloaded over)
        os.replace(staging / dataset.folder, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"[data] extracted to {folder}")


def fetch_archive(dataset, partial):
    """Download dataset's archive to `partial` and check its MD5; a failure (a DataError) leaves no partial file."""
    from tqdm import tqdm

    data_dir, folder = partial.parent, partial.parent / dataset.folder
    print(f"[data] downloading {dataset.url}")
    try:
        with urllib.request.urlopen(dataset.url, timeout=60) as response, open(partial, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, disable=not sys.stderr.isatty()) as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
    except OSError as e:  # URLError, timeouts and disk errors are all OSErrors
        partial.unlink(missing_ok=True)
        files = ", ".join((*dataset.train_files, *dataset.test_files, dataset.meta_file))
        raise DataError(
            f"{dataset.title} is not in {folder} and downloading it from {dataset.url} failed ({e}). "
            f"If this machine is offline, fetch {dataset.archive} elsewhere and extract it so that {folder}/ "
            f"holds {files}, or point --data-dir at a folder that holds {dataset.folder}/, or set "
            f"{dataset.key.upper()}_URL to a mirror's address of {dataset.archive}."
        ) from None
    if file_md5(partial) != dataset.md5:
        partial.unlink()
        raise DataError(f"The {dataset.title} archive downloaded from {dataset.url} does not have the expected MD5 "
                        f"{dataset.md5}; it was deleted. Try again, or download {dataset.archive} by hand into "
                        f"{data_dir}.")


def file_md5(path):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def safe_extract(archive, target, title):
    """Extract a tar archive, refusing members that would land outside target."""
    target = Path(target).resolve()
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            dest = (target / member.name).resolve()
            bad = member.name.startswith("/") or not dest.is_relative_to(target)
            if member.issym() or member.islnk():
                link_dest = ((dest.parent if member.issym() else target) / member.linkname).resolve()
                bad = bad or member.linkname.startswith("/") or not link_dest.is_relative_to(target)
            if bad or not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
                raise DataError(f"Refusing to extract {archive}: member {member.name!r} would be written outside "
                                f"{target} or is not a regular file. The archive is not the official {title} one.")
        # The "data" filter (Python 3.11.4+) adds its own checks on top of ours where available.
        tar.extractall(target, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))


class CifarUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR files hold (numpy arrays, lists, strings): a pickle that asks for anything
    else, such as a function to call, is refused instead of run."""

    # __builtin__.bytes: how a Python 2 pickle spells an empty byte string (an array with no images).
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("_codecs", "encode"), ("__builtin__", "bytes")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it asks for {module}.{name}, which CIFAR files never contain")
        return super().find_class(module, name)


def read_pickle(dataset, path):
    """One of the dataset's Python 2 pickles, through CifarUnpickler."""
    fix = f"Delete the folder {path.parent} and run again to download a fresh copy"
    try:
        with open(path, "rb") as f:
            content = CifarUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise DataError(f"{dataset.title} file {path} is missing. {fix}, or restore the file.") from None
    except OSError as e:  # a folder where the file should be, no permission, a failing disk
        raise DataError(f"{dataset.title} file {path} cannot be read ({e.strerror or e}). {fix}, "
                        f"or restore the file.") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError,
            KeyError) as e:
        raise DataError(f"{dataset.title} file {path} is truncated or not a {dataset.title} pickle "
                        f"({type(e).__name__}: {e}). {fix}.") from None
    return content


def invalid(dataset, path, problem):
    return DataError(f"{dataset.title} file {path} is not valid: {problem}. Delete the folder {path.parent} "
                     f"and run again to download a fresh copy.")


def read_batch_file(dataset, path):
    """One split's pickle, validated: (uint8 N,3,32,32; int64 N; {extra label key: int64 N})."""
    batch = read_pickle(dataset, path)
    label_keys = (dataset.label_key, *dataset.extra_label_keys)
    missing = [key for key in ("data", *label_keys) if not isinstance(batch, dict) or key not in batch]
    if missing:
        entries = " and ".join(f"'{key}'" for key in missing)
        raise invalid(dataset, path, f"it has no {entries} {'entry' if len(missing) == 1 else 'entries'}")
    data = np.asarray(batch["data"])
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.dtype != np.uint8:
        raise invalid(dataset, path, f"its images have shape {data.shape} and type {data.dtype}, "
                                     f"expected (N, 3072) uint8")
    if len(data) == 0:
        raise invalid(dataset, path, "it holds no images")
    labels = {}
    for key in label_keys:
        # Only the learned labels have a known number of classes; the others must be non-negative integers.
        top = dataset.num_classes - 1 if key == dataset.label_key else None
        expected = f"integers 0..{top}" if top is not None else "non-negative integers"
        values = np.asarray(batch[key])
        if values.shape != (len(data),):
            raise invalid(dataset, path, f"it has {values.size} {key} for {len(data)} images")
        if not np.issubdtype(values.dtype, np.integer):
            raise invalid(dataset, path, f"its {key} are of type {values.dtype}, expected {expected}")
        if values.min() < 0 or (top is not None and values.max() > top):
            raise invalid(dataset, path, f"its {key} range over {values.min()}..{values.max()}, expected {expected}")
        labels[key] = torch.from_numpy(values.astype(np.int64))
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return images, labels.pop(dataset.label_key), labels


def read_class_names(dataset, path):
    meta = read_pickle(dataset, path)
    names = meta.get(dataset.names_key) if isinstance(meta, dict) else None
    if names is None:
        raise invalid(dataset, path, f"it has no '{dataset.names_key}' entry")
    if not (isinstance(names, list) and len(names) == dataset.num_classes and all(isinstance(n, str) for n in names)):
        raise invalid(dataset, path, f"its '{dataset.names_key}' is not a list of {dataset.num_classes} class names")
    return names


def read_split(dataset, folder, names):
    """A split's pickles, joined: (images, labels, {extra label key: labels})."""
    parts = [read_batch_file(dataset, folder / name) for name in names]
    extra = {key: torch.cat([part[2][key] for part in parts]) for key in dataset.extra_label_keys}
    return torch.cat([part[0] for part in parts]), torch.cat([part[1] for part in parts]), extra


def load_cifar(dataset, data_dir):
    folder = data_dir / dataset.folder
    if not has_dataset(dataset, data_dir):
        raise DataError(f"{dataset.title} is not in {folder}. Point --data-dir at the folder that holds "
                        f"{dataset.folder}/, or at an empty folder to download {dataset.title} into.")
    class_names = read_class_names(dataset, folder / dataset.meta_file)
    train_images, train_labels, train_extra = read_split(dataset, folder, dataset.train_files)
    test_images, test_labels, test_extra = read_split(dataset, folder, dataset.test_files)
    return LoadedData(train_images, train_labels, test_images, test_labels, class_names, dataset.mean, dataset.std,
                      extra_labels={key: (train_extra[key], test_extra[key]) for key in dataset.extra_label_keys},
                      source=f"{dataset.title} from {folder}", notes=[])


# ----------------------------------------------------------------------------------------------
# Image folders: DIR/train/<class>/..., DIR/test/<class>/... (or val/), images at any depth in a class folder.


def check_image_folder(dataset, data_dir):
    train = data_dir / dataset.train_files[0]
    if not train.is_dir():
        where = (f"{train} is a file, not a folder" if train.exists() else
                 f"{data_dir} is a file, not a folder" if data_dir.exists() and not data_dir.is_dir() else
                 f"{data_dir} has no {train.name}/ folder")
        raise DataError(f"--data-dir {data_dir} is not an image folder: {where}. An image folder holds "
                        f"train/<class>/<images> and, for testing, test/<class>/<images> or val/<class>/<images> "
                        f"(without one, {HOLDOUT_FRACTION:.0%} of train/ is held out). Point --data-dir at such a "
                        f"folder, or choose --dataset cifar10 or cifar100.")


@dataclass(frozen=True)
class FolderLayout:
    """What an image folder holds, found by listing it (no image is opened)."""
    class_names: list
    train_split: str
    train_files: list  # [(path relative to the folder, label)]
    test_split: str | None  # None: HOLDOUT_FRACTION of train_split is held out
    test_files: list
    source: str  # one line for the log
    notes: list  # warnings about the layout, printed and kept with the decoded images


def image_folder_layout(dataset, data_dir):
    check_image_folder(dataset, data_dir)
    train_split = dataset.train_files[0]
    class_names = class_folders(data_dir / train_split)
    if len(class_names) < 2:
        raise DataError(f"{data_dir / train_split} holds one class folder ({class_names[0]}): a classifier needs two "
                        f"classes or more. Put each class's images in a folder of its own there.")
    train_files, test_files, notes = list_images(data_dir, train_split, class_names), [], []
    # The first test split that holds class folders; one of loose files (a competition's unlabelled test/)
    # cannot be scored, so it is passed over with a warning.
    test_split, test_classes = None, []
    for name in dataset.test_files:
        if not (data_dir / name).is_dir():
            continue
        test_classes = sub_folders(data_dir / name)
        if test_classes:
            test_split = name
            break
        notes.append(f"{data_dir / name} holds no class folders (unlabelled images?), so it cannot be tested on: "
                     f"not used")
    if test_split:
        unknown = [name for name in test_classes if name not in class_names]
        if unknown:
            raise DataError(f"{data_dir / test_split} has class folders that {data_dir / train_split} does not have: "
                            f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}. The model can only learn "
                            f"the classes it trains on: rename those folders to match {train_split}/'s class "
                            f"folders, or add training images for them.")
        test_files = list_images(data_dir, test_split, class_names)
        source = f"image folder {data_dir} (test split: {test_split}/)"
    else:
        source = (f"image folder {data_dir} (no test split: {HOLDOUT_FRACTION:.0%} of {train_split}/ held out, "
                  f"stratified, fixed)")
    return FolderLayout(class_names, train_split, train_files, test_split, test_files, source, notes)


def sub_folders(split_dir):
    """The split's sub-folders, sorted (hidden ones, such as .ipynb_checkpoints, ignored)."""
    try:
        return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as e:
        raise DataError(f"{split_dir} cannot be read ({e.strerror or e}). Check that the folder exists and can be "
                        f"read, or point --data-dir elsewhere.") from None


def class_folders(split_dir):
    """The split's class names: its sub-folders."""
    names = sub_folders(split_dir)
    if not names:
        raise DataError(f"{split_dir} holds no class folders. Put each class's images in a folder of its own, "
                        f"named after the class: {split_dir}/<class>/<images>.")
    # A class's name goes into the log, the report and the plots, which need text: a name in another encoding
    # (a zip made on Windows) is named, with its undecodable bytes escaped, rather than failing in matplotlib.
    undecodable = [os.fsencode(name).decode("utf-8", "backslashreplace") for name in names
                   if any("\udc80" <= c <= "\udcff" for c in name)]  # bytes os.fsdecode could not decode
    if undecodable:
        raise DataError(f"{split_dir} has class folders whose names are not UTF-8 text: "
                        f"{', '.join(undecodable[:5])}. Rename them (the class names appear in the report and "
                        f"plots).")
    return names


def list_images(data_dir, split, class_names):
    """[(path relative to data_dir, label)] of every image file in the split's class folders, in sorted order.
    Plain strings rather than Paths: listing 60,000 files then takes a fraction of a second, not seconds."""
    files = []
    for label, name in enumerate(class_names):
        class_dir = data_dir / split / name
        if not class_dir.is_dir():
            continue  # a class the test split does not have
        found = image_files(class_dir, data_dir)
        if not found:
            raise DataError(f"Class folder {class_dir} holds no images (files ending in {', '.join(IMAGE_EXTENSIONS)}, "
                            f"at any depth). Put the class's images there, or remove the folder.")
        files += [(path, label) for path in found]
    return files


def image_files(folder, relative_to):
    """Every image file under folder, at any depth, as paths relative to `relative_to`, sorted. Hidden files and
    folders (.ipynb_checkpoints, .cache) are not data."""
    found = []
    for root, dirs, file_names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        inside = os.path.relpath(root, relative_to)
        found += [os.path.join(inside, f) for f in file_names
                  if not f.startswith(".") and is_image_name(f)]
    return sorted(found)


def decode_image(path, size):
    """(uint8 (size, size, 3) array, None), or (None, why) if Pillow cannot read the file."""
    try:
        with warnings.catch_warnings():
            # Pillow's warnings of a very large image (it is decoded scaled down) and of a palette's transparency
            # (dropped, as any alpha) would print a source line each, from each decoding process.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)
            with Image.open(path) as image:
                return rgb_pixels(image, size)
    except UnidentifiedImageError:  # its message repeats the whole path
        return None, "not an image format Pillow reads"
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError... for broken files
        return None, f"{type(e).__name__}: {e}"


def rgb_pixels(image, size):
    """decode_image's answer for an opened image."""
    image.draft("RGB", (size, size))  # a JPEG much larger than `size` is decoded at 1/2, 1/4 or 1/8 scale
    try:
        image = ImageOps.exif_transpose(image)  # a phone's photo the way up a viewer shows it
    except Exception:  # a malformed EXIF block, on which Pillow has raised in some releases: the image as stored
        pass
    if image.mode == "F":  # its range is anyone's guess (0-1? 0-255?): not guessed
        return None, "floating-point pixels (mode F); save the image with 8 or 16 bits a channel"
    if image.mode.startswith("I"):  # grey levels of 16 bits (I;16, or I from some readers), which convert() clips
        image = Image.fromarray((np.asarray(image, np.float64) / 257).clip(0, 255).round().astype(np.uint8))
    image = image.convert("RGB")
    if image.size != (size, size):
        # Bilinear, as torchvision's Resize: Pillow widens its filter when shrinking, so a large image
        # is averaged down rather than sampled (no aliasing), and it is cheaper than bicubic or Lanczos.
        image = image.resize((size, size), Image.BILINEAR)
    return np.asarray(image), None


def decode_images(paths, image_size):
    """decode_image's results for each path, in order. Decoding is CPU-bound (Pillow and Python), so many images
    are spread over a process per core: on 2 idle cores, 2 processes decode CIFAR's 32x32 JPEGs twice as fast."""
    decode = functools.partial(decode_image, size=image_size)
    workers = os.cpu_count() or 1
    if workers == 1 or len(paths) < POOL_MIN_FILES:
        yield from map(decode, paths)
        return
    with multiprocessing.Pool(workers, initializer=quiet_worker) as pool:
        yield from pool.imap(decode, paths, chunksize=256)


def quiet_worker():
    """A decoding process leaves stops to the trainer, which ends the pool, rather than each printing its own
    traceback: it ignores Ctrl-C, and SIGTERM (to the whole process group) ends it as it would any process, not
    through the trainer's handler, which it inherited."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def decode_split(data_dir, split, files, image_size):
    """Decode a split's files into (uint8 N,3,S,S; int64 N; notes), skipping unreadable ones."""
    from tqdm import tqdm

    images = np.empty((len(files), 3, image_size, image_size), np.uint8)
    problems = {}  # index -> why
    paths = [os.path.join(data_dir, path) for path, _ in files]
    for i, (pixels, problem) in enumerate(tqdm(decode_images(paths, image_size), total=len(files), unit="img",
                                               desc=f"[data] decoding {split}/", leave=False,
                                               disable=not sys.stderr.isatty())):
        if problem:
            problems[i] = problem
        else:
            images[i] = pixels.transpose(2, 0, 1)
    bad = [f"{files[i][0]} ({problem})" for i, problem in problems.items()]  # e.g. "train/cat/x.jpg (why)"
    if len(bad) > BAD_FILES_LIMIT * len(files):
        raise DataError(f"{len(bad)} of the {len(files)} image files in {data_dir / split} "
                        f"({len(bad) / len(files):.1%}) cannot be read as images, for example {'; '.join(bad[:3])} "
                        f"(in {data_dir}). Up to {BAD_FILES_LIMIT:.0%} of a split's files are skipped with a warning; "
                        f"this many suggests the files are not images or are damaged. Check them, or remove the "
                        f"broken ones.")
    notes = [f"skipped {name} in {data_dir}" for name in bad[:SHOWN_FILES]]
    if len(bad) > SHOWN_FILES:
        notes.append(f"skipped {len(bad) - SHOWN_FILES} more unreadable images in {data_dir / split}")
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    if problems:
        keep = torch.ones(len(files), dtype=torch.bool)
        keep[list(problems)] = False
        return torch.from_numpy(images)[keep], labels[keep], notes
    return torch.from_numpy(images), labels, notes


def hold_out(labels, num_classes):
    """A boolean mask of the test images: HOLDOUT_FRACTION of each class (at least one of any class with two or
    more), drawn with a fixed seed, so the split depends only on the files."""
    generator = torch.Generator().manual_seed(HOLDOUT_SEED)
    test = torch.zeros(len(labels), dtype=torch.bool)
    for k in range(num_classes):
        members = (labels == k).nonzero().flatten()
        count = max(1, round(len(members) * HOLDOUT_FRACTION)) if len(members) > 1 else 0
        test[members[torch.randperm(len(members), generator=generator)[:count]]] = True
    return test


def channel_stats(images):
    """Per-channel mean and std of uint8 images, in [0, 1] units, as tuples of floats."""
    total, squares = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for chunk in images.split(max(1, (1 << 22) // images[0].numel())):  # float64 copies of ~32 MB at a time
        chunk = chunk.to(torch.float64)
        total += chunk.sum((0, 2, 3))
        squares += chunk.square().sum((0, 2, 3))
    count = images.numel() / 3
    mean = total / count / 255
    std = (squares / count / 255**2 - mean.square()).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def cache_key(data_dir, image_size, files):
    """Changes when any image file is added, removed, renamed or changes size (an edit that keeps the size does
    not: delete DIR/.cache then), or when image_size does."""
    root = str(data_dir)
    digest = hashlib.blake2b(f"{CACHE_FORMAT} {image_size}".encode())
    for path, _ in files:
        try:
            size = os.stat(os.path.join(root, path)).st_size
        except OSError:  # e.g. a broken link: it will be skipped as unreadable
            size = -1
        digest.update(os.fsencode(f"\n{path} {size}"))  # as the file system spells it: names need not be UTF-8
    return digest.hexdigest()[:16]


def read_cache(path):
    """The cached tensors as a dict, or None if there is no usable cache."""
    if not path.is_file():
        return None
    try:
        cached = torch.load(path, weights_only=True)
        return {key: cached[key] for key in ("train_images", "train_labels", "test_images", "test_labels",
                                             "class_names", "mean", "std", "notes")}
    except Exception as e:  # torn, foreign or from another version of the trainer: decode again
        print(f"[data] warning: ignoring the unreadable cache {path} ({type(e).__name__}); decoding again")
        return None


def write_cache(path, decoded):
    """Write the cache through a temporary file, so a crash or a concurrent process never leaves a torn one.
    Returns whether it was written; a failure (read-only folder, full disk) only costs the next run a decode."""
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(exist_ok=True)
        torch.save(decoded, temporary)
        os.replace(temporary, path)
        return True
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        print(f"[data] warning: cannot write the cache {path} ({e}); the next run decodes the images again")
        try:
            temporary.unlink(missing_ok=True)
        except OSError:
            pass
        return False


def load_image_folder(dataset, data_dir, image_size):
    start = time.perf_counter()
    layout = image_folder_layout(dataset, data_dir)
    cache = cache_path(data_dir, image_size, layout)
    decoded = read_cache(cache)
    if decoded is not None:
        for note in decoded["notes"]:
            print(f"[data] warning: {note}")
        count = len(decoded["train_images"]) + len(decoded["test_images"])
        print(f"[data] {count} images from the cache {cache} in {time.perf_counter() - start:.1f}s")
    else:
        decoded = decode_image_folder(data_dir, image_size, layout)
        where = f"cached for the next run in {cache}" if write_cache(cache, decoded) else "not cached"
        print(f"[data] decoded {len(decoded['train_labels']) + len(decoded['test_labels'])} images in "
              f"{time.perf_counter() - start:.1f}s ({where})")
    return LoadedData(**decoded, extra_labels={}, source=layout.source)


def cache_path(data_dir, image_size, layout):
    return data_dir / ".cache" / f"decoded-{cache_key(data_dir, image_size, layout.train_files + layout.test_files)}.pt"


def decode_image_folder(data_dir, image_size, layout):
    """The folder's splits decoded (and the hold-out drawn), with their statistics: what the cache holds."""
    train_images, train_labels, notes = decode_split(data_dir, layout.train_split, layout.train_files, image_size)
    if layout.test_split:
        test_images, test_labels, test_notes = decode_split(data_dir, layout.test_split, layout.test_files,
                                                            image_size)
        notes += test_notes
    else:
        test = hold_out(train_labels, len(layout.class_names))
        test_images, test_labels = train_images[test], train_labels[test]
        train_images, train_labels = train_images[~test], train_labels[~test]
    notes = layout.notes + notes
    for note in notes:
        print(f"[data] warning: {note}")
    mean, std = channel_stats(train_images)
    return dict(train_images=train_images, train_labels=train_labels, test_images=test_images,
                test_labels=test_labels, class_names=layout.class_names, mean=mean, std=std, notes=notes)


def decode_once_per_machine(dataset, data_dir, image_size, local_rank, wait_s):
    """Under torchrun: this machine's first process decodes the folder into the cache; the others wait for it
    (and then read it, like a second run), rather than each decoding it with a process per core."""
    layout = image_folder_layout(dataset, data_dir)
    cache = cache_path(data_dir, image_size, layout)
    if local_rank != 0:
        wait_for(cache.is_file, wait_s, f"decode the image folder {data_dir} into {cache}, and it has not")
        return
    if cache.is_file():
        return
    start = time.perf_counter()
    if not write_cache(cache, decode_image_folder(data_dir, image_size, layout)):
        raise DataError(f"Under torchrun the decoded images are shared through the cache {cache}, which cannot be "
                        f"written (see the warning above). Make {data_dir} writable or free some space there, "
                        f"or train with one process (python train.py).")
    print(f"[data] decoded {len(layout.train_files) + len(layout.test_files)} image files in "
          f"{time.perf_counter() - start:.1f}s, for this machine's other processes to read from {cache}")
