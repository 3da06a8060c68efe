import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_cifar import write_tiny_cifar  # noqa: E402

TINY = ["--model", "SmallCifarNet", "--batch-size", "100"]  # a quick run on the tiny data: 10 steps an epoch


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A tiny CIFAR-format dataset shared by the tests that only read it."""
    data_dir = tmp_path_factory.mktemp("tiny_data")
    write_tiny_cifar(data_dir)
    return data_dir


@pytest.fixture(scope="session")
def finished_run(tiny_data, tmp_path_factory):
    """A finished 1-epoch run on the tiny data, for the tests that only read it or refuse to resume it."""
    out = tmp_path_factory.mktemp("finished")
    result = run_trainer("--epochs", 1, "--data-dir", tiny_data, "--out-dir", out, *TINY, "--tta", 0, "--seed", 0,
                         "--precision", "fp32")
    assert result.returncode == 0, result.stderr
    return out


def history_of(out):
    return json.loads((out / "training_history.json").read_text())


def trainer_command(*args, ranks=None):
    """train.py as a user starts it: with python, or with torchrun and `ranks` processes."""
    launcher = [sys.executable] if ranks is None else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    return [*launcher, str(ROOT / "train.py"), *map(str, args)]


def trainer_env(env, ranks):
    # Under torchrun, one thread per rank: more ranks than this machine's 2 cores would otherwise fight over them.
    return {**os.environ, "PYTHONUNBUFFERED": "1", **({"OMP_NUM_THREADS": "1"} if ranks else {}), **(env or {})}


def run_trainer(*args, ranks=None, timeout=300, cwd=ROOT, env=None):
    """Run the trainer to its end, with `env` added to the environment; returns the CompletedProcess."""
    return subprocess.run(trainer_command(*args, ranks=ranks), capture_output=True, text=True, timeout=timeout,
                          env=trainer_env(env, ranks), cwd=cwd)


def run_cli(*args):
    """train.py's cli() in this process, as run_trainer returns it (exit code, stdout, stderr), for refusals, dry runs
    and short runs that need no signals. A trainer subprocess costs ~3 s of imports; this costs nothing.
    An uncaught exception propagates and fails the test, which is stricter than looking for "Traceback"."""
    import train

    stdout, stderr = io.StringIO(), io.StringIO()
    argv = ["train.py", *map(str, args)]
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        old_argv, sys.argv = sys.argv, argv
        try:
            train.cli()
            code = None  # cli() always exits; reaching here is a failure the assertions will show
        except SystemExit as stop:
            code = stop.code
        finally:
            sys.argv = old_argv
            for signum, handler in handlers.items():  # a run installs its own, for Ctrl-C
                signal.signal(signum, handler)
    return subprocess.CompletedProcess(argv, code, stdout.getvalue(), stderr.getvalue())


def start_trainer(*args, ranks=None, cwd=ROOT, env=None):
    """Start the trainer and return at once (a Popen with text pipes), to interrupt it."""
    return subprocess.Popen(trainer_command(*args, ranks=ranks), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=trainer_env(env, ranks), cwd=cwd)


def wait_for_line(process, text, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = process.stdout.readline()
        if text in line:
            return
        if not line and process.poll() is not None:
            raise AssertionError(f"trainer exited before printing {text!r}: {process.stderr.read()}")
    raise AssertionError(f"no {text!r} within {timeout}s")


def load_test_split(data_dir, dataset="cifar10"):
    """A CIFAR-format folder's test images and labels and the dataset's normalisation, as evaluate() takes them."""
    from datasets import DATASETS, load_dataset

    data = load_dataset(DATASETS[dataset], data_dir)
    return data.test_images, data.test_labels, (data.mean, data.std)


def build_tiny_run(tiny_data, out_dir, batch_size, *extra_flags):
    """A real Run on the tiny data, built in this process so a test can reach inside it."""
    import train

    args = train.parse_args(["--epochs", "2", "--batch-size", str(batch_size), "--model", "SmallCifarNet", "--seed",
                             "0", "--tta", "0", "--data-dir", str(tiny_data), "--out-dir", str(out_dir), *extra_flags])
    hw, dist = train.Hardware((), 1), train.Dist()
    plan = train.plan_for_flags(args, hw, dist)
    dataset = train.DATASETS["cifar10"]
    data, fingerprint = train.load_data(dataset, args.data_dir, 32)
    data = train.place_data(data, plan["val_split"], 0, torch.device("cpu"))
    run = train.build_run(args, hw, plan, dataset, data, fingerprint, 0, dist, Path(out_dir), args.data_dir)
    return run, data
