"""dicomnode: a DICOM AI node for CT studies."""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
