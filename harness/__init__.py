"""Large-batch SGD scaling harness (Smith, Elsen & De 2020, "On the Generalization Benefit of Noise in SGD")."""

from harness.core import __version__  # noqa: F401
