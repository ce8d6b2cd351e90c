"""Exception types raised by the converter.

Every error names the file or key it refused and says what to do; the CLI prints ``str(error)`` as one line.
"""


class ConversionError(ValueError):
    """Base class: a checkpoint could not be converted. The message says why and what to do."""


class CheckpointError(ConversionError):
    """The source file is not a readable TimeSformer checkpoint (missing, unreadable, not weights, unsafe)."""


class RuleError(ConversionError):
    """A state-dict key matched no rename rule, or more than one."""


class CoverageError(ConversionError):
    """The converted state dict does not match the transformers model's keys and shapes."""


class VariantMismatchError(ConversionError):
    """The checkpoint's shapes disagree with the variant it was declared to be."""
