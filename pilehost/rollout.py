"""A staged rollout of a published release (docs/ota.md, "Rollout"): cohorts of the fleet (for
example 1 %, 10 %, 100 %) get the signed `update` command one after the other, each gated on
its health; the rollout halts by itself when a cohort gets worse.

A cohort passes when every pile in it reports the release as running and good (its retained
`ota` message), within the time allowed, and its health is no worse than before the update:

- unasked resets: boots beyond the one the switch makes (the `online`/`status` boot number);
- faults: a fault in `status` that the pile did not have before;
- reconnects: connections beyond one per boot;
- a rollback (`ota.rolled_back` names the release) or a refused update (`cmd/ack`).

Then it soaks (`soak_s`) and is checked again before the next cohort starts.
"""
import argparse
import json
import math
import sys
import threading
import time
import urllib.parse

import paho.mqtt.client as mqtt

from . import pilecmd

TOPIC_ROOT = "evse/v1/"


class FleetWatch:
    """What the cloud sees of the fleet: per pile the last status, ota message, acks, and the
    boots and connections seen since the watch began."""

    def __init__(self, url):
        u = urllib.parse.urlparse(url)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        if u.username:
            self.client.username_pw_set(urllib.parse.unquote(u.username),
                                        urllib.parse.unquote(u.password or ""))
        self.lock = threading.Lock()
        self.piles = {}
        self.log = []  # (time, pile, text): what happened, for the report
        self._subscribed = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(u.hostname, u.port or 1883)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError("could not subscribe to %s" % u.hostname)

    def _on_connect(self, client, _userdata, _flags, _rc, _props=None):
        client.subscribe([(TOPIC_ROOT + "+/" + t, 1) for t in ("status", "online", "ota", "cmd/ack")])

    def pile(self, pile_id):
        p = self.piles.get(pile_id)
        if p is None:
            p = self.piles[pile_id] = {"status": None, "ota": None, "acks": [], "boots": set(),
                                       "connects": 0, "faults": set()}
        return p

    def _on_message(self, _client, _userdata, msg):
        parts = msg.topic.split("/", 3)
        if len(parts) < 4:
            return
        try:
            obj = json.loads(msg.payload)
        except ValueError:
            return
        pile_id, kind = parts[2], parts[3]
        with self.lock:
            p = self.pile(pile_id)
            if kind == "status":
                p["status"] = obj
                p["boots"].add(obj["boot"])
                p["faults"].update(obj["faults"])
            elif kind == "online":
                p["boots"].add(obj["boot"])
                if obj["online"] and not msg.retain:
                    p["connects"] += 1
            elif kind == "ota":
                old = p["ota"]
                p["ota"] = obj
                if old is None or (old["state"], old["release"], old["rolled_back"]) != (
                        obj["state"], obj["release"], obj["rolled_back"]):
                    self._note(pile_id, "ota: release %d (%s) %s%s%s" % (
                        obj["release"], obj["version"], obj["state"],
                        "" if obj["target"] is None else " target %d" % obj["target"],
                        "" if obj["rolled_back"] is None else ", rolled back %d: %s" % (
                            obj["rolled_back"]["release"], obj["rolled_back"]["reason"])))
            elif kind == "cmd/ack":
                p["acks"].append(obj)
                if obj["cmd"] == "update":
                    self._note(pile_id, "ack %s: %s %s" % (obj["cmd_id"], obj["result"], obj["reason"] or ""))

    def _note(self, pile_id, text):
        self.log.append((time.time(), pile_id, text))

    def snapshot(self, pile_id):
        with self.lock:
            p = self.pile(pile_id)
            return {"boots": set(p["boots"]), "connects": p["connects"], "faults": set(p["faults"]),
                    "ota": p["ota"], "acks": list(p["acks"])}

    def send(self, pile_id, payload):
        self.client.publish(TOPIC_ROOT + pile_id + "/cmd", payload, qos=1).wait_for_publish(10)

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


def cohorts_of(piles, percents):
    """[[pile ids]]: cumulative shares of the fleet; each cohort at least one pile."""
    out = []
    done = 0
    for pct in percents:
        upto = max(done + 1, math.ceil(len(piles) * pct / 100))
        upto = min(upto, len(piles))
        if upto > done:
            out.append(piles[done:upto])
            done = upto
    return out


