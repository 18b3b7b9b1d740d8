"""The `governor` command: its verbs (main.py), `governor top`, the text reports and
`governor launch`."""

from governor.cli.main import main

__all__ = ["main"]
