"""Errors meant for people: each says which file or field was wrong and what to do."""


class SdtuneError(Exception):
    """A problem the user can fix; the CLI prints it as one paragraph and exits non-zero."""


class UnsupportedModelError(SdtuneError):
    """A checkpoint whose architecture sdtune does not handle (SD3, Flux, ...)."""


class UnsafeFileError(SdtuneError):
    """A file that could only be read by running pickled code."""


def missing_requirement(error: ImportError) -> SdtuneError:
    """Turn an ImportError of a dependency into a message that says how to install it."""
    return SdtuneError(f"a package sdtune needs could not be imported ({error}). Install sdtune's requirements into "
                       f"this Python environment: pip install -r requirements.txt from the sdtune folder "
                       f"(A1111/Forge install them by themselves at the next launch).")
