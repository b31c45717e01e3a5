"""`make check`'s type check: firmware/ against the ESP32's MicroPython API, so code that calls
something the board does not have (`time.monotonic_ns()`, `import threading`, a `machine.Pin`
method of another port) fails here rather than on a pile.

Its command line, with the usage: tools/typecheck.py.

mypy with micropython-esp32-stubs (pinned in requirements-dev.txt) as its whole standard
library: the stubs are assembled into a typeshed folder under build/ (once per stub version),
because mypy takes `time`, `socket`, `os`... only from typeshed and never from site-packages.
The library the firmware ships (lib/: umqtt.simple, from tools/fetch_deps.py) is read from
its source instead: what `make flash` copies.

Looser than the board where the stubs are CPython's typeshed trimmed: builtins' methods
(`str.removeprefix`), `typing`, `enum`, `abc`, parts of `sys` and `collections` pass here and
fail on MicroPython; the scenarios on the unix port (make test) run into those.
"""
import hashlib
import importlib.metadata
import os
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.path.join(ROOT, "build")
LIB = os.path.join(ROOT, "lib")
# The ESP32 port's modules, and the trimmed typeshed stdlib (builtins, typing...) they rest on.
STUB_DISTS = ("micropython-stdlib-stubs", "micropython-esp32-stubs")

CONFIG = os.path.join(ROOT, "tools", "typecheck.ini")  # mypy's settings, with their reasons
# Modules the ESP32 has that the stubs lack, as {name: stub text}. None today: no firmware module
# reads the REPL's globals (__main__, where main.py runs) any more.
EXTRA_STUBS: dict[str, str] = {}


def _shipped():
    """Top-level names under lib/ (umqtt): checked from source, not from the stubs."""
    if not os.path.isdir(LIB):
        return set()
    return {n[:-3] if n.endswith(".py") else n for n in os.listdir(LIB) if not n.startswith(".")}


def _stub_files():
    """(dist, version, [(path inside the dist, absolute path)]) for each stub distribution."""
    found = []
    for name in STUB_DISTS:
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            raise SystemExit("typecheck: %s is not installed (make venv)" % name) from None
        files = [(str(f), str(f.locate())) for f in dist.files or ()
                 if str(f).endswith(".pyi") or str(f) == "stdlib/VERSIONS"]
        found.append((name, dist.version, files))
    return found


def _layout(rel):
    """Where a stub file goes in the typeshed folder, or None. The stdlib dist is typeshed-shaped
    already (stdlib/, stubs/mypy-extensions); the port's modules and their helpers (_mpy_shed)
    become stdlib modules."""
    parts = rel.split("/")
    if parts[0].endswith(".dist-info"):
        return None
    if parts[0] in ("stdlib", "stubs"):
        return parts
    return ["stdlib"] + parts


def _top(rel):
    first = rel.split("/")[0]
    return first[:-4] if first.endswith(".pyi") else first


def typeshed():
    """The assembled typeshed folder for the installed stub versions; built once, atomically
    (tests may run this in parallel)."""
    dists = _stub_files()
    shipped = _shipped()
    with open(__file__, "rb") as f:  # a change to how the folder is made makes a new one
        made_by = f.read()
    inputs = ([(n, v) for n, v, _ in dists], sorted(shipped), made_by)
    key = hashlib.sha256(repr(inputs).encode()).hexdigest()[:12]
    final = os.path.join(BUILD, "esp32-typeshed-" + key)
    if os.path.isdir(final):
        return final
    os.makedirs(BUILD, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="esp32-typeshed-", dir=BUILD)
    port_modules = set()
    versions = None
    for _name, _version, files in dists:
        for rel, src in files:
            if rel == "stdlib/VERSIONS":
                versions = src
                continue
            parts = _layout(rel)
            if parts is None or _top(rel) in shipped:
                continue
            if parts[0] == "stdlib" and not rel.startswith("stdlib/"):
                port_modules.add(_top(rel))
            dest = os.path.join(tmp, *parts)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.copyfile(src, dest)
    for name, text in EXTRA_STUBS.items():
        path = os.path.join(tmp, "stdlib", name + ".pyi")
        if not os.path.exists(path):
            with open(path, "w") as f:
                f.write(text)
            port_modules.add(name)
    if versions is None:
        raise SystemExit("typecheck: no stdlib/VERSIONS in %s" % STUB_DISTS[0])
    with open(versions) as f:
        lines = f.read().splitlines()
    # VERSIONS lists CPython's whole stdlib; a listed module without a stub is reported missing,
    # which is right (argparse, threading are not on the board) except for what lib/ provides.
    lines = [ln for ln in lines if ln.split(":")[0].strip().split(".")[0] not in shipped]
    listed = {ln.split(":")[0].strip() for ln in lines if ":" in ln and not ln.startswith("#")}
    lines.append("# the ESP32 port's modules (micropython-esp32-stubs)")
    lines.extend("%s: 3.0-" % m for m in sorted(port_modules - listed))
    with open(os.path.join(tmp, "stdlib", "VERSIONS"), "w") as f:
        f.write("\n".join(lines) + "\n")
    try:
        os.rename(tmp, final)
    except OSError:  # another run finished first: its folder is the same
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def run(paths, cache_dir=None):
    """mypy over `paths`: (exit status, report text)."""
    from mypy import api

    out, err, status = api.run([
        "--config-file", CONFIG,
        "--custom-typeshed-dir", typeshed(),
        "--cache-dir", cache_dir or os.path.join(BUILD, "mypy-cache"),
    ] + list(paths))
    return status, out + err


def main(argv):
    paths = [os.path.abspath(p) for p in argv]
    os.chdir(ROOT)  # firmware/x.py in the report
    status, text = run(paths or ["firmware"])
    sys.stdout.write(text)
    return status
