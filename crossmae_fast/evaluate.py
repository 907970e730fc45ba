"""`python -m crossmae_fast.evaluate`: retrieval and localization of a checkpoint.

The work is done in `crossmae_fast.eval.evaluator`."""

import sys

from crossmae_fast.eval.evaluator import main

if __name__ == "__main__":
    sys.exit(main())
