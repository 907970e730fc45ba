"""`python -m crossmae_fast.synth`: writes the synthetic audio-visual set.

The work is done in `crossmae_fast.data.synthetic`."""

import sys

from crossmae_fast.data.synthetic import main

if __name__ == "__main__":
    sys.exit(main())
