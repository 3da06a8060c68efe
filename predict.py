"""Classify images with a model trained by train.py.

    python predict.py runs/cifar10-001/best_model.pth cat.jpg dog.png       # the top 3 classes of each image
    python predict.py runs/cifar10-001/best_model.pth photos/ --top-k 1     # every image under photos/, recursively
    python predict.py runs/cifar10-001/best_model.pth photos/ > labels.txt  # one line per image, progress on stderr
    python predict.py runs/cifar10-001/best_model.pth --benchmark           # images/s at batch 1 and 256 here
    python predict.py --help                                                 # every flag

Each image is decoded and resized as training decoded its images (datasets.decode_image) and normalised with
the statistics saved in the checkpoint. One line per image on stdout, in the order the paths were given
(folders sorted): `photos/cat1.jpg: cat 91.2%, dog 5.1%, frog 1.0%`.
Exit codes: 0 every image classified; 1 some path was unreadable, missing or an empty folder (each named on
stderr; the others are still classified); 2 a bad model file or flag; 130 Ctrl-C; 141 (as a process killed by
SIGPIPE) when stdout's reader stopped reading (| head), which is nothing wrong with the images.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import train
from datasets import IMAGE_EXTENSIONS, decode_images, image_files
from models import count_parameters

EXIT_SOME_FAILED = 1
BENCHMARK_BATCH_SIZES = (1, 256)
BENCHMARK_SECONDS = 2.0  # per batch size: a fixed time, so that a slow CPU is measured as quickly as a GPU


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Classify images with a best_model.pth written by train.py: one line "
                                            "per image on stdout with its most likely classes.")
    p.add_argument("model", type=Path, help="a best_model.pth written by train.py")
    p.add_argument("images", type=Path, nargs="*",
                   help=f"image files and folders; folders are searched recursively for {' '.join(IMAGE_EXTENSIONS)} "
                        f"files")
    p.add_argument("--top-k", type=int, default=3, help="classes shown per image (default: 3)")
    p.add_argument("--device", choices=["auto", "cpu"], default="auto",
                   help="auto: a CUDA GPU if there is one, else the CPU (default: auto)")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default: 256)")
    p.add_argument("--benchmark", action="store_true",
                   help=f"print the model's throughput on the device at batch sizes "
                        f"{' and '.join(map(str, BENCHMARK_BATCH_SIZES))} (images are then optional)")
    args = p.parse_intermixed_args(argv)  # flags may come between or after the image paths
    if args.top_k < 1:
        raise train.UserError(f"--top-k must be at least 1, got {args.top_k}. See python predict.py --help.")
    if args.batch_size < 1:
        raise train.UserError(f"--batch-size must be at least 1, got {args.batch_size}. See python predict.py --help.")
    if not args.images and not args.benchmark:
        raise train.UserError("no images given. Name image files or folders after the model, e.g. python predict.py "
                              "runs/cifar10-001/best_model.pth photos/, or give --benchmark.")
    return args


def find_images(paths):
    """(image paths to classify, [(path, why)] for the paths that give none), in the order given."""
    images, problems = [], []
    for path in paths:
        if path.is_file():
            images.append(str(path))  # a file named by the user is tried whatever its extension
        elif path.is_dir():
            found = [os.path.normpath(os.path.join(path, f)) for f in image_files(path, path)]
            if not found:
                problems.append((path, f"no images in this folder (files ending in {', '.join(IMAGE_EXTENSIONS)})"))
            images += found  # sorted by image_files
        else:
            problems.append((path, "no such file or folder"))
    return images, problems


@torch.inference_mode()
def batch_probabilities(model, images_uint8, normalization):
    """Softmax over the classes for one batch of uint8 NCHW images on the model's device, prepared as in training
    (train.class_probabilities does a whole split, in batches, backing off when out of memory)."""
    _, logits = train.predict_batch(model, images_uint8, normalization, tta=0, autocast_dtype=None)
    return logits.softmax(1)


def classify(model, checkpoint, device, paths, top_k, batch_size):
    """Print one line per image; returns the [(path, why)] of the images that could not be read."""
    normalization = train.normalization_of(checkpoint)
    class_names = checkpoint["class_names"]
    top_k = min(top_k, len(class_names))
    bar = tqdm(total=len(paths), unit="img", leave=False, dynamic_ncols=True) if sys.stderr.isatty() else None
    unreadable = []
    batch_paths, batch_images = [], []
    # decode_images spreads large lists over a process per core and yields in order.
    for index, (path, (pixels, why)) in enumerate(zip(paths, decode_images(paths, checkpoint["image_size"]))):
        if pixels is None:
            unreadable.append((path, why))
            tqdm.write(f"{path}: unreadable ({why})", file=sys.stderr)
        else:
            batch_paths.append(path)
            batch_images.append(pixels)
        if batch_images and (len(batch_images) == batch_size or index == len(paths) - 1):
            # HWC arrays stacked and permuted to NCHW are already channels_last in memory: no copy.
            images = torch.from_numpy(np.stack(batch_images)).permute(0, 3, 1, 2).to(device)
            probabilities, classes = batch_probabilities(model, images, normalization).topk(top_k, dim=1)
            lines = [f"{p}: " + ", ".join(f"{class_names[c]} {100 * q:.1f}%" for q, c in zip(qs, cs))
                     for p, qs, cs in zip(batch_paths, probabilities.tolist(), classes.tolist())]
            tqdm.write("\n".join(lines), file=sys.stdout)  # tqdm.write keeps the lines clear of a progress bar
            batch_paths, batch_images = [], []
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return unreadable


def benchmark(model, checkpoint, device):
    """Print images/s at each benchmark batch size: random images, one warm-up pass, then about
    BENCHMARK_SECONDS of passes, waiting for the GPU after each so that its queued work is counted."""
    size = checkpoint["image_size"]
    normalization = train.normalization_of(checkpoint)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU {train.cpu_model()}, torch threads: {torch.get_num_threads()}")
    print(f"[benchmark] {train.model_text(checkpoint['model_name'], checkpoint['model_kwargs'])}, "
          f"{count_parameters(model):,} parameters, "
          f"{size}x{size} images, on {where}", flush=True)
    for batch_size in BENCHMARK_BATCH_SIZES:
        images = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, device=device)
        batch_probabilities(model, images, normalization)  # the first pass allocates and picks kernels
        train.synchronize(device)
        passes, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < BENCHMARK_SECONDS:
            batch_probabilities(model, images, normalization)
            train.synchronize(device)
            passes += 1
        print(f"[benchmark] batch size {batch_size}: {passes * batch_size / elapsed:,.1f} images/s "
              f"(batches timed: {passes}, {elapsed:.1f} s)", flush=True)


def main(argv=None):
    try:
        args = parse_args(argv)
        model, checkpoint = train.load_trained_model(args.model)
    except train.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return train.EXIT_BAD_INPUT
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True  # batches of one shape: let cuDNN pick the fastest kernels, as train.py does
    model = model.to(device, memory_format=torch.channels_last)
    paths, problems = find_images(args.images)
    for path, why in problems:
        print(f"{path}: {why}", file=sys.stderr)
    unreadable = classify(model, checkpoint, device, paths, args.top_k, args.batch_size)
    if args.benchmark:
        benchmark(model, checkpoint, device)
    if problems or unreadable:
        print(f"{len(problems) + len(unreadable)} path(s) gave no prediction (named above); "
              f"{len(paths) - len(unreadable)} image(s) were classified.", file=sys.stderr)
        return EXIT_SOME_FAILED
    return 0


def cli():
    train.print_file_names_as_bytes()
    try:
        code = main()
        sys.stdout.flush()  # the last buffered lines: a reader gone by now raises here, not at exit
    except KeyboardInterrupt:
        print("\n[stop] interrupted: the lines printed so far are the images classified", file=sys.stderr)
        code = train.EXIT_SIGINT
    except BrokenPipeError:  # stdout's reader stopped early (e.g. | head)
        train.discard_stdout()
        code = train.EXIT_BROKEN_PIPE
    sys.exit(code)


if __name__ == "__main__":
    cli()
