"""A staged rollout of a published release (docs/ota.md, "Rollout"): cohorts of the fleet (for
example 1 %, 10 %, 100 %) get the signed `update` command one after the other, each gated on
its health; the rollout halts by itself when a cohort gets worse, and stops when withdrawn.

The cohorts are a seeded random sample of the fleet, spread over its sites (plan()): the seed is
printed and kept in the rollout's record (a JSON file), so the same seed and the same pile list
give the same cohorts. A cohort passes when every pile in it reports the release as running and
good (its retained `ota` message) within the time allowed, none refused or rolled it back, and
after the soak its health is no worse than that of a control group (piles not yet updated,
watched over the same window):

- unasked resets: boots beyond the one the switch makes (the `online`/`status` boot number);
- faults: a fault in `status` that the pile did not have at the cohort's start;
- reconnects: connections beyond one per boot, plus one.

For each kind, the share of the cohort's piles that have it may not exceed the control's share
(plus `margin`). The last cohort has no piles left to compare with: its control share is 0.
"""
import argparse
import heapq
import json
import math
import os
import random
import sys
import threading
import time
import urllib.parse
from fractions import Fraction

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


CONTROL_MIN = 10  # a control group has at least this many piles, while that many are left
KINDS = ("resets", "faults", "reconnects")
_KIND_NAMES = {"resets": "unasked resets", "faults": "new faults", "reconnects": "reconnects"}


def new_seed():
    return random.SystemRandom().randrange(1, 2 ** 32)


def plan(piles, seed, strata=None):
    """The order in which the fleet is updated: random for `seed`, spread over the strata.

    strata: pile id -> its site (e.g. "Lyon/depot 3"), or None. Each stratum is shuffled; the
    strata then take turns by Tijdeman's rule for the chairman assignment problem (R. Tijdeman,
    "The chairman assignment problem", Discrete Math. 32, 1980): with m strata and p_i a
    stratum's share of the fleet, the L-th place goes, among the strata that would not get more
    than their share of L plus sigma = 1 - 1/(2m - 2), to the one whose share falls furthest
    behind first (earliest deadline). Every first L piles of the order then hold each stratum's
    share of L within sigma < 1 pile, so a 1 % cohort already touches the sites in proportion,
    not one city. Ties go to a per-stratum draw from the seed."""
    rng = random.Random(seed)
    groups = {}
    for p in sorted(piles):
        groups.setdefault((strata or {}).get(p), []).append(p)
    names = sorted(groups, key=lambda g: (g is not None, str(g)))
    for name in names:
        rng.shuffle(groups[name])
    if len(names) < 2:
        return [p for name in names for p in groups[name]]
    return [groups[names[i]][k] for i, k in _turns([len(groups[n]) for n in names], rng)]


def _turns(sizes, rng):
    """(stratum, its k-th pile) for each place of the order: plan()'s rule, in integers.

    With N piles and m strata, stratum i (n_i piles, c_i placed) is eligible at place L once
    L * n_i / N - c_i >= 1 - sigma = 1/(2m - 2), and its deadline is (c_i + sigma) * N / n_i."""
    total, m = sum(sizes), len(sizes)
    den = 2 * m - 2
    tie = [rng.random() for _ in sizes]
    placed = [0] * m
    waiting = [(_eligible_at(0, n, total, den), i) for i, n in enumerate(sizes)]
    heapq.heapify(waiting)
    ready = []
    for place in range(1, total + 1):
        while waiting and waiting[0][0] <= place:
            i = heapq.heappop(waiting)[1]
            heapq.heappush(ready, (Fraction(placed[i] * den + den - 1, sizes[i]), tie[i], i))
        i = heapq.heappop(ready)[2]  # never empty (Tijdeman's theorem; test_rollout_cohorts.py)
        yield i, placed[i]
        placed[i] += 1
        if placed[i] < sizes[i]:
            heapq.heappush(waiting, (_eligible_at(placed[i], sizes[i], total, den), i))


