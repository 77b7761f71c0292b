"""What a job's driver does to its model in a process of its own (``models.fetch_apart``,
``models.resolve_model_apart``), so that a cancel can stop it and its memory is never the driver's:

- ``python -m quantselect.engines.apart fetch MODEL``: ``models.from_hub``, a Hub download;
- ``python -m quantselect.engines.apart convert MODEL MODELS_DIR``: ``models.resolve_model``, a GGUF
  file's conversion.

The last line printed is the folder or file, or (exit 2, exit 1 for an unexpected error) the error
in one line."""

from __future__ import annotations

import sys
from pathlib import Path

from quantselect.engines.models import from_hub, resolve_model
from quantselect.errors import InputError


def main(argv: list[str]) -> int:
    verb, model, *rest = argv
    try:
        print(from_hub(model) if verb == "fetch" else resolve_model(model, Path(rest[0])), flush=True)
    except InputError as e:
        print(e, flush=True)
        return 2
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: the driver says what happened
        return 130
    except Exception as e:  # noqa: BLE001 - one line for the job's error, not a traceback
        print(f"{type(e).__name__}: {' '.join(str(e).split())[:400]}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
