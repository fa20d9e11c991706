"""``python -m crosscoder.cache {build,info,verify} ...``: see ``crosscoder.cache.cli``."""

import sys

from crosscoder.cache.cli import main

if __name__ == "__main__":
    sys.exit(main())
