"""The one error csc raises for a location it cannot read or write."""

from __future__ import annotations


class StorageError(Exception):
    """A location cannot be read; the message names it and says what to check."""

    def __init__(self, message: str = "") -> None:
        super().__init__(_worker_line(str(message)))


def _worker_line(message: str) -> str:
    """The one line a DataLoader worker raised, where torch re-raises the worker's error in
    the training process with the whole traceback as its message."""
    head, _, rest = message.partition("\n")
    if not head.startswith("Caught StorageError in ") or "Traceback" not in rest:
        return message
    line = rest.rstrip().splitlines()[-1].split("StorageError: ", 1)[-1]
    return f"{line} ({head.removeprefix('Caught StorageError ').rstrip('.')})"
