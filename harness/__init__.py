"""Large-batch SGD scaling harness (Smith, Elsen & De 2020, "On the Generalization Benefit of Noise in SGD")."""

__version__ = "0.1.0"
