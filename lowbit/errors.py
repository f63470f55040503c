"""Exceptions lowbit raises for bad input.

Every error names the offending thing (recipe key, layer, file, dataset) and, where there
is one, the fix. All derive from ``LowbitError`` (itself a ``ValueError``) so callers can
catch them in one place.
"""


class LowbitError(ValueError):
    """Base class of every error lowbit raises on purpose."""


class RecipeError(LowbitError):
    """A recipe is malformed: unknown key, bad value, unknown built-in name."""


class BitsError(RecipeError):
    """A bit width outside the range a quantizer supports."""


class UnsupportedModelError(LowbitError):
    """The model has layers lowbit cannot quantize, or none it can."""


class NumericalError(LowbitError):
    """Weights or activations hold NaN/Inf, so no meaningful quantization exists."""


class DatasetNotFoundError(LowbitError, FileNotFoundError):
    """A dataset is neither in the data directory nor downloadable."""


class ChecksumError(LowbitError):
    """A downloaded or local file does not match its published checksum."""


class DataMismatchError(LowbitError):
    """Input data does not fit the model (channels, image size, dtype, batch layout)."""
