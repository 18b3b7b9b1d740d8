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


SEPARATOR = "# ttar - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - -"


def pack(root: Path, out: Path) -> None:
    """Write the tree at `root` (named by its last component) as a ttar archive.

    To change a fixture: unpack it, edit the tree, pack it again:
        python -m tests.support.ttar unpack tests/fixtures/sys.ttar /tmp/fx
        python -m tests.support.ttar pack /tmp/fx/sys tests/fixtures/sys.ttar
    """
    records: list[str] = [f"# Archive created by tests/support/ttar.py from {root.name}"]
    base = root.parent

    def visit(path: Path) -> None:
        rel = path.relative_to(base).as_posix()
        if path.is_symlink():
            records.extend([f"Path: {rel}", f"SymlinkTo: {os.readlink(path)}", SEPARATOR])
        elif path.is_dir():
            records.extend([f"Directory: {rel}", f"Mode: {path.stat().st_mode & 0o777:o}",
                            SEPARATOR])
            for child in sorted(path.iterdir()):
                visit(child)
        else:
            text = path.read_bytes().decode().replace("\0", "NULLBYTE")
            lines = text.split("\n")
            if text.endswith("\n"):
                lines = lines[:-1]
            elif lines:
                lines[-1] += "EOF"
            records.extend([f"Path: {rel}", f"Lines: {len(lines)}", *lines,
                            f"Mode: {path.stat().st_mode & 0o777:o}", SEPARATOR])

    visit(root)
    out.write_text("\n".join(records) + "\n", encoding="utf-8")


if __name__ == "__main__":
    import sys

    verb, source, dest = sys.argv[1:4]
    if verb == "pack":
        pack(Path(source), Path(dest))
    elif verb == "unpack":
        Path(dest).mkdir(parents=True, exist_ok=True)
        unpack(Path(source), Path(dest))
    else:
        raise SystemExit("usage: python -m tests.support.ttar pack|unpack SOURCE DEST")
