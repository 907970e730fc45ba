"""`python -m crossmae_fast.prepare`: real videos to audio files, JPEG frames and a manifest.

The work is done in `crossmae_fast.data.extract`."""

import sys

from crossmae_fast.data.extract import main

if __name__ == "__main__":
    sys.exit(main())
