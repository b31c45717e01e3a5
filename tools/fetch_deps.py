"""`make deps`: the MicroPython library the firmware runs on (umqtt.simple), fetched
by name from PyPI as upip did (the JSON API -> the sdist), only their .py files unpacked into lib/
(git-ignored).

    python tools/fetch_deps.py [--dest lib]

Third-party code is never committed: lib/ is rebuilt from the pinned versions below.
"""
import argparse
import io
import json
import os
import sys
import tarfile
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# name -> version; the packages' own layout (umqtt/simple.py) is kept under lib/. The
# Makefile's DEPS_STAMP names the last one: keep the two in step.
DEPS = {"micropython-umqtt.simple": "1.3.4"}
PYPI = "https://pypi.org/pypi/%s/json"
TIMEOUT_S = 60


def _get(url):
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as r:
        return r.read()


def sdist_url(name, version):
    """The sdist of one release. The release's own JSON page first; the project page as a
    fallback (some mirrors answer only that one)."""
    try:
        files = json.loads(_get("https://pypi.org/pypi/%s/%s/json" % (name, version)))["urls"]
    except urllib.error.HTTPError:
        files = json.loads(_get(PYPI % name))["releases"].get(version, [])
    for f in files:
        if f["packagetype"] == "sdist":
            return f["url"]
    raise SystemExit("fetch_deps: no sdist for %s %s on PyPI" % (name, version))


def unpack_py(data, dest):
    """The .py files of the sdist, without its top folder, setup.py and metadata."""
    written = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")[1:]
            if not member.isfile() or not parts or not parts[-1].endswith(".py"):
                continue
            if parts == ["setup.py"] or any(p in ("", ".", "..") or p.endswith(".egg-info") for p in parts):
                continue
            path = os.path.join(dest, *parts)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as out:
                out.write(tar.extractfile(member).read())
            written.append(os.path.relpath(path, ROOT))
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", default=os.path.join(ROOT, "lib"))
    args = parser.parse_args(argv)
    for name, version in DEPS.items():
        stamp = os.path.join(args.dest, ".%s-%s" % (name, version))
        if os.path.exists(stamp):
            continue
        url = sdist_url(name, version)
        files = unpack_py(_get(url), args.dest)
        if not files:
            raise SystemExit("fetch_deps: %s %s has no .py files" % (name, version))
        open(stamp, "w").close()
        print("fetch_deps: %s %s -> %s" % (name, version, ", ".join(files)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
