"""`mara-hf <command>`: the command-line interface."""

from .app import main

__all__ = ["main"]