def _eligible_at(placed, size, total, den):
    """The first place L with den * (L * size - placed * total) >= total."""
    return -(-total * (1 + den * placed) // (den * size))


def cohorts_of(piles, percents):
    """[[pile ids]]: cumulative shares of the fleet (in the order given); each cohort at least one
    pile."""
    out = []
    done = 0
    for pct in percents:
        upto = max(done + 1, math.ceil(len(piles) * pct / 100))
        upto = min(upto, len(piles))
        if upto > done:
            out.append(piles[done:upto])
            done = upto
    return out


def control_of(order, updated, size):
    """Up to `size` piles not updated yet, the last ones of the order: a random sample spread over
    the strata like the cohorts (plan()), and the piles that wait longest."""
    left = [p for p in order if p not in updated]
    return left[-size:] if size > 0 else []


def troubles(now, before, switched):
    """{kind: why} of one pile between two snapshots; switched: it was updated (one boot allowed)."""
    out = {}
    boots = len(now["boots"] - before["boots"])
    if boots > (1 if switched else 0):
        out["resets"] = ("unasked resets: %d boots for one switch" % boots if switched
                         else "%d boot(s), not updated" % boots)
    faults = now["faults"] - before["faults"]
    if faults:
        out["faults"] = "new faults: %s" % ", ".join(sorted(faults))
    connects = now["connects"] - before["connects"]
    if connects > boots + 1:
        out["reconnects"] = "reconnects: %d connections in %d boot(s)" % (connects, boots)
    return out


def compare(cohort_troubles, control_troubles, margin=0.0):
    """[(kind, bad in cohort, cohort size, bad in control, control size, worse)] for KINDS."""
    out = []
    n, m = len(cohort_troubles), len(control_troubles)
    for kind in KINDS:
        bad = sum(1 for t in cohort_troubles.values() if kind in t)
        bad_c = sum(1 for t in control_troubles.values() if kind in t)
        share_c = bad_c / m if m else 0.0
        out.append((kind, bad, n, bad_c, m, n > 0 and bad / n > share_c + margin))
    return out


class Record:
    """The rollout's record: a JSON file (seed, cohorts, controls, verdicts, state), rewritten
    atomically after every step. `withdraw` writes <record>.withdrawn beside it; a rollout that
    finds it sends no further command."""

    def __init__(self, path):
        self.path = path
        self.data = {}

    @property
    def marker(self):
        return self.path + ".withdrawn"

    def save(self, **fields):
        self.data.update(fields)
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.data, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)

    def withdrawn(self):
        """The reason given to `withdraw`, or None."""
        try:
            with open(self.marker, encoding="utf-8") as f:
                return json.load(f).get("reason") or "withdrawn"
        except FileNotFoundError:
            return None
        except ValueError:
            return "withdrawn"


