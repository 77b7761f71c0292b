"""What a job's driver does to its model in a process of its own (``models.fetch_apart``,
``models.resolve_model_apart``), so that a cancel can stop it and its memory is never the driver's:

- ``python -m quantselect.engines.apart fetch PARENT_PID MODEL``: ``models.from_hub``, a Hub download;
- ``python -m quantselect.engines.apart convert PARENT_PID MODEL MODELS_DIR``: ``models.resolve_model``,
  a GGUF file's conversion.

Either ends with the process that started it (``PARENT_PID``).

The last line printed is the folder or file, or (exit 2, exit 1 for an unexpected error) the error
in one line."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from pathlib import Path

from quantselect.engines.models import from_hub, resolve_model
from quantselect.errors import InputError

PR_SET_PDEATHSIG = 1  # prctl(2)


def main(argv: list[str]) -> int:
    verb, parent, model, *rest = argv
    _die_with(int(parent))
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


def _die_with(parent: int) -> None:
    """End with the process that started this one (Linux): a driver SIGKILLed, or one that exits
    right after a cancel, leaves no download or conversion running on."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the driver kills it when it stops
        return
    if os.getppid() != parent:  # it ended before the line above
        os._exit(1)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
