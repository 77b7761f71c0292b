"""quantselect: measure quantized candidates of a model on your own task, recommend the cheapest
that keeps quality, and serve it.

Importing this package is cheap on purpose: torch, ray, transformers, sqlalchemy and fastapi are
imported lazily inside the functions that need them.
"""

__version__ = "0.1.0"
