"""`make sim SCENARIO=heal` (docs/network.md, "A link that heals itself"): one virtual pile (the
firmware on the MicroPython unix port, simulated Wi-Fi) charges a car on a local mosquitto with the
shipped per-pile configuration, behind a relay (pilehost/heal_rig.py) that breaks the link three
ways while the session runs; each time the pile heals by itself, and its retained `health`
message (what the cloud sees) says which step of the ladder it took.

1. broker cut: the broker accepts TCP but never answers CONNACK, a few seconds: reconnects;
2. a Wi-Fi that associates but routes nothing, until the pile has restarted its Wi-Fi twice (the
   reset the ladder would take next is held back: a session is open);
3. a second client with the pile's id and password (a cloned config): reported as
   client_id_conflict, the pile stands back instead of kicking it off.

The contactor stays closed through all three: the session ends only when the car stops."""
import sys
import tempfile
import threading
import time

import paho.mqtt.client as mqtt

from . import cloud, unix_port
from .heal_rig import BreakableRelay
from .link_rig import HEAP, SECRET

SCENARIO = "heal"
# The shortest the config allows (firmware/config.py): the Wi-Fi step after 10 s without a broker,
# the reset due after 15 s (held back while the session runs), a health message every 10 s.
LADDER = {"keepalive_s": 10, "wifi_restart_after_s": 10, "reset_after_s": 15, "reset_min_interval_s": 10,
          "health_interval_s": 10, "conflict_pause_s": 10}
CUT_S = 6  # the broker cut: shorter than wifi_restart_after_s, so reconnects alone heal it
STEP_TIMEOUT_S = 60
_SHOWN = ("mqtt:", "wifi", "coil", "charger", "boot", "Traceback", "Error")


class HealthWatch:
    """The cloud's view: the pile's health messages as they come (the cloud user, its listener)."""

    def __init__(self, url, pile_id, say):
        import json
        import urllib.parse

        u = urllib.parse.urlparse(url)
        self.seen = []
        self._say = say
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        self.client.username_pw_set(urllib.parse.unquote(u.username), urllib.parse.unquote(u.password))
        self.client.on_message = lambda _c, _u, m: self._got(json.loads(m.payload))
        self.client.connect(u.hostname, u.port)
        self.client.subscribe("evse/v1/%s/health" % pile_id, 1)
        self.client.loop_start()

    def _got(self, h):
        self.seen.append(h)
        self._say(describe(h))

    def first(self, cond):
        return next((h for h in list(self.seen) if cond(h)), None)

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


def describe(h):
    """One health message as a line."""
    link = h["link"]
    return ("health  boot %d, up %d s: connects %d, reconnects %d, Wi-Fi restarts %d, resets %d;"
            " last step %s%s; client id conflict %s; heap %d B free; outbox %d; loop %d/%d ms avg/max" % (
                h["boot"], h["uptime_s"], link["connects"], link["reconnects"], link["wifi_restarts"],
                link["resets"], link["last_step"] or "none",
                " (%s)" % link["last_reason"] if link["last_reason"] else "",
                "yes" if link["client_id_conflict"] else "no", h["heap_free"], h["outbox_records"],
                h["loop_ms"]["avg"], h["loop_ms"]["max"]))


class Story:
    """Waits on the firmware's lines and the cloud's health messages; what went wrong, if anything."""

    def __init__(self, lines, healths, thread, say):
        self.lines = lines
        self.healths = healths
        self.thread = thread
        self.say = say
        self.missed = []

    def count(self, text):
        return sum(1 for line in list(self.lines) if text in line)

    def wait(self, cond, what, timeout=STEP_TIMEOUT_S):
        end = time.time() + timeout
        while time.time() < end and self.thread.is_alive():
            if cond():
                return True
            time.sleep(0.2)
        self.missed.append(what)
        self.say("!!!! not seen within %d s: %s" % (timeout, what))
        return False


