"""Federated pneumonia detection (Flower simulation), streamed live to a fedrelay relay.

    python examples/pneumonia/federated.py --rounds 5 --clients 5 --partition noniid
    python examples/pneumonia/federated.py --data ~/datasets/chest_xray   # real images (needs Pillow)

The apps live in the importable package ``fedrelay.demo.federated``: Ray pickles functions from
this script by value, so keeping them out of ``__main__`` keeps each actor's emitter alive across
rounds. This script is the same as ``fedrelay demo --mode federated``.
"""

import sys

from fedrelay.demo.cli import main

if __name__ == "__main__":
    sys.exit(main(["--mode", "federated", *sys.argv[1:]]))
