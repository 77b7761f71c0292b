"""``python -m quantselect.engines.convert MODEL MODELS_DIR``: ``models.resolve_model`` in a process of
its own (``models.resolve_model_apart``); prints the converted folder, or the error in one line."""

from __future__ import annotations

import sys
from pathlib import Path

from quantselect.engines.models import resolve_model
from quantselect.errors import InputError


def main(argv: list[str]) -> int:
    model, models_dir = argv
    try:
        print(resolve_model(model, Path(models_dir)))
    except InputError as e:
        print(e, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
