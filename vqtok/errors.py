"""The exception types vqtok raises for problems a user can fix.

Every module raises these (or subclasses) for bad input, so callers and the
command line can tell a user's mistake from a bug: the CLI turns a
`VQTokError` into a one-line message and exit code 1, and lets anything else
surface as the bug it is.
"""


class VQTokError(Exception):
    """A problem with the user's input, files or settings."""


class ConfigError(VQTokError, ValueError):
    """A setting is missing, unknown or out of range."""


class ModelFormatError(VQTokError):
    """A model directory cannot be read: missing files, newer format, mismatched weights."""


class DataError(VQTokError):
    """Shards cannot be found or read: a spec that matches nothing, a missing file, a broken tar."""


class StoreError(VQTokError):
    """A token dataset cannot be written or read: other settings than the run's, a malformed codes column."""


class StorageError(VQTokError):
    """Files cannot be reached where they are kept: a storage back end that is not installed, credentials the
    store refuses, a missing bucket, an endpoint that does not answer, a full disk."""
