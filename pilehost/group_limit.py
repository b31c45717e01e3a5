"""A reference group-limit controller (issue 13; docs/commands.md, "Limits that expire"): the
piles of a group share a site limit; the cloud steers them with signed `set_current_limit`
commands that carry a time to live, so that a controller that dies leaves every pile on its
fallback (config.json `limit_fallback_a`), which the site is sized for.

The rule it keeps, whatever the piles, the network or the controller do:

    sum over the piles of exposure <= site limit, where a pile's exposure is the most it may
    offer: max(its fallback, the limit it may still hold, the offer it last reported)

- the fallback counts always: any limit may run out (the controller stops; a pile reboots);
- a decrease is sent at once, but counts only once the pile's status shows it (the offer
  changes at most every 5 s, IEC 61851-1, and a command can be lost);
- an increase is sent only if the sum, with it, stays within the site limit.

`plan()` is the pure decision (a hypothesis property test holds it to the rule); `Controller`
runs it over MQTT: it reads each pile's retained `status`, signs with each pile's key
(pilecmd), re-sends every limit well before it runs out. `SteeredPile` is a simulated pile that
obeys docs/commands.md (the firmware's own command_auth checks the signatures) for the demo and
the tests. Its command line: tools/group_limit.py.
"""
import argparse
import json
import math
import threading
import time

from . import firmware_module, pilecmd
from .fake_pile import TOPIC_ROOT, FakePile, Publisher, encode

MIN_OFFER_MA = 6000  # IEC 61851-1: the least current a car can be offered
RUNNING = ("charging", "suspended_ev", "suspended_evse")  # a car there that may want current
STEP_MA = 100  # limits go out in 0.1 A


class Pile:
    """What the controller knows of one pile: its configuration (max_ma: max_current_a, the most
    it offers without a remote limit; fallback_ma: its limit_fallback_a) and, from its last
    status, the limit it holds (None: none, so max_ma), its offer and whether a car wants
    current. `sent_ma` is the last limit sent; `maybe_ma` the highest sent that may be in force
    (a later, lower one can be lost while the higher one arrived): until a status shows the
    last one sent in force (the pile refuses an older command after a newer one)."""

    def __init__(self, pile_id, max_ma, fallback_ma, secret=None):
        self.pile_id = pile_id
        self.max_ma = max_ma
        self.fallback_ma = fallback_ma
        self.secret = secret
        self.seen = False  # a status came: until then, assume the worst (max_ma)
        self.limit_ma = None
        self.offer_ma = max_ma
        self.wants = False
        self.sent_ma = None
        self.maybe_ma = None
        self.sent_at = None

    def update(self, status):
        """From a status message (docs/telemetry.md)."""
        self.seen = True
        limit = status.get("limit_a")
        self.limit_ma = None if limit is None else int(round(limit * 1000))
        self.offer_ma = int(round(status["offer_a"] * 1000))
        self.wants = status["state"] in RUNNING
        if self.sent_ma is not None and self.limit_ma == self.sent_ma:
            self.maybe_ma = self.sent_ma  # the last one is in force: no older one can come

    def held_ma(self):
        """The limit the pile may be on: what it said, or its maximum before it said anything."""
        if not self.seen or self.limit_ma is None:
            return self.max_ma
        return min(self.limit_ma, self.max_ma)

    def exposure_ma(self):
        """The most it may offer: its fallback (any limit may run out), the limit it said it
        holds, its offer, and the highest limit sent that may be in force (an increase may be in
        force before the pile says so, and stay there if a lower one after it is lost)."""
        return max(self.fallback_ma, self.held_ma(), self.offer_ma if self.seen else self.max_ma,
                   self.sent_ma or 0, self.maybe_ma or 0)


def targets(site_ma, piles):
    """pile_id -> the limit it should have: every pile its fallback (what it falls to anyway),
    the rest of the site shared equally among the piles with a car that wants current, up to
    each one's maximum (water-filling), in steps of STEP_MA."""
    out = {p.pile_id: min(p.fallback_ma, p.max_ma) for p in piles}
    spare = site_ma - sum(p.fallback_ma for p in piles)
    wanting = [p for p in piles if p.wants and p.max_ma > out[p.pile_id]]
    while wanting:
        share = spare // len(wanting) // STEP_MA * STEP_MA
        if share <= 0:
            break
        for p in wanting:
            give = min(share, p.max_ma - out[p.pile_id])
            out[p.pile_id] += give
            spare -= give
        wanting = [p for p in wanting if p.max_ma > out[p.pile_id]]
    return out


