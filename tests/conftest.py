import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def run_trainer(*args, timeout=300, **popen_kwargs):
    """Run train.py as a user would; returns the CompletedProcess (text output)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT, **popen_kwargs)
