"""Where the CLI's output goes: results on stdout, messages on stderr, library chatter into a log file.

Under ``--json`` stdout must be exactly one JSON document, yet the libraries relaydiff drives print to it
(``[torch.onnx] ...``), warn through :mod:`warnings` and write C++ logs straight to file descriptors 1 and 2.
:func:`capture` therefore points both descriptors and ``sys.stdout`` at a log file while a command runs,
keeps a private copy of the real streams for the command's own result (:func:`result`) and messages
(the ``logging`` console handler), and names the log file on stderr when anything landed in it. With
``--verbose`` nothing is hidden: the chatter goes to stderr (never to stdout) and records are shown at DEBUG.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

log = logging.getLogger("relaydiff.cli")

_LIBRARY_ENV = {"TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}


@dataclass
class Streams:
    """The real stdout and stderr, as the CLI found them (before any redirection)."""

    out: IO[str]
    err: IO[str]


_streams: Streams | None = None


def _current() -> Streams:
    return _streams or Streams(sys.stdout, sys.stderr)


def result(text: str) -> None:
    """Write the command's result (a table, or its one JSON document) to the real stdout."""
    out = _current().out
    out.write(text if text.endswith("\n") else text + "\n")
    out.flush()


def emit(as_json: bool, payload: Any, lines: list[str]) -> None:
    """The command's result: ``payload`` as one JSON document under ``--json``, else ``lines``."""
    result(json.dumps(payload, sort_keys=True) if as_json else "\n".join(lines))


def message(text: str) -> None:
    """One line for the user on the real stderr (progress notes, the log file's path)."""
    err = _current().err
    err.write(text + "\n")
    err.flush()


class _ConsoleFilter(logging.Filter):
    """relaydiff's own records always; other libraries' records and Python warnings only when verbose."""

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        return self.verbose or record.name == "relaydiff" or record.name.startswith("relaydiff.")


