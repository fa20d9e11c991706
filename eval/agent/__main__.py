"""``python -m crosscoder.eval.agent --adl DIR --base-model … --chat-model … --endpoint URL --model NAME --out DIR``
(docs/methods.md §10.9)."""

import sys

from crosscoder.eval.agent.cli import main

if __name__ == "__main__":
    sys.exit(main())
