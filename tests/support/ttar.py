"""Unpacks ttar archives, the plain-text format node_exporter keeps its sysfs fixtures in.

Records are `Directory: P`, `Path: P` + `Lines: N` + N lines (a trailing `EOF` marks a
last line without newline, `NULLBYTE` a zero byte), `Mode: OCTAL` and `SymlinkTo: T`;
lines starting with `#` separate records.
"""

from __future__ import annotations

import os
from pathlib import Path


def unpack(archive: Path, dest: Path) -> None:
    lines = archive.read_text(encoding="utf-8").split("\n")
    i = 0
    current: Path | None = None
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(": ")
        if key == "Directory":
            current = dest / value
            current.mkdir(parents=True, exist_ok=True)
        elif key == "Path":
            current = dest / value
            current.parent.mkdir(parents=True, exist_ok=True)
        elif key == "Lines":
            count = int(value)
            body = lines[i : i + count]
            i += count
            text = "\n".join(body)
            if text.endswith("EOF"):
                text = text[: -len("EOF")]
            elif count:
                text += "\n"
            assert current is not None
            current.write_bytes(text.replace("NULLBYTE", "\0").encode())
        elif key == "SymlinkTo":
            assert current is not None
            current.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(value, current)
        elif key == "Mode":
            assert current is not None
            if not current.is_symlink():
                current.chmod(int(value, 8))
        else:
            raise ValueError(f"{archive}:{i}: unknown ttar record {line!r}")
