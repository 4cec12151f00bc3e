"""What the command-line entry points share: argument types that reject impossible values, and one way to end on
bad input.

pbrl's checks raise ValueError, FileNotFoundError, FileExistsError or KeyError with a message that names the file,
key or line. An entry point run through `run_main` prints that message as one line on stderr and exits with status
2 (argparse's status for bad usage) instead of a traceback; PBRL_TRACEBACK=1 shows the traceback as well.
"""
from __future__ import annotations

import argparse
import os
import sys


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def run_main(main, argv=None) -> None:
    try:
        main(argv)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
        if os.environ.get("PBRL_TRACEBACK") == "1":
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
