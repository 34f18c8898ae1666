"""The project's own exception types: each message is one line a user can act on."""


class PneumoscanError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits non-zero."""


class ImageReadError(PneumoscanError):
    """A file could not be read as an image (unsupported, broken, too large, ...)."""
