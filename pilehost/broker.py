"""One MQTT broker of our own for the tests and tools, and a black hole.

Broker: mosquitto (no persistence; optionally a password file, a TLS listener, or the shipped
per-pile configuration of broker/) or amqtt (pure Python, MQTT 3.1.1 only, anonymous), on free
loopback ports, stopped by stop(); restart() brings it back on the same ports, empty.
"""
import getpass
import importlib.util
import os
import socket
import subprocess
import sys
import threading
import urllib.parse

from . import broker_users
from .procs import TIMEOUT, end_process, find_tool, free_port, listening, wait_for


class BrokerError(RuntimeError):
    """The broker is not installed or did not start."""


def find_mosquitto():
    return find_tool("mosquitto")


def broker_kind(asked, mosquitto):
    """Which broker `make sim` starts: mosquitto when installed (Debian's package needs root to
    install), else amqtt, the pure-Python one requirements-dev.txt puts into the venv."""
    if asked == "auto":
        return "mosquitto" if mosquitto else "amqtt"
    if asked == "mosquitto" and not mosquitto:
        raise SystemExit("--broker mosquitto: not installed (apt-get install mosquitto)")
    return asked


class Broker:
    """kind "mosquitto" or "amqtt". password_file: no anonymous clients. tls=(ca, cert, key): a TLS
    listener on `tls_port` besides the plain one. piles=(pile ids): the shipped configuration
    (docs/cloud-broker.md): a user per pile (`passwords`) and the pile ACL on `port`, a cloud
    listener (`cloud_port`, `cloud_url`) of its own for the consumer."""

    def __init__(self, directory, kind="mosquitto", password_file=None, tls=None, piles=None):
        self.kind = kind
        self.directory = str(directory)
        self.proc = None
        self.tls_port = self.cloud_port = self.cloud_url = None
        self.passwords = {}
        self.secure = piles is not None
        if kind == "mosquitto":
            self.binary = find_mosquitto()
            if self.binary is None:
                raise BrokerError("mosquitto is not installed: `apt-get install mosquitto` (make broker)")
            self.log = os.path.join(self.directory, "mosquitto.log")
        elif kind == "amqtt":
            if importlib.util.find_spec("amqtt") is None:
                raise BrokerError("no MQTT broker: install mosquitto, or amqtt into the venv (make venv)")
            if password_file or tls or piles is not None:
                raise ValueError("amqtt here is anonymous and plain only")
            self.log = os.path.join(self.directory, "amqtt.log")
        else:
            raise ValueError("broker kind %r" % kind)
        cloud_password = None
        if self.secure:
            for pile_id in piles:
                self.passwords[pile_id] = broker_users.add_pile(self.directory, pile_id)
            cloud_password = broker_users.add_cloud_user(self.directory, "evse-cloud")
        for _ in range(5):  # another process may take a free port before the broker binds it
            self.port = free_port()
            if tls:
                self.tls_port = free_port()
            if self.secure:
                self.cloud_port = free_port()
                self.cloud_url = "mqtt://evse-cloud:%s@127.0.0.1:%d" % (cloud_password, self.cloud_port)
            self.cmd = self._configure(password_file, tls)
            self._start()
            if self._ready():
                return
            self.stop()
        with open(self.log, errors="replace") as f:
            raise BrokerError("%s did not start:\n%s" % (self.kind, f.read()[-2000:]))

    def _configure(self, password_file, tls):
        if self.kind == "amqtt":
            conf = os.path.join(self.directory, "amqtt.yaml")
            with open(conf, "w") as f:
                f.write("listeners:\n  default:\n    type: tcp\n    bind: 127.0.0.1:%d\nplugins:\n"
                        "  amqtt.plugins.authentication.AnonymousAuthPlugin:\n    allow_anonymous: true\n"
                        % self.port)
            return [sys.executable, "-m", "amqtt.scripts.broker_script", "-c", conf]
        user = "user %s\n" % getpass.getuser()  # as root mosquitto would switch to `mosquitto`
        if self.secure:
            conf = broker_users.write_conf(self.directory, self.port, self.cloud_port, "127.0.0.1",
                                           "127.0.0.1", extra=user)
            return [self.binary, "-c", conf]
        conf = os.path.join(self.directory, "mosquitto.conf")
        with open(conf, "w") as f:
            f.write("persistence false\n" + user)
            if password_file:
                f.write("allow_anonymous false\npassword_file %s\n" % password_file)
            else:
                f.write("allow_anonymous true\n")
            f.write("listener %d 127.0.0.1\n" % self.port)
            if tls:
                ca, cert, key = tls
                f.write("listener %d 127.0.0.1\ncafile %s\ncertfile %s\nkeyfile %s\n"
                        % (self.tls_port, ca, cert, key))
        return [self.binary, "-c", conf]

    def _start(self):
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT)

    def ports(self):
        return [p for p in (self.port, self.tls_port, self.cloud_port) if p is not None]

    def _ready(self, timeout=10):  # amqtt takes about a second to import
        try:
            wait_for(lambda: self.proc.poll() is not None or all(listening(p) for p in self.ports()),
                     self.kind, timeout)
        except TimeoutError:
            return False
        return self.proc.poll() is None

    def restart(self, how):
        """Stop the broker (signal `how`: SIGKILL a crash, SIGTERM a clean shutdown) and start it
        again on the same ports with the same configuration; no persistence: it comes back empty."""
        self.proc.send_signal(how)
        self.proc.wait(TIMEOUT)
        self._start()
        if not self._ready(TIMEOUT):
            raise BrokerError("%s did not come back on port %d" % (self.kind, self.port))

    def url(self, user=None, password=None):
        auth = "" if user is None else "%s:%s@" % (urllib.parse.quote(user), urllib.parse.quote(password))
        return "mqtt://%s127.0.0.1:%d" % (auth, self.port)

    def pile_url(self, pile_id, password=None):
        """mqtt://<pile_id>:<password>@127.0.0.1:<port>: what the pile's config.json says."""
        return self.url(pile_id, self.passwords[pile_id] if password is None else password)

    def mqtt_config(self, pile_id):
        """The pile's config.json mqtt section for this broker."""
        conf = {"host": "127.0.0.1", "port": self.port}
        if self.secure:
            conf.update(username=pile_id, password=self.passwords[pile_id])
        return conf

    def stop(self):
        end_process(self.proc)


class BlackHole:
    """A broker that accepts TCP connections and never reads nor answers."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.accepted = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                self.accepted.append(self.sock.accept()[0])
            except OSError:
                return

    def close(self):
        for s in self.accepted:
            s.close()
        self.sock.close()
