"""What more test-time augmentation views buy: test accuracy of saved models with more views than --tta 2.

    python bench/tta_views.py runs/budget10m-seed0/best_model.pth runs/budget10m-seed1/best_model.pth

A view is the test image shifted by (dy, dx) pixels (reflect-padded, as train.predict does) and its mirror image,
their logits averaged. --tta 2 is the centre view weighted 1/2 and the shifts (-1, -1) and (1, 1) sharing the
other 1/2; the larger sets below weigh the centre the same and share the rest among more shifts. Each view's
logits are computed once per model and every set is combined from them; a set's seconds are its views' measured
forward passes, what it would add to a run's final evaluation. CIFAR-10 from --data-dir. Never part of the tests.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train  # noqa: E402
from datasets import DATASETS  # noqa: E402

CENTRE = (0, 0)
DIAGONAL = [(-1, -1), (1, 1)]  # train.predict's two shifts
NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != CENTRE]
TWO_PIXELS = [(-2, 0), (2, 0), (0, -2), (0, 2)]
VIEW_SETS = {  # name: shifts sharing the half of the weight the centre does not have ([] = centre alone)
    "centre + mirror (--tta 1)": [],
    "+ 2 diagonal 1-px shifts (--tta 2)": DIAGONAL,
    "+ 4 diagonal 1-px shifts": [(-1, -1), (1, 1), (-1, 1), (1, -1)],
    "+ 8 1-px neighbours": NEIGHBOURS,
    "+ 8 1-px neighbours + 4 2-px shifts": NEIGHBOURS + TWO_PIXELS,
}
PAD = 2  # the largest shift


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", type=Path, help="best_model.pth files written by train.py on CIFAR-10")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--batch-size", type=int, default=1000)
    return p.parse_args()


@torch.no_grad()
def view_logits(model, images, normalization, batch_size):
    """{shift: (mean logits of the shifted view and its mirror, seconds)} for every shift any set uses."""
    shifts = [CENTRE] + sorted({s for shifts in VIEW_SETS.values() for s in shifts})
    found = {}
    for dy, dx in shifts:
        start, parts = time.perf_counter(), []
        for first in range(0, len(images), batch_size):
            inputs = train.normalize(images[first:first + batch_size], normalization)
            padded = F.pad(inputs, (PAD,) * 4, mode="reflect")
            h, w = inputs.shape[-2:]
            view = padded[:, :, PAD + dy:PAD + dy + h, PAD + dx:PAD + dx + w].contiguous(
                memory_format=torch.channels_last)
            parts.append(0.5 * model(view) + 0.5 * model(view.flip(-1)))
        found[(dy, dx)] = torch.cat(parts), time.perf_counter() - start
    return found


def combine(logits, shifts):
    centre = logits[CENTRE][0]
    if not shifts:
        return centre
    return 0.5 * centre + 0.5 * sum(logits[s][0] for s in shifts) / len(shifts)


@torch.no_grad()
def plain_logits(model, images, normalization, batch_size):
    """The image alone, as --tta 0 evaluates it."""
    return torch.cat([train.predict_batch(model, images[i:i + batch_size], normalization, 0, None)[0]
                      for i in range(0, len(images), batch_size)])


def accuracy(logits, data):
    return 100 * (logits.argmax(1) == data.test_labels).float().mean().item()


def main():
    args = parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    data, _ = train.load_data(DATASETS["cifar10"], args.data_dir, 32)
    print(f"CPU {train.cpu_model()}, torch {torch.__version__}, {len(data.test_images):,} test images")
    for path in args.models:
        model, checkpoint = train.load_trained_model(path)
        normalization = train.normalization_of(checkpoint)
        model = model.to(memory_format=torch.channels_last)
        logits = view_logits(model, data.test_images, normalization, args.batch_size)
        centre_seconds = logits[CENTRE][1]
        check = train.predict(model, train.normalize(data.test_images[:args.batch_size], normalization)
                              .contiguous(memory_format=torch.channels_last), 2)[1]
        print(f"\n{path} (train.predict's --tta 2 on the first {args.batch_size} images agrees to "
              f"{(check - combine(logits, DIAGONAL)[:args.batch_size]).abs().max():.1e})")
        plain = plain_logits(model, data.test_images, normalization, args.batch_size)
        print(f"  {'the image alone (--tta 0)':<40} {accuracy(plain, data):6.2f}%")
        for name, shifts in VIEW_SETS.items():
            seconds = centre_seconds + sum(logits[s][1] for s in shifts)
            print(f"  {name:<40} {accuracy(combine(logits, shifts), data):6.2f}%  "
                  f"{2 * (1 + len(shifts))} passes, {seconds:5.1f} s")


if __name__ == "__main__":
    main()