def load_record(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def mark_withdrawn(path, reason):
    """Writes the marker a running rollout of this record polls (Record.withdrawn)."""
    tmp = path + ".withdrawn.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"reason": reason, "at": time.time()}, f)
    os.replace(tmp, path + ".withdrawn")


class Rollout:
    """secrets: pile id -> command key (bytes). percents: the cohorts' cumulative shares.
    seed: the cohorts' (None: a new one, printed). strata: pile id -> site, to spread over.
    record: the record's path (None: kept in memory only). margin: how much larger than the
    control's a cohort's share of piles with a kind of trouble may be (0: not at all)."""

    def __init__(self, watch, secrets, release, percents=(1, 10, 100), wait_s=300, soak_s=30,
                 poll_s=0.5, say=print, seed=None, strata=None, record=None, margin=0.0,
                 control_min=CONTROL_MIN):
        self.watch = watch
        self.secrets = secrets
        self.release = release
        self.percents = percents
        self.wait_s = wait_s
        self.soak_s = soak_s
        self.poll_s = poll_s
        self.say = say
        self.seed = new_seed() if seed is None else seed
        self.strata = strata
        self.margin = margin
        self.control_min = control_min
        self.order = plan(self.secrets, self.seed, strata)
        self.cohorts = cohorts_of(self.order, self.percents)
        self.record = Record(record) if record else None
        self.outcome = {}  # pile id -> "good" | why not
        self.halted = None
        self.withdrawn = None  # the reason, once withdrawn
        self.reports = []  # per cohort: its piles, its control, the comparison
        self.updated = set()  # piles the command went to
        self._stop = threading.Event()
        self._jumped = set()  # piles sent the update again above their floor

    def withdraw(self, reason="withdrawn"):
        """From another thread: no further `update` goes out; run() returns False."""
        self.withdrawn = self.withdrawn or reason
        self._stop.set()

    def _check_withdrawn(self):
        if not self._stop.is_set() and self.record is not None:
            why = self.record.withdrawn()
            if why is not None:
                self.withdraw(why)
        return self._stop.is_set()

    def _save(self, state):
        if self.record is not None:
            self.record.save(release=self.release, seed=self.seed, percents=list(self.percents),
                             strata=self.strata, cohorts=self.cohorts, state=state,
                             halted=self.halted, withdrawn=self.withdrawn, outcome=self.outcome,
                             reports=self.reports, margin=self.margin)

    def run(self):
        self.say("rollout of release %d: seed %d (the same cohorts again: --seed %d), %d piles%s"
                 % (self.release, self.seed, self.seed, len(self.order),
                    "" if not self.strata else " over %d sites" % len(set(self.strata.values()))))
        self._save("running")
        updated = self.updated
        for i, cohort in enumerate(self.cohorts):
            if self._check_withdrawn():
                return self._withdrawn(i)
            control = control_of(self.order, updated | set(cohort), max(len(cohort), self.control_min))
            self.say("cohort %d: %s" % (i + 1, ", ".join(cohort)))
            self.say("  control: %s" % (", ".join(control) if control
                                         else "none left (compared with its own past only)"))
            before = {p: self.watch.snapshot(p) for p in cohort + control}
            for p in cohort:
                if self._check_withdrawn():
                    return self._withdrawn(i)
                self._update(p)
                updated.add(p)
            self._save("running")
            self._wait(cohort, before)
            bad = {p: why for p, why in self.outcome.items() if p in cohort and why != "good"}
            if not bad and self.soak_s and self._sleep(self.soak_s):
                self._judge(i, cohort, control, before)  # what the soak saw so far
                return self._withdrawn(i + 1)
            if not bad:
                bad = self._judge(i, cohort, control, before)
            if bad:
                self.halted = "cohort %d worse: %s" % (i + 1, "; ".join(
                    "%s %s" % (p, why) for p, why in sorted(bad.items())))
                self.say("HALTED: " + self.halted)
                self._save("halted")
                return False
            self.say("cohort %d good" % (i + 1))
            self._save("running")
        self._save("complete")
        return True

    def _withdrawn(self, next_cohort):
        self.say("WITHDRAWN (%s): no further command from cohort %d on; %d pile(s) were asked"
                 % (self.withdrawn, next_cohort + 1, len(self.updated)))
        self._save("withdrawn")
        return False

    def _sleep(self, seconds):
        """True when withdrawn meanwhile."""
        end = time.time() + seconds
        while time.time() < end:
            if self._check_withdrawn():
                return True
            time.sleep(min(self.poll_s, max(0.0, end - time.time())))
        return self._check_withdrawn()

    def _judge(self, i, cohort, control, before):
        """The cohort's health against the control's, over the same window: {pile: why} of the
        cohort's piles with a kind of trouble in which the cohort is worse."""
        now = {p: self.watch.snapshot(p) for p in cohort + control}
        t_cohort = {p: troubles(now[p], before[p], True) for p in cohort}
        t_control = {p: troubles(now[p], before[p], False) for p in control}
        rows = compare(t_cohort, t_control, self.margin)
        self.say("  health vs control: " + ", ".join(
            "%s %d/%d vs %d/%d%s" % (_KIND_NAMES[k], b, n, bc, m, " WORSE" if w else "")
            for k, b, n, bc, m, w in rows))
        self.reports.append({"cohort": i + 1, "piles": cohort, "control": control,
                             "health": [list(r) for r in rows]})
        worse = {k for k, *_rest, w in rows if w}
        bad = {}
        for p in cohort:
            why = [t_cohort[p][k] for k in KINDS if k in worse and k in t_cohort[p]]
            if why:
                bad[p] = self.outcome[p] = "; ".join(why)
        return bad

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
            return "good"
        return None

    def _wait(self, cohort, before):
        """Until each pile of the cohort is good, refused or rolled back, or wait_s is over. A
        withdrawal does not cut this short: the piles asked are followed to their end."""
        end = time.time() + self.wait_s
        left = set(cohort)
        while left and time.time() < end:
            for p in sorted(left):
                verdict = self._verdict(p, before[p])
                if verdict is not None:
                    self.outcome[p] = verdict
                    self.say("  %s: %s" % (p, verdict))
                    left.discard(p)
            self._check_withdrawn()
            time.sleep(self.poll_s)
        for p in left:
            self.outcome[p] = "no answer within %d s" % self.wait_s
            self.say("  %s: %s" % (p, self.outcome[p]))


# -- withdrawing a release ----------------------------------------------------------------------------

def where_piles_are(watch, release, piles=None):
    """[(pile id, what happens to it)] for a withdrawn release, from the retained `ota` messages.
    The firmware has no command that takes a pile back to an earlier release (docs/ota.md,
    "Withdrawing a release"): a pile on it stays until release n + 1."""
    out = []
    for p in sorted(piles if piles is not None else list(watch.piles)):
        o = watch.snapshot(p)["ota"]
        if o is None:
            out.append((p, "nothing heard (no retained ota message)"))
        elif o["release"] == release and o["state"] == "running":
            out.append((p, "runs release %d (good): stays on it; no command takes a pile back, "
                           "ship release %d built from the previous source" % (release, release + 1)))
        elif o["release"] == release and o["state"] == "trial":
            out.append((p, "release %d on trial: ends good (stays) or rolls back by itself" % release))
        elif o["target"] == release and o["state"] == "staged":
            out.append((p, "release %d verified on flash: switches to it when no session is open, "
                           "then its trial" % release))
        elif o["target"] == release and o["state"] == "downloading":
            out.append((p, "downloading release %d: the chunks are gone, the download fails "
                           "(~60 s: 3 x 20 s without a chunk); keeps release %d" % (release, o["release"])))
        else:
            rolled = o["rolled_back"] or {}
            out.append((p, "runs release %d (%s%s)%s" % (
                o["release"], o["state"], ": " + o["reason"] if o["reason"] else "",
                ", rolled back %d" % release if rolled.get("release") == release else "")))
    return out


def read_piles(path):
    """piles.json: {pile_id: secret file} or {pile_id: {"secret": file, "site": ..., "city": ...}}.
    (secrets, strata): strata maps each pile to "city/site" (None when no pile names either)."""
    with open(path, encoding="utf-8") as f:
        listing = json.load(f)
    secrets, strata = {}, {}
    for p, entry in listing.items():
        if isinstance(entry, str):
            entry = {"secret": entry}
        secrets[p] = pilecmd.read_secret(entry["secret"])
        where = [str(entry[k]) for k in ("city", "site") if entry.get(k) is not None]
        strata[p] = "/".join(where) if where else None
    return secrets, (strata if any(strata.values()) else None)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Staged rollout of a published release (docs/ota.md).")
    ap.add_argument("--broker", required=True, help="mqtt://user:password@host:port (the cloud's)")
    ap.add_argument("--release", type=int, required=True)
    ap.add_argument("--piles", required=True,
                    help='JSON file: {pile_id: secret file} or {pile_id: {"secret": file, "site": '
                         '..., "city": ...}} (the piles\' command keys; sites to spread the cohorts over)')
    ap.add_argument("--cohorts", default="1,10,100", help="cumulative percentages")
    ap.add_argument("--wait", type=int, default=900, help="seconds a cohort has to report good")
    ap.add_argument("--soak", type=int, default=300, help="seconds each good cohort is watched")
    ap.add_argument("--seed", type=int, help="the cohorts' random seed (default: a new one, printed)")
    ap.add_argument("--record", help="the rollout's record, JSON (default rollout-<release>.json); "
                                     "`release.py withdraw --record` stops the rollout through it")
    ap.add_argument("--margin", type=float, default=0.0,
                    help="how much larger than the control's a cohort's share of piles with a kind "
                         "of trouble may be (0.05: 5 points)")
    opts = ap.parse_args(argv)
    secrets, strata = read_piles(opts.piles)
    record = opts.record or "rollout-%d.json" % opts.release
    if os.path.exists(record + ".withdrawn"):
        print("release %d was withdrawn (%s): not rolled out" % (opts.release, record + ".withdrawn"))
        return 1
    watch = FleetWatch(opts.broker)
    try:
        time.sleep(1)  # the retained state of the fleet
        r = Rollout(watch, secrets, opts.release, [float(x) for x in opts.cohorts.split(",")],
                    opts.wait, opts.soak, seed=opts.seed, strata=strata, record=record,
                    margin=opts.margin)
        ok = r.run()
        print("record: %s" % record)
        return 0 if ok else 1
    finally:
        watch.close()


if __name__ == "__main__":
    sys.exit(main())
