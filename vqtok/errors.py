"""The exception types vqtok raises for problems a user can fix, the tally of failed samples that decides
when a run has failed too often (`ErrorTally`, raising `TooManyErrors`), and `plural`, for the counts that
messages name.

Every module raises these (or subclasses) for bad input, so callers and the
command line can tell a user's mistake from a bug: the CLI turns a
`VQTokError` into a one-line message and exit code 1, and lets anything else
surface as the bug it is.
"""

from __future__ import annotations

from collections.abc import Sequence


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


def plural(count: int, word: str) -> str:
    """word as `count` of it reads: "1 shard", "2 shards"."""
    return word if count == 1 else f"{word}s"


MAX_ERROR_RATE = 0.5  # the share of failed samples above which encode and eval fail
ERROR_RATE_AFTER = 1000  # samples seen before the share is judged during a run; at its end it always is


class TooManyErrors(DataError):
    """A run in which every sample, or more than the share allowed, could not be read or decoded."""


class ErrorTally:
    """The samples a run has seen and the reasons of those that failed, judged against `max_rate`.

    Reasons are counted by their kind, the text before the first ": " ("truncated or corrupt", "cannot read"),
    since what follows names the file or the decoder's words; the message quotes the first reason of the
    commonest kind in full.
    """

    def __init__(self, max_rate: float = MAX_ERROR_RATE) -> None:
        if not 0 <= max_rate <= 1:
            raise ConfigError(f"the maximum error rate is a share in [0, 1], not {max_rate}")
        self.max_rate = max_rate
        self.seen = 0
        self.failed = 0
        self.kinds: dict[str, list] = {}  # kind -> [count, the first full reason]

    def add(self, good: int, reasons: Sequence[str]) -> None:
        self.seen += good + len(reasons)
        self.failed += len(reasons)
        for reason in reasons:
            entry = self.kinds.setdefault(reason.split(": ", 1)[0], [0, reason])
            entry[0] += 1

    def merge(self, other: ErrorTally) -> None:
        self.seen += other.seen
        self.failed += other.failed
        for kind, (count, reason) in other.kinds.items():
            self.kinds.setdefault(kind, [0, reason])[0] += count

    def too_many(self, final: bool = False) -> bool:
        """Every sample failed, or more than max_rate of them; during a run only once ERROR_RATE_AFTER were seen."""
        if self.failed == 0 or (not final and self.seen < ERROR_RATE_AFTER):
            return False
        return self.failed == self.seen or self.failed > self.max_rate * self.seen

    def check(self, what: str, final: bool = False, advice: str = "") -> None:
        """TooManyErrors, in one line naming the commonest reason, when `too_many(final)`; `what` is the verb
        ("encoded"), `advice` what to do next."""
        if not self.too_many(final):
            return
        if self.failed == self.seen:
            summary = f"none of the {self.seen:,} samples could be {what}"
        else:
            summary = f"{self.failed:,} of {self.seen:,} samples could not be {what}, more than --max-error-rate "
            summary += f"{self.max_rate:g}"
        stopped = "" if final else " (stopped early)"
        advice = f". {advice}" if advice else ""
        raise TooManyErrors(f"{summary}{stopped}; {self.commonest()}{advice}")

    def commonest(self) -> str:
        """The commonest kind of reason, its count and its first reason in full ("" when nothing failed)."""
        if not self.kinds:
            return ""
        count, reason = max(self.kinds.values(), key=lambda entry: entry[0])
        return f"the commonest reason ({count:,} samples): {reason}"
