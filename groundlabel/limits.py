"""The default limits on what a worker accepts as an image (each overridable in the settings)."""

#: The largest image file a worker reads or downloads, in bytes (``GROUNDLABEL_MAX_IMAGE_BYTES``).
DEFAULT_MAX_BYTES = 50 * 1024 * 1024
#: The most pixels an image header may announce (``GROUNDLABEL_MAX_IMAGE_PIXELS``).
DEFAULT_MAX_PIXELS = 100_000_000
