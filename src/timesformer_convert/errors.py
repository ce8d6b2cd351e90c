"""Exception types raised by the converter.

Every error names the file or key it refused and says what to do; the CLI prints ``str(error)`` as one line.
"""


def first_few(items, shown: int = 5) -> str:
    """The first ``shown`` of ``items`` for a message, comma-separated, and how many more there are."""
    items = list(items)
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(map(str, items[:shown])) + more


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


class DownloadError(ConversionError):
    """A checkpoint could not be fetched: the host refused, answered with a web page, or the transfer broke off."""


class IntegrityError(DownloadError):
    """A fetched or cached file differs from the size and sha256 pinned for it in the checksums lock file."""


class ClipError(ValueError):
    """A video clip could not be read or turned into model input."""


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (a CI job cancelled, a container stopped). Raised like Ctrl-C's KeyboardInterrupt, so that the
    same clean-up runs: temporary folders are removed and nothing half-written is left as output."""
