"""Train crosscoders and difference SAEs: ``python train.py`` (offline demo), ``python train.py --help``,
``python train.py --preset paper-batchtopk …``, ``torchrun --nproc-per-node N train.py …``."""

import sys

from crosscoder.cli import main

if __name__ == "__main__":
    sys.exit(main())
