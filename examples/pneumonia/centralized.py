"""Centralized pneumonia detection (PyTorch Lightning, EarlyStopping), streamed live.

    python examples/pneumonia/centralized.py --max-epochs 20 --patience 3

The same model and data as the federated example: the baseline a federation is judged against.
Same as ``fedrelay demo --mode centralized``.
"""

import sys

from fedrelay.demo.cli import main

if __name__ == "__main__":
    sys.exit(main(["--mode", "centralized", *sys.argv[1:]]))
