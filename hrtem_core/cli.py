"""argparse value types shared by the command lines: the error names the value and what is allowed."""

from __future__ import annotations

import argparse
import math
import sys
from typing import Callable

from .errors import InputError


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's error line: a bad option prints the usage, then ``error: <command>: <message>``,
    and exits 2 (argparse's own form, ``<prog>: error: ...``, is the only other shape an error could take)."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(2, f"error: {self.prog.removeprefix('python -m ')}: {message}\n")


def nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def positive_int(text: str) -> int:
    value = nonneg_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def port(text: str) -> int:
    value = nonneg_int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port 1-65535, got {value}")
    return value


def check_port_free(host: str, number: int, option: str = "--port") -> None:
    """InputError unless a server could listen on ``host:number`` now (checked by binding it, then letting go)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, number, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise InputError(f"--host {host}: not an address of this machine ({exc.strerror})") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind(address)
        except OSError as exc:
            why = "is in use" if exc.errno == 98 else f"cannot be used ({exc.strerror})"
            raise InputError(f"{option} {number}: {host}:{number} {why}: stop what listens there, or give another "
                             f"{option}") from None


def nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def run_command(func: Callable[[argparse.Namespace], int], args: argparse.Namespace,
                interrupted: str = "interrupted") -> int:
    """Run one subcommand the way every command line of the project does: bad input (an :class:`InputError`) prints
    ``error: <message>`` and exits 2, Ctrl-C prints ``interrupted`` and exits 130; anything else is a bug and keeps
    its traceback (exit 1). A library's ValueError or OSError is not taken for bad input: the code that knows which
    value or file the user gave turns it into an InputError naming them, so a bug never passes for a user mistake."""
    try:
        return func(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