def run(say=print):
    """The scenario; (0 or 1, the SimRun, [health messages], [what was not seen])."""
    say("scenario heal: %s" % unix_port.scenarios.get(SCENARIO)["doc"])
    pile_id = unix_port.scenarios.BASE_CONFIG["pile_id"]

    def echo(line):
        if any(s in line for s in _SHOWN):
            say("pile    " + line)

    with tempfile.TemporaryDirectory(prefix="pile-heal-") as tmp:
        local = cloud.LocalBroker(tmp, "mosquitto", piles=(pile_id,))
        relay = BreakableRelay(local.port)
        relay.up()
        healths = HealthWatch(local.broker.cloud_url, pile_id, say)
        mqtt_conf = local.mqtt_config(pile_id)
        mqtt_conf.update(port=relay.port, secret=SECRET.hex(), **LADDER)
        lines = []
        box = {}

        def on_line(line):
            lines.append(line)
            echo(line)

        thread = threading.Thread(target=lambda: box.setdefault("run", unix_port.run_scenario(
            SCENARIO, config={"mqtt": mqtt_conf}, heapsize=HEAP, on_line=on_line, timeout=300)))
        thread.start()
        story = Story(lines, healths, thread, say)
        clone = None
        try:
            story.wait(lambda: story.count("mqtt: connected") and story.count("coil ON"),
                       "charging, connected")
            story.wait(lambda: healths.first(lambda h: h["link"]["connects"] == 1),
                       "the first health message")

            say("---- 1. broker cut: it takes TCP but answers no CONNACK, for %d s" % CUT_S)
            relay.break_link("connack")
            time.sleep(CUT_S)
            relay.heal()
            say("---- 1. the broker answers again")
            story.wait(lambda: healths.first(lambda h: h["link"]["connects"] == 2), "the link back (health)")

            say("---- 2. the Wi-Fi associates but routes nothing, until the pile has restarted it twice")
            relay.break_link("no_route")
            story.wait(lambda: story.count("mqtt: restarting the Wi-Fi") >= 2, "two Wi-Fi restarts", 90)
            relay.heal()
            say("---- 2. the network routes again")
            story.wait(lambda: healths.first(lambda h: h["link"]["connects"] == 3), "the link back (health)")

            say("---- 3. a second client connects with the pile's id and password (a cloned config)")
            clone = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=pile_id, protocol=mqtt.MQTTv311)
            clone.username_pw_set(mqtt_conf["username"], mqtt_conf["password"])
            clone.reconnect_delay_set(1, 1)
            clone.connect("127.0.0.1", local.port)
            clone.loop_start()
            story.wait(lambda: story.count("client_id_conflict"), "the conflict reported")
            time.sleep(5)
            clone.loop_stop()
            clone.disconnect()
            clone = None
            say("---- 3. the other client is gone")
            story.wait(lambda: healths.first(lambda h: h["link"]["client_id_conflict"]),
                       "a health with the conflict")
            story.wait(lambda: healths.first(lambda h: not h["link"]["client_id_conflict"]
                                             and h["link"]["connects"] >= 4), "the conflict over (health)")
            say("---- the car stops at 90 s: the session ends")
        finally:
            if clone is not None:
                clone.loop_stop()
                clone.disconnect()
            thread.join(300)
            relay.close()
            healths.close()
            local.show()
            kept = local.storage.query("SELECT boot, uptime_s, connects, reconnects, wifi_restarts, resets,"
                                       " last_step, client_id_conflict FROM pile_health")
            say("%-15s %s" % ("pile_health:", "; ".join(", ".join(str(v) for v in r) for r in kept)
                              or "none"))
            local.stop()
    r = box.get("run")
    if r is None or r.result is None:
        say("simulation ended without a result (%s)" % ("no run" if r is None else "exit %s" % r.returncode))
        return 1, r, healths.seen, story.missed
    closes = sum(1 for line in r.lines if "coil ON" in line)
    resets = sum(1 for line in r.lines if "resetting the board" in line)
    say("---- %d boot(s), contactor closed %d time(s) (charging through all three), %d board reset(s), "
        "%.1f Wh delivered; %d health messages" % (r.result["boots"], closes, resets, r.result["energy_wh"],
                                                   len(healths.seen)))
    if story.missed:
        say("---- not seen: %s" % "; ".join(story.missed))
    return (0 if not story.missed else 1), r, healths.seen, story.missed


def main():
    code, _run, _healths, _missed = run(lambda text: print(text, flush=True))
    return code


if __name__ == "__main__":
    sys.exit(main())
