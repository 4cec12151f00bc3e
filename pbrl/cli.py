"""What the command-line entry points share: argument types that reject impossible values, one way
to end on bad input, and progress with rate and ETA on long work.

pbrl's checks raise ValueError, FileNotFoundError, FileExistsError, KeyError or ImportError (an
optional package that is missing) with a message that names the file, key, line or package. An entry
point run through `run_main` prints that message as one line on stderr and exits with status 2
(argparse's status for bad usage) instead of a traceback; PBRL_TRACEBACK=1 shows the traceback as
well.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _number(text: str, kind, what: str, ok) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not math.isfinite(value) or not ok(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, "a positive integer", lambda v: v >= 1)


def natural_int(text: str) -> int:
    """0, 1, 2, ... up to 2^31 - 1 (a seed, a count that may be 0)."""
    return _number(text, int, "an integer from 0 to 2147483647", lambda v: 0 <= v < 2**31)


def nonnegative_float(text: str) -> float:
    return _number(text, float, "a finite number >= 0", lambda v: v >= 0)


def positive_float(text: str) -> float:
    return _number(text, float, "a finite number > 0", lambda v: v > 0)


def languages(text: str) -> list[str]:
    """A comma-separated list of language codes, at least one, each once (de,fr,sw)."""
    codes = [code.strip() for code in text.split(",") if code.strip()]
    if not codes or len(set(codes)) < len(codes):
        raise argparse.ArgumentTypeError(f"expected comma-separated language codes, at least one, "
                                         f"each once; got {text!r}")
    return codes


def fraction(text: str) -> float:
    return _number(text, float, "a number in (0, 1]", lambda v: 0 < v <= 1)


def shared_flags(ap: argparse.ArgumentParser, *names: str, batch_size: int = 16,
                 max_new_tokens: int = 512) -> None:
    """The flags entry points share, those named: device, dtype, batch-size, max-new-tokens,
    enable-thinking."""
    if "device" in names:
        ap.add_argument("--device", default="auto",
                        help="auto (CUDA when available), cpu, cuda or cuda:N")
    if "dtype" in names:
        ap.add_argument("--dtype", choices=list(DTYPES),
                        help="the weights' dtype (default: as stored)")
    if "batch-size" in names:
        ap.add_argument("--batch-size", type=positive_int, default=batch_size)
    if "max-new-tokens" in names:
        ap.add_argument("--max-new-tokens", type=positive_int, default=max_new_tokens)
    if "enable-thinking" in names:
        ap.add_argument("--enable-thinking", action="store_true",
                        help="let chat templates that read enable_thinking (Qwen3) open a "
                             "reasoning block")


def run_main(main, argv=None) -> None:
    try:
        main(argv)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, ImportError, OSError,
            RuntimeError, ArithmeticError) as e:
        from pbrl.distributed import timed_out
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        if isinstance(e, RuntimeError):
            message = timed_out(e)
        elif type(e) is OSError or isinstance(e, PermissionError):  # not FileNotFoundError's kin
            message = f"{e.strerror or e}: {e.filename}" if e.filename else str(e)
        if message is None or os.environ.get("PBRL_TRACEBACK") == "1":
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if os.environ.get("PBRL_TRACEBACK") == "1":
            raise
        print("error: interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)


PLAIN_FORMAT = ("{desc}: {n_fmt}/{total_fmt} ({percentage:.0f}%) "
                "[{elapsed}<{remaining}, {rate_noinv_fmt}]")


class Progress:
    """Progress of `total` units of work on stderr, with rate and ETA: tqdm's bar in a terminal;
    elsewhere (CI logs, redirected output) a plain line at most every `every` seconds and at the
    end, so logs stay readable. Silent when not `enabled` (ranks other than 0). Call update(n) as
    work completes, close() at the end (or use `with`)."""

    def __init__(self, total: int, desc: str, unit: str = " it", enabled: bool = True,
                 every: float = 10.0):
        from tqdm import tqdm
        self.total, self.desc, self.unit = total, desc, unit
        self.enabled, self.every = enabled, every
        self.n, self.start, self.shown = 0, time.monotonic(), float("-inf")
        self.bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True) \
            if enabled and sys.stderr.isatty() else None
        self.format = tqdm.format_meter

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if self.enabled and (now - self.shown >= self.every or self.n >= self.total):
            self.shown = now
            line = self.format(self.n, self.total, now - self.start, prefix=self.desc,
                               unit=self.unit, bar_format=PLAIN_FORMAT)
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
