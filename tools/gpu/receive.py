"""On the GPU machine: keep one received part of the kit outside the working tree, checked against its sha256.

Each command brings the working tree anew, so a part carried with one command is gone by the next; this
copies it to /tmp/harmony-gpu-kit/, which stays while the machine is held.

    python3 -m tools.gpu.receive .gpu-kit/part-1-of-5
"""

import argparse
import sys
from pathlib import Path

from tools.gpu.parts import MANIFEST_NAME, RECEIVED_DIR, KitError, load_manifest, receive


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", type=Path, help="the part carried with this command (.gpu-kit/part-K-of-N)")
    parser.add_argument("--received", type=Path, default=RECEIVED_DIR)
    args = parser.parse_args(argv)
    try:
        missing = receive(args.part, load_manifest(args.part.parent / MANIFEST_NAME), args.received)
    except KitError as error:
        sys.exit(f"error: {error}")
    waiting = f"still to send: {', '.join(missing)}" if missing else "all parts received: run `make gpu-check`"
    print(f"received {args.part.name} (sha256 ok) into {args.received}; {waiting}")


if __name__ == "__main__":
    main()
