#!/usr/bin/env bash
# Check the environment, report the hardware, run the test suite, then a 2-epoch smoke run of the
# real trainer on a tiny generated CIFAR-format dataset. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

echo "== Python"
"$PYTHON" - <<'PY'
import sys
if sys.version_info < (3, 10):
    sys.exit(f"Python 3.10 or newer is needed, this is {sys.version.split()[0]}")
print(sys.version.split()[0])
PY

echo "== Dependencies"
if ! "$PYTHON" -c "import torch, numpy, matplotlib, tqdm, PIL, pytest" 2>/dev/null; then
    echo "missing packages: installing requirements.txt"
    "$PYTHON" -m pip install -r requirements.txt
fi
"$PYTHON" -c "import torch, numpy, matplotlib; print(f'torch {torch.__version__}, numpy {numpy.__version__}, matplotlib {matplotlib.__version__}')"

echo "== Hardware and plan"
"$PYTHON" train.py --dry-run

echo "== Tests"
"$PYTHON" -m pytest -q --durations=15 tests

echo "== Smoke run: 2 epochs on tiny generated data"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PYTHON" -c "import sys; sys.path.insert(0, 'tests'); from tiny_cifar import write_tiny_cifar; write_tiny_cifar(sys.argv[1])" "$tmp/data"
"$PYTHON" train.py --epochs 2 --batch-size 100 --data-dir "$tmp/data" --out-dir "$tmp/run"
for f in best_model.pth last.pth training_history.json training_curves.png; do
    [ -s "$tmp/run/$f" ] || { echo "smoke run did not write $f"; exit 1; }
done
echo "== All checks passed"
