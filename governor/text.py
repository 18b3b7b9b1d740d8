"""Text that came from outside (job names from the API, Slurm's job names, pod names, the
user a scheduler reports), made safe to print: a control character in a name must not
end a log line and start a forged one, nor reach a terminal as an escape sequence.

The API refuses such characters in what it is sent (`unprintable`); names from a
scheduler are not checked, so whatever prints them escapes them (`printable`).
Standard library only: the CLI, the controller's log lines and the API all use it.
"""

from __future__ import annotations

import logging
import unicodedata

#: control (C0, DEL, C1), format (bidi overrides, zero-width marks), line and paragraph
#: separators, and lone surrogates: characters that move or hide what a reader sees
_UNPRINTABLE = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})


def _unprintable(char: str) -> bool:
    return unicodedata.category(char) in _UNPRINTABLE


def unprintable(text: str) -> str | None:
    """The first character of `text` that may not be printed as is, as "U+000A"; None if
    there is none."""
    for char in text:
        if _unprintable(char):
            return f"U+{ord(char):04X}"
    return None


def printable(text: str) -> str:
    """`text` with each such character written as an escape (\\n, \\x1b, \\u202e); the rest
    unchanged. Cheap when there is nothing to escape."""
    if text.isprintable() and not any(_unprintable(c) for c in text):
        return text
    return "".join(char.encode("unicode_escape").decode("ascii") if _unprintable(char)
                   else char for char in text)


class PrintableFormatter(logging.Formatter):
    """Log lines with every control character of the message escaped: a name that holds
    "\\n... governor.actions: ..." stays inside its own line and forges no other. A
    traceback, added after the message, keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return printable(super().formatMessage(record))
