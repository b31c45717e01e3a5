"""`make sim SCENARIO=ota` (docs/ota.md): a few virtual piles (the firmware on the MicroPython
unix port, each on a flash folder of its own) on a local mosquitto with the shipped per-pile
configuration; a good release and a bad one (it crashes at boot) built, signed and published;
both rolled out in cohorts (pilehost.rollout); then what the cloud saw.

Also the fleet of host_tests/test_ota_fleet.py (Fleet)."""
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from . import ROOT, cloud, release, rollout, unix_port
from .procs import end_process

SCENARIO = "ota"
# The MQTT link's heap on the unix port, plus the updater's bytecode and its buffers.
HEAP = "%dk" % (int(unix_port.MQTT_HEAP.rstrip("k")) + 32)
TRIAL_S = 30  # config.py's least: the bad release is not given long


def crashing_source(directory):
    """firmware/ with build() raising at once: a release that crashes at every boot, after
    boot.py, inside main.run()'s guard (fail-safe, then the reset)."""
    src = os.path.join(directory, "firmware")
    shutil.copytree(os.path.join(ROOT, "firmware"), src)
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if "\ndef build(board, conf):\n" in text:
            text = text.replace("\ndef build(board, conf):\n", "\ndef build(board, conf):\n"
                                "    raise RuntimeError(\"this release crashes at boot\")\n", 1)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            return src
    raise RuntimeError("no build(board, conf) in firmware/ to break")


class Pile:
    """One virtual pile: `micropython -m rom` on its flash folder; its output lines kept."""

    def __init__(self, pile_id, flash, config, echo=None):
        self.config = config
        self.pile_id = pile_id
        self.flash = flash
        self.lines = []
        os.makedirs(flash, exist_ok=True)
        unix_port.prepare_flash(flash, config=config, steps=unix_port.scenarios.get(SCENARIO)["steps"])
        env = dict(os.environ, MICROPYPATH=unix_port.micropypath())
        self.proc = subprocess.Popen(
            [unix_port.micropython_binary(), "-X", "heapsize=" + unix_port.heap_option(HEAP), "-m", "rom"],
            cwd=flash, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._echo = echo
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            if self._echo is not None:
                self._echo(self.pile_id, line)

    def stop(self):
        end_process(self.proc)
        self.reader.join(5)

    def power_cut(self):
        """kill -9, then the same flash powered up again: a new Pile."""
        self.proc.kill()
        self.proc.wait()
        self.reader.join(5)
        return Pile(self.pile_id, self.flash, self.config, self._echo)


class Fleet:
    """n piles on a LocalBroker (mosquitto, a user per pile), provisioned with the release key's
    public half; key: the release key (a new one by default)."""

    def __init__(self, directory, n=3, key=None, echo=None, trial_s=TRIAL_S):
        self.directory = directory
        self.key = key or release.generate_key()
        self.ids = ["ota-pile-%d" % (i + 1) for i in range(n)]
        self.secrets = {p: os.urandom(32) for p in self.ids}
        self.cloud = cloud.LocalBroker(os.path.join(directory, "broker"), "mosquitto", piles=self.ids)
        self.watch = rollout.FleetWatch(self.cloud.broker.cloud_url)
        self.piles = []
        for p in self.ids:
            mqtt = self.cloud.mqtt_config(p)
            mqtt.update(secret=self.secrets[p].hex(), keepalive_s=10, status_interval_s=10)
            config = {"pile_id": p, "mqtt": mqtt,
                      "ota": {"key": release.public_hex(self.key), "trial_s": trial_s}}
            self.piles.append(Pile(p, os.path.join(directory, p), config, echo))

    def wait_online(self, timeout=120):
        end = time.time() + timeout
        while time.time() < end:
            if all(self.watch.snapshot(p)["ota"] is not None for p in self.ids):
                return True
            time.sleep(0.5)
        return False

    def publish(self, n, version, source=None):
        """Builds release n for the unix port (host bytecode), signs and publishes it."""
        files = release.build_files(version, source=source, arch=None)
        manifest = release.sign_manifest(self.key, n, version, ["ref-esp32"], files)
        b = self.cloud.broker
        count = release.publish("127.0.0.1", b.cloud_port, n, manifest, files, *_cloud_auth(b.cloud_url))
        return len(files), sum(len(d) for _p, d in files), count

    def rollout(self, n, percents, wait_s=240, soak_s=5, say=print, seed=None):
        r = rollout.Rollout(self.watch, self.secrets, n, percents, wait_s, soak_s, say=say, seed=seed)
        r.run()
        return r

    def stop(self):
        for p in self.piles:
            p.stop()
        self.watch.close()
        self.cloud.stop()


def _cloud_auth(url):
    import urllib.parse

    u = urllib.parse.urlparse(url)
    return urllib.parse.unquote(u.username), urllib.parse.unquote(u.password)


_SHOWN = ("ota:", "boot:", "internal error", "firmware ")


def main(piles=3):
    """The demo: prints the piles' OTA lines as they come, the rollouts, what the cloud saw."""
    print("scenario ota: %s" % unix_port.scenarios.get(SCENARIO)["doc"])

    def echo(pile_id, line):
        if any(s in line for s in _SHOWN):
            print("%-11s %s" % (pile_id, line), flush=True)

    with tempfile.TemporaryDirectory(prefix="pile-ota-") as tmp:
        fleet = Fleet(tmp, piles, echo=echo)
        try:
            if not fleet.wait_online():
                print("the piles did not come online")
                return 1
            print("---- release 1 (0.2.0): %d files, %d bytes, %d retained chunks"
                  % fleet.publish(1, "0.2.0"))
            good = fleet.rollout(1, (1, 10, 100))
            bad_src = crashing_source(tmp)
            print("---- release 2 (0.3.0, crashes at boot): %d files, %d bytes, %d retained chunks"
                  % fleet.publish(2, "0.3.0", source=bad_src))
            bad = fleet.rollout(2, (60, 100))
            time.sleep(2)
            print("---- what the cloud saw (evse/v1/+/ota and the update acks):")
            t0 = fleet.watch.log[0][0] if fleet.watch.log else 0
            for t, pile_id, text in fleet.watch.log:
                print("%7.1f s  %-11s %s" % (t - t0, pile_id, text))
            for n, r in ((1, good), (2, bad)):
                print("---- rollout of release %d: %s" % (
                    n, "complete" if r.halted is None else "halted, " + r.halted))
            for p in fleet.ids:
                ota = fleet.watch.snapshot(p)["ota"]
                rolled = ota["rolled_back"]
                print("%-11s runs release %d (%s)%s" % (
                    p, ota["release"], ota["version"], "" if rolled is None
                    else ", rolled back release %d: %s" % (rolled["release"], rolled["reason"])))
            fleet.cloud.show()
        finally:
            fleet.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
