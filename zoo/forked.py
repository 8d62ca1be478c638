"""Work on a memory-mapped file in a forked child, so that the file shrinking under it is an error, not a crash.

Readers map their source instead of copying it (memory bounded by the file). If another process truncates
the file meanwhile, touching a page past its new end raises SIGBUS, which Python cannot turn into an
exception: the process dies. The child dies instead; zoo, its parent, says so in one line and removes the
child's half-written temporary files. A crash of the child (SIGSEGV, SIGABRT: a bug of zoo or of a library)
is reported as a bug, with the Python stack that faulthandler wrote at the crash. The child's stdout and
stderr (progress bars, warnings) go through the parent's own streams as they come.
"""

from __future__ import annotations

import faulthandler
import gc
import json
import os
import signal
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

from zoo.errors import ZooError
from zoo.weights import remove_stale_temps


def run_forked(work: Callable[[], dict], source, output_folder) -> dict:
    """work() in a forked child; returns its JSON-able result. A ZooError or OSError raised there is raised
    here; the child killed by a signal (SIGBUS: `source` shrank) is a ZooError naming `source`, and its crash
    (SIGSEGV, SIGABRT, ...) a bug: a RuntimeError noting the child's Python stack at the crash."""
    if not hasattr(os, "fork"):  # Windows: no fork; the crash stays possible there
        return work()
    read_end, write_end = os.pipe()
    with tempfile.TemporaryFile() as crash_stack:  # the child's faulthandler writes there
        # The parent's objects are frozen out of the child's garbage collections: finalizers of TensorFlow's or
        # PyTorch's objects call into runtimes whose threads did not survive the fork (a test worker's child died
        # of SIGSEGV once on a valid file). The child ends by os._exit, which runs no finalizer either.
        gc.freeze()
        try:
            pid = os.fork()
            if pid == 0:  # the child: never returns into the caller's code
                os.close(read_end)
                os._exit(_child(work, os.fdopen(write_end, "w", encoding="utf-8"), crash_stack))
        finally:  # the parent's, also when no child could be made
            gc.unfreeze()
        os.close(write_end)
        try:
            outcome = _relay(os.fdopen(read_end, encoding="utf-8"))
        finally:
            _, status = os.waitpid(pid, 0)  # also after Ctrl-C, which the child received too
            remove_stale_temps(Path(output_folder))
        if os.WIFSIGNALED(status):
            raise _killed(os.WTERMSIG(status), source, crash_stack)
    return _outcome(outcome)


def _killed(sig: int, source, crash_stack) -> Exception:
    name = signal.Signals(sig).name
    if sig == signal.SIGBUS:
        return ZooError("the file shrank while it was read (another program truncated or rewrote it); nothing was written", source)
    if sig in (signal.SIGSEGV, signal.SIGABRT, signal.SIGILL, signal.SIGFPE):  # faulthandler's: a crash, a bug
        crash_stack.seek(0)
        bug = RuntimeError(f"{source}: the reading process crashed ({name}); nothing was written")
        bug.add_note("in the forked reader:\n" + crash_stack.read()[-8192:].decode("utf-8", "replace"))
        return bug
    return ZooError(f"reading was stopped by {name}; nothing was written", source)


def _child(work, channel, crash_stack) -> int:
    def send(**message):
        channel.write(json.dumps(message) + "\n")
        channel.flush()

    faulthandler.enable(file=crash_stack)  # not to stderr: a SIGBUS is the parent's to report, in one line
    sys.stdout, sys.stderr = _Relayed("out", send, sys.stdout), _Relayed("err", send, sys.stderr)
    try:
        send(result=work())
    except ZooError as e:
        send(zoo_error=str(e), path=e.path)
    except OSError as e:
        send(os_error=[e.errno, e.strerror, e.filename])
    except KeyboardInterrupt:
        send(interrupted=True)
    except BaseException as e:  # noqa: BLE001 - a bug: the parent reports it with this traceback
        send(bug=f"{type(e).__name__}: {e}", traceback="".join(traceback.format_exception(e)))
    return 0


class _Relayed:
    """The child's sys.stdout / sys.stderr: each write goes to the parent, who writes it to its own."""

    def __init__(self, stream: str, send, original):
        self.stream, self.send, self.original = stream, send, original

    def write(self, text: str) -> int:
        self.send(stream=self.stream, text=text)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:  # progress bars draw themselves as the parent's stream allows
        return self.original.isatty()

    def __getattr__(self, name):
        return getattr(self.original, name)


def _relay(channel) -> dict | None:
    """Copy the child's output to ours until it ends; returns its last message (None: it died before one)."""
    outcome = None
    for line in channel:
        message = json.loads(line)
        if "stream" in message:
            stream = sys.stdout if message["stream"] == "out" else sys.stderr
            stream.write(message["text"])
            stream.flush()
        else:
            outcome = message
    return outcome


def _outcome(message: dict | None) -> dict:
    if message is None:
        raise ZooError("the reading process ended without a result; nothing was written")
    if "result" in message:
        return message["result"]
    if "zoo_error" in message:
        error = ZooError(message["zoo_error"])
        error.path = message["path"]
        raise error
    if "os_error" in message:
        raise OSError(*message["os_error"])
    if "interrupted" in message:
        raise KeyboardInterrupt
    bug = RuntimeError(message["bug"])
    bug.add_note(f"in the forked reader:\n{message['traceback']}")
    raise bug
