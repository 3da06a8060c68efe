import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_cifar import write_tiny_cifar  # noqa: E402


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A tiny CIFAR-format dataset shared by the tests that only read it."""
    data_dir = tmp_path_factory.mktemp("tiny_data")
    write_tiny_cifar(data_dir)
    return data_dir


def run_trainer(*args, timeout=300, cwd=ROOT, env=None, **popen_kwargs):
    """Run train.py as a user would, with `env` added to the environment; returns the CompletedProcess."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=cwd, **popen_kwargs)


def build_tiny_run(tiny_data, out_dir, batch_size, *extra_flags):
    """A real Run on the tiny data, built in this process so a test can reach inside it."""
    import train

    args = train.parse_args(["--epochs", "2", "--batch-size", str(batch_size), "--model", "SmallCifarNet", "--seed",
                             "0", "--tta", "0", "--data-dir", str(tiny_data), "--out-dir", str(out_dir), *extra_flags])
    hw, dist = train.Hardware((), 1), train.Dist()
    plan, _ = train.plan_run(args, hw, dist)
    data, fingerprint = train.load_data_to_device(args.data_dir, torch.device("cpu"))
    run = train.build_run(args, hw, plan, data, fingerprint, 0, dist)
    run.stop = train.StopRequest()
    return run, args, data
