"""Errors meant for people: each says which file or field was wrong and what to do."""


class SdtuneError(Exception):
    """A problem the user can fix; the CLI prints it as one paragraph and exits non-zero."""


class UnsupportedModelError(SdtuneError):
    """A checkpoint whose architecture sdtune does not handle (SD3, Flux, ...)."""


class UnsafeFileError(SdtuneError):
    """A file that could only be read by running pickled code."""