class _LibraryFilter(logging.Filter):
    """The records the console leaves out: other libraries' and Python warnings (they go to the log file)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "relaydiff" or record.name.startswith("relaydiff."))


class _StreamProxy(io.TextIOBase):
    """A text stream that writes wherever the current :class:`Streams` say (so handlers follow a capture)."""

    def __init__(self, which: str) -> None:
        self.which = which

    def write(self, s: str) -> int:
        stream = getattr(_current(), self.which)
        n = stream.write(s)
        return n

    def flush(self) -> None:
        getattr(_current(), self.which).flush()


class _ProgressSplit(io.TextIOBase):
    """sys.stderr during a plain (not --json) run: tqdm's writes reach the console, any other library's the log.

    Hand-written because tqdm has no process-wide output setting and libraries create their own bars and
    handlers on whatever sys.stderr is when they run; the caller's module tells the two apart.
    """

    def __init__(self, console: IO[str], log_file: IO[str]) -> None:
        self.console, self.log_file = console, log_file

    def write(self, s: str) -> int:
        caller = sys._getframe(1).f_globals.get("__name__", "")
        stream = self.console if caller == "tqdm" or caller.startswith("tqdm.") else self.log_file
        return stream.write(s)

    def flush(self) -> None:
        self.console.flush()
        self.log_file.flush()

    def isatty(self) -> bool:
        return self.console.isatty()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.console, "encoding", None) or "utf-8"


_handler: logging.Handler | None = None


def configure_logging(*, verbose: bool = False, quiet: bool = False) -> None:
    """Configure logging once for the CLI: relaydiff's records at INFO (DEBUG with ``verbose``; WARNING
    with ``quiet``, e.g. under --json) on stderr, third-party records and warnings only with ``verbose``."""
    global _handler
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    _handler = logging.StreamHandler(_StreamProxy("err"))
    _handler.setFormatter(logging.Formatter("%(message)s" if not verbose else "%(levelname)s %(name)s: %(message)s"))
    _handler.addFilter(_ConsoleFilter(verbose))
    _handler.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    root.addHandler(_handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("relaydiff").setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.captureWarnings(True)  # warnings become records of 'py.warnings': in the log file, on screen when verbose
    for name, value in _LIBRARY_ENV.items():
        os.environ.setdefault(name, value)


def default_log_path(command: str) -> Path:
    """``$RELAYDIFF_LOG_DIR`` (default: the temp folder's ``relaydiff-logs``)/relaydiff-COMMAND-TIME-PID.log."""
    root = Path(os.environ.get("RELAYDIFF_LOG_DIR") or Path(tempfile.gettempdir()) / "relaydiff-logs")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return root / f"relaydiff-{command}-{stamp}-{os.getpid()}.log"


def _dup_stream(stream: IO[str]) -> tuple[IO[str], int | None]:
    """A private copy of ``stream`` that survives redirecting its file descriptor (the stream itself when it
    has none, e.g. under pytest's capsys)."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return stream, None
    stream.flush()
    copy = os.dup(fd)
    return os.fdopen(copy, "w", encoding=getattr(stream, "encoding", None) or "utf-8", errors="backslashreplace",
                     buffering=1, closefd=True), fd


@contextlib.contextmanager
def capture(log_path: Path | None, *, verbose: bool, quiet: bool = False) -> Iterator[Path | None]:
    """Run the body with library output captured; yields the log file's path (None when verbose).

    Not verbose: file descriptors 1 and 2 and ``sys.stdout`` point at ``log_path`` (an empty log is removed
    afterwards), and so does ``sys.stderr`` when ``quiet`` (--json; else it stays the console, for progress
    bars). Verbose: descriptor 1 and ``sys.stdout`` point at stderr. Either way :func:`result` and
    :func:`message` reach the real streams.
    """
    global _streams
    saved = _streams
    real_out, out_fd = _dup_stream(sys.stdout)
    real_err, err_fd = _dup_stream(sys.stderr)
    _streams = Streams(real_out, real_err)
    old_out, old_err = sys.stdout, sys.stderr
    saved_fds: list[tuple[int, int]] = []
    sink: IO[str] | None = None
    file_handler: logging.Handler | None = None
    try:
        if verbose:
            target_fd = err_fd
            sys.stdout = real_err
        else:
            assert log_path is not None
            log_path.parent.mkdir(parents=True, exist_ok=True)
            sink = open(log_path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 (closed in finally)
            target_fd = sink.fileno()
            sys.stdout = sink
            if quiet:  # --json: nothing of the libraries on the console
                sys.stderr = sink
            else:  # progress bars stay on the console; everything else written to sys.stderr goes to the log
                sys.stderr = _ProgressSplit(real_err, sink)
            file_handler = logging.StreamHandler(sink)
            file_handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            file_handler.addFilter(_LibraryFilter())
            logging.getLogger().addHandler(file_handler)
        for fd in (out_fd, None if verbose else err_fd):
            if fd is not None and target_fd is not None and fd != target_fd:
                saved_fds.append((fd, os.dup(fd)))
                os.dup2(target_fd, fd)
        yield None if verbose else log_path
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        sys.stdout, sys.stderr = old_out, old_err
        for fd, copy in reversed(saved_fds):
            os.dup2(copy, fd)
            os.close(copy)
        if file_handler is not None:
            logging.getLogger().removeHandler(file_handler)
        if sink is not None:
            sink.close()
        _streams = saved
        for stream, fd in ((real_out, out_fd), (real_err, err_fd)):
            if fd is not None:
                with contextlib.suppress(Exception):
                    stream.close()


def log_note(log_path: Path | None) -> str | None:
    """``"library output: PATH"`` when the log holds anything; an empty log is removed (None)."""
    if log_path is None or not log_path.is_file():
        return None
    if log_path.stat().st_size == 0:
        log_path.unlink()
        return None
    return f"library output: {log_path}"