def plan(site_ma, piles):
    """The commands of one round: [(pile, limit_ma)], noted in each pile's sent_ma. Decreases at
    once; an increase only if the sum of exposures with it stays within site_ma. Never makes
    the sum worse."""
    want = targets(site_ma, piles)
    exposure = {p.pile_id: p.exposure_ma() for p in piles}
    out = []
    for p in piles:
        if want[p.pile_id] < p.held_ma():
            out.append((p, want[p.pile_id]))  # counts once the pile's status shows it
    for p in sorted(piles, key=lambda q: want[q.pile_id] - q.held_ma()):
        goal = want[p.pile_id]
        if goal <= p.held_ma():
            continue
        others = sum(e for pid, e in exposure.items() if pid != p.pile_id)
        if others + max(goal, exposure[p.pile_id]) <= site_ma:
            exposure[p.pile_id] = max(goal, exposure[p.pile_id])
            out.append((p, goal))
    for p, ma in out:
        p.sent_ma = ma
        p.maybe_ma = ma if p.maybe_ma is None else max(p.maybe_ma, ma)
    return out


def check_site(site_ma, piles):
    """A site that cannot carry every pile at its fallback at once cannot be made safe by any
    controller: a dead one leaves them all there."""
    need = sum(p.fallback_ma for p in piles)
    if need > site_ma:
        raise ValueError("site limit %.1f A is below the sum of the piles' fallbacks, %.1f A "
                         "(config.json limit_fallback_a)" % (site_ma / 1000, need / 1000))


