"""A fault from outside for the test session's Ray workers (tests/conftest.py puts this folder on their
PYTHONPATH, so Python imports it at their start): a Pillow image format whose files kill the process
that decodes them with SIGSEGV, as a crashing native decoder would. Only bytes that start with `MAGIC`
reach it; every other image decodes as before. Production code knows nothing of it."""

import os
import signal

from PIL import Image, ImageFile

MAGIC = b"HOVLE-SEGFAULT"  # Pillow shows a format 16 bytes of the file


class _SegfaultingImage(ImageFile.ImageFile):
    format = "HOVLE_TEST_SEGFAULT"
    format_description = "kills its decoder (tests only)"

    def _open(self) -> None:
        os.kill(os.getpid(), signal.SIGSEGV)


Image.register_open(_SegfaultingImage.format, _SegfaultingImage, lambda prefix: prefix.startswith(MAGIC))
