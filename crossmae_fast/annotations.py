"""`python -m crossmae_fast.annotations`: Flickr-SoundNet / VGG-SS boxes to a manifest.

The work is done in `crossmae_fast.data.box_annotations`."""

import sys

from crossmae_fast.data.box_annotations import main

if __name__ == "__main__":
    sys.exit(main())