class Controller:
    """plan() over MQTT. Every `period_s`: read statuses (retained, kept up to date by the
    subscription), send the round's commands, and re-send every pile's limit once a third of
    ttl_s has passed since it was sent, so that it never runs out while the controller lives."""

    def __init__(self, broker_url, site_a, piles, ttl_s=60, period_s=5.0, log=print):
        self.site_ma = int(round(site_a * 1000))
        self.piles = {p.pile_id: p for p in piles}
        check_site(self.site_ma, piles)
        self.ttl_s = ttl_s
        self.period_s = period_s
        self.log = log
        self.lock = threading.Lock()
        self._counter = 0
        self.sent = []  # (time, pile_id, amps, ttl_s)
        self.publisher = Publisher(broker_url, "group-limit-%d" % id(self))
        self.publisher.client.on_message = self._on_message
        for pid in self.piles:
            self.publisher.client.subscribe("%s/%s/status" % (TOPIC_ROOT, pid), 1)

    def _on_message(self, _client, _userdata, msg):
        pid = msg.topic.split("/")[2]
        try:
            status = json.loads(msg.payload)
        except ValueError:
            return
        with self.lock:
            if pid in self.piles and isinstance(status, dict) and "offer_a" in status:
                self.piles[pid].update(status)

    def _next_counter(self):
        self._counter = max(self._counter + 1, time.time_ns() // 1_000_000)
        return self._counter

    def round(self):
        now = time.monotonic()
        with self.lock:
            commands = plan(self.site_ma, list(self.piles.values()))
            chosen = {p.pile_id for p, _ in commands}
            for p in self.piles.values():  # refresh: never let a limit we stand behind run out
                if p.pile_id not in chosen and p.sent_ma is not None and p.sent_at is not None \
                        and now - p.sent_at >= self.ttl_s / 3:
                    commands.append((p, p.sent_ma))
            for p, _ma in commands:
                p.sent_at = now
        for p, ma in commands:
            amps = ma / 1000
            body = pilecmd.make_body("set_current_limit", {"amps": amps, "ttl_s": self.ttl_s},
                                     self._next_counter())
            self.publisher.client.publish("%s/%s/cmd" % (TOPIC_ROOT, p.pile_id),
                                          pilecmd.sign(p.secret, body), qos=1)
            self.sent.append((now, p.pile_id, amps, self.ttl_s))
            self.log("%s: set_current_limit %.1f A for %d s" % (p.pile_id, amps, self.ttl_s))
        return commands

    def exposure_ma(self):
        with self.lock:
            return sum(p.exposure_ma() for p in self.piles.values())

    def run(self, stop):
        while not stop.is_set():
            self.round()
            stop.wait(self.period_s)

    def close(self):
        self.publisher.close()


class SteeredPile:
    """A simulated pile for the demo and the tests: FakePile's telemetry, taking signed commands
    (the firmware's command_auth checks them) and keeping its limit as docs/commands.md says:
    a time to live, then the fallback; the offer changes at most every `offer_gap_s` (5 s in
    IEC 61851-1; the tests compress time). The car draws what it is offered, up to car_max_a,
    once `follow_s` has passed (the car's own reaction)."""

    def __init__(self, broker_url, pile_id, secret, max_a=32, fallback_a=6, car_max_a=32,
                 offer_gap_s=5.0, follow_s=1.0):
        command_auth = firmware_module("command_auth")
        self.auth = command_auth.CommandVerifier(secret)
        self.errors = command_auth.CommandError
        self.fake = FakePile(pile_id)
        self.pile_id = pile_id
        self.max_ma = int(max_a * 1000)
        self.fallback_ma = int(fallback_a * 1000)
        self.car_max_ma = int(car_max_a * 1000)
        self.offer_gap_s = offer_gap_s
        self.follow_s = follow_s
        self.limit_ma = None
        self.limit_source = None
        self.until = None
        self.offer_ma = 0
        self.offer_at = None
        self.plugged = False
        self.offers = []  # (time, offer_ma): every change of the offer
        self.lock = threading.Lock()
        self.pub = Publisher(broker_url, pile_id, will=self.fake.online(False))
        self.pub.client.on_message = self._on_message
        self.pub.client.subscribe("%s/%s/cmd" % (TOPIC_ROOT, pile_id), 1)
        self.pub.send([self.fake.online(True)])
        self.tick()

    def _on_message(self, _client, _userdata, msg):
        try:
            cmd = self.auth.verify(msg.payload)
        except self.errors as e:  # refused: answered as the pile answers
            result, reason, cmd_id, name = "invalid", str(e), e.command_id, e.cmd
        else:
            cmd_id, name, reason, result = cmd.id, cmd.cmd, None, "accepted"
            if cmd.cmd == "set_current_limit":
                with self.lock:
                    amps = cmd.args["amps"]
                    self.limit_ma = None if amps is None else int(amps * 1000)
                    self.limit_source = None if amps is None else "remote"
                    ttl = cmd.args.get("ttl_s", 900)
                    self.until = None if amps is None else time.monotonic() + ttl
            else:
                result, reason = "rejected", "not simulated"
        if cmd_id is not None and name is not None:
            self.pub.client.publish("%s/%s/cmd/ack" % (TOPIC_ROOT, self.pile_id),
                                    encode(self.fake.cmd_ack(cmd_id, name, result, reason).payload), qos=1)
        self.tick()

    def plug(self, on=True):
        with self.lock:
            self.plugged = on
        self.tick()

    def tick(self):
        """Expire, offer (5 s rule), car, status: call often."""
        now = time.monotonic()
        with self.lock:
            if self.until is not None and now >= self.until:
                self.limit_ma, self.limit_source, self.until = self.fallback_ma, "fallback", None
            want = self.max_ma if self.limit_ma is None else min(self.max_ma, self.limit_ma)
            want = want if want >= MIN_OFFER_MA and self.plugged else 0
            if want != self.offer_ma and (self.offer_at is None or now - self.offer_at >= self.offer_gap_s
                                          or self.offer_ma == 0):
                self.offer_ma, self.offer_at = want, now
                self.offers.append((now, want))
            draw = min(self.offer_ma, self.car_max_ma) if self.offer_at is not None and \
                now - self.offer_at >= self.follow_s else 0
            f = self.fake
            f.state = "charging" if self.plugged and self.offer_ma else (
                "suspended_evse" if self.plugged else "idle")
            f.pilot = "C" if self.plugged else "A"
            f.offer_a = round(self.offer_ma / 100) / 10
            f.power_w = int(draw * 230 / 1000)
            f.limit_a = None if self.limit_ma is None else round(self.limit_ma / 100) / 10
            f.limit_source = self.limit_source
            f.limit_expires_s = None if self.until is None else max(0, math.ceil(self.until - now))
            status = f.status()
        self.pub.client.publish(status.topic, encode(status.payload), qos=1, retain=True)

    def close(self):
        self.pub.close()


def load_group(path):
    """The group file: {"site_limit_a": 40, "ttl_s": 60, "period_s": 5, "piles": [{"pile_id":
    ..., "secret_file": ..., "max_a": 32, "fallback_a": 6}, ...]}."""
    with open(path) as f:
        conf = json.load(f)
    piles = [Pile(p["pile_id"], int(p.get("max_a", 32) * 1000), int(p.get("fallback_a", 6) * 1000),
                  pilecmd.read_secret(p["secret_file"])) for p in conf["piles"]]
    return conf, piles


def main(argv=None):
    ap = argparse.ArgumentParser(description="Share a site limit among the piles of a group.")
    ap.add_argument("--broker", required=True, help="mqtt://[user:pass@]host[:port]")
    ap.add_argument("--group", required=True, help="the group file (JSON, see pilehost/group_limit.py)")
    ap.add_argument("--rounds", type=int, help="stop after this many rounds (default: run)")
    opts = ap.parse_args(argv)
    try:
        conf, piles = load_group(opts.group)
        ctl = Controller(opts.broker, conf["site_limit_a"], piles, conf.get("ttl_s", 60),
                         conf.get("period_s", 5.0))
    except (OSError, ValueError, KeyError) as e:
        ap.error(str(e))
    try:
        n = 0
        while opts.rounds is None or n < opts.rounds:
            ctl.round()
            print("exposure %.1f A of %.1f A" % (ctl.exposure_ma() / 1000, ctl.site_ma / 1000), flush=True)
            n += 1
            time.sleep(ctl.period_s)
    except KeyboardInterrupt:
        pass
    finally:
        ctl.close()
    return 0