class Rollout:
    """secrets: pile id -> command key (bytes). percents: the cohorts' cumulative shares."""

    def __init__(self, watch, secrets, release, percents=(1, 10, 100), wait_s=300, soak_s=30,
                 poll_s=0.5, say=print):
        self.watch = watch
        self.secrets = secrets
        self.release = release
        self.percents = percents
        self.wait_s = wait_s
        self.soak_s = soak_s
        self.poll_s = poll_s
        self.say = say
        self.outcome = {}  # pile id -> "good" | why not
        self.halted = None
        self._jumped = set()  # piles sent the update again above their floor

    def run(self):
        piles = sorted(self.secrets)
        for i, cohort in enumerate(cohorts_of(piles, self.percents)):
            self.say("cohort %d: %s" % (i + 1, ", ".join(cohort)))
            before = {p: self.watch.snapshot(p) for p in cohort}
            for p in cohort:
                self._update(p)
            self._wait(cohort, before)
            bad = {p: why for p, why in self.outcome.items() if p in cohort and why != "good"}
            if not bad and self.soak_s:
                time.sleep(self.soak_s)
                for p in cohort:
                    why = self._health(p, before[p])
                    if why:
                        self.outcome[p] = why
                        bad[p] = why
            if bad:
                self.halted = "cohort %d worse: %s" % (i + 1, "; ".join(
                    "%s %s" % (p, why) for p, why in sorted(bad.items())))
                self.say("HALTED: " + self.halted)
                return False
            self.say("cohort %d good" % (i + 1))
        return True

    def _update(self, pile_id, floor=None):
        """The signed `update`; its counter the time in ms, above a `replayed` answer's floor
        (a pile reserves counters ahead and refuses them after a reboot: docs/commands.md)."""
        counter = time.time_ns() // 1_000_000
        if floor is not None:
            counter = max(counter, floor + 1)
        body = pilecmd.make_body("update", {"release": self.release}, counter,
                                 "upd-%d-%d" % (self.release, counter))
        self.watch.send(pile_id, pilecmd.sign(self.secrets[pile_id], body))

    def _verdict(self, pile_id, before):
        s = self.watch.snapshot(pile_id)
        for ack in s["acks"][len(before["acks"]):]:
            if ack["cmd"] == "update" and ack["result"] != "accepted":
                floor = pilecmd.floor_of(ack["reason"])
                if floor is not None and pile_id not in self._jumped:
                    self._jumped.add(pile_id)  # once: a second `replayed` is a verdict
                    before["acks"] = list(s["acks"])
                    self._update(pile_id, floor)
                    return None
                return "refused: %s %s" % (ack["result"], ack["reason"])
        ota = s["ota"]
        if ota is not None and (ota["rolled_back"] or {}).get("release") == self.release:
            return "rolled back: %s" % ota["rolled_back"]["reason"]
        if ota is not None and ota["release"] == self.release and ota["state"] == "running":
            return self._health(pile_id, before) or "good"
        return None

    def _health(self, pile_id, before):
        s = self.watch.snapshot(pile_id)
        boots = len(s["boots"] - before["boots"])
        if boots > 1:
            return "unasked resets: %d boots for one switch" % boots
        faults = s["faults"] - before["faults"]
        if faults:
            return "new faults: %s" % ", ".join(sorted(faults))
        connects = s["connects"] - before["connects"]
        if connects > boots + 1:
            return "reconnects: %d connections in %d boot(s)" % (connects, boots)
        return None

    def _wait(self, cohort, before):
        end = time.time() + self.wait_s
        left = set(cohort)
        while left and time.time() < end:
            for p in sorted(left):
                verdict = self._verdict(p, before[p])
                if verdict is not None:
                    self.outcome[p] = verdict
                    self.say("  %s: %s" % (p, verdict))
                    left.discard(p)
            time.sleep(self.poll_s)
        for p in left:
            self.outcome[p] = "no answer within %d s" % self.wait_s
            self.say("  %s: %s" % (p, self.outcome[p]))


def main(argv=None):
    ap = argparse.ArgumentParser(description="Staged rollout of a published release (docs/ota.md).")
    ap.add_argument("--broker", required=True, help="mqtt://user:password@host:port (the cloud's)")
    ap.add_argument("--release", type=int, required=True)
    ap.add_argument("--piles", required=True,
                    help="JSON file: {pile_id: secret file} (the piles' command keys)")
    ap.add_argument("--cohorts", default="1,10,100", help="cumulative percentages")
    ap.add_argument("--wait", type=int, default=900, help="seconds a cohort has to report good")
    ap.add_argument("--soak", type=int, default=300, help="seconds each good cohort is watched")
    opts = ap.parse_args(argv)
    with open(opts.piles, encoding="utf-8") as f:
        secrets = {p: pilecmd.read_secret(path) for p, path in json.load(f).items()}
    watch = FleetWatch(opts.broker)
    try:
        time.sleep(1)  # the retained state of the fleet
        r = Rollout(watch, secrets, opts.release, [float(x) for x in opts.cohorts.split(",")],
                    opts.wait, opts.soak)
        return 0 if r.run() else 1
    finally:
        watch.close()


if __name__ == "__main__":
    sys.exit(main())
