"""Child processes and loopback ports for the host tools and tests."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

TIMEOUT = 15.0  # any single wait on a broker, a consumer or a board; loopback is fast


def free_port():
    """A loopback TCP port nothing listens on now (another process may still take it first)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port, host="127.0.0.1"):
    try:
        socket.create_connection((host, port), timeout=0.5).close()
        return True
    except OSError:
        return False


def wait_for(predicate, what, timeout=TIMEOUT, error=TimeoutError):
    """Until predicate() is true; else raise error("timed out ... waiting for <what>")."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise error("timed out after %.0f s waiting for %s" % (timeout, what))
        time.sleep(0.02)


def find_tool(name):
    """An installed program, also in the sbin folders a non-root PATH leaves out."""
    for path in (shutil.which(name), "/usr/sbin/" + name, "/usr/local/sbin/" + name, "/usr/bin/" + name):
        if path and os.access(path, os.X_OK):
            return path
    return None


def stop_on_sigterm():
    """SIGTERM (kill, a CI job's timeout) ends the program as Ctrl-C does, through its `finally`s,
    which stop the firmware and the broker it started: else mosquitto outlives it."""
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))


def end_process(proc, grace_s=5):
    """Ask a child to stop (SIGTERM), then make it (SIGKILL) after grace_s. None: nothing to do."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(grace_s)
