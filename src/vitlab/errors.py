"""Typed exceptions. Library code raises these with the offending values in the message;
only the CLI turns them into an exit code and a one-line message."""


class VitlabError(Exception):
    """Base class of every error vitlab raises on purpose (a user mistake or bad input)."""


class ConfigError(VitlabError, ValueError):
    """An invalid model or run configuration (names the fields and values involved)."""


class UnknownModelError(ConfigError, KeyError):
    """A preset or variant name that does not exist."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0])


class InputShapeError(VitlabError, ValueError):
    """A tensor handed to the model does not have the shape its config expects."""


class ModelFileError(VitlabError, OSError):
    """A model directory or weight file is missing, truncated, or does not match its config."""


class ConversionError(VitlabError, ValueError):
    """A foreign checkpoint cannot be mapped to (or from) vitlab's layout."""


class DataError(VitlabError, ValueError):
    """A dataset file is missing, truncated, corrupted or inconsistent (names the file and the fix)."""


class DatasetNotFoundError(DataError, FileNotFoundError):
    """A dataset name that is unknown, or a known dataset that is not on disk."""


class TrainingError(VitlabError, RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the last good checkpoint is kept."""


class RunDirError(VitlabError, OSError):
    """A run directory that would be overwritten, or that cannot be resumed."""


class ImageError(DataError):
    """One image file that cannot be used (not a regular file, unreadable, not an image): `.path`, `.reason`.
    Pickles with both, so it crosses process pools intact."""

    def __init__(self, path: str, reason: str):
        super().__init__(str(path), reason)
        self.path, self.reason = str(path), reason

    def __str__(self) -> str:  # control characters in a file name must not fake lines
        from .util import printable
        return f"{printable(self.path)}: {self.reason}"


class ImageTooLargeError(ImageError):
    """An image beyond the pixel-count or aspect-ratio limit (decompression bombs, 1-pixel-thin strips)."""
