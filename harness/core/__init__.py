"""The bottom layer: errors a user can fix, strict config loading, dotted config keys, run statuses and atomic
file I/O. Pure Python (PyYAML only): every other package may import it, it imports none of them."""

__version__ = "0.1.0"
