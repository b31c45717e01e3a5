"""The MQTT link (firmware/mqtt_link.py): the firmware on the unix port, simulated hardware, a real
mosquitto on a free loopback port and the reference consumer. The link must deliver every
session exactly once and never hold up the control loop: C->B opens within 100 ms with the
broker black-holed or unreachable."""
import collections
import json
import os
import random
import re
import signal
import time

import pytest

import journal  # firmware/
import journal_scan
from pilehost import pilecmd, unix_port
from pilehost.broker import BlackHole
from pilehost.cloud import Store, schemas
from pilehost.link_rig import (C_TO_B_LIMIT_MS, HEAP, PILE, SECRET, SESSION, Proxy, Watcher, ended_idle,
                               mqtt_config, sessions, signed, until)
from pilehost.procs import TIMEOUT, free_port, wait_for

SCHEMAS = schemas()

try:
    unix_port.micropython_binary()
except FileNotFoundError:  # pragma: no cover - `make test` installs it
    pytest.skip("MicroPython unix port not installed (make venv)", allow_module_level=True)


def run(scenario, port, **kwargs):
    r = unix_port.run_scenario(scenario, config=mqtt_config(port), heapsize=HEAP, **kwargs)
    assert r.returncode == 0 and r.result is not None, "\n".join(r.lines[-30:])
    assert not any("Traceback" in line or "MemoryError" in line for line in r.lines), "\n".join(r.lines)
    return r


def count(c, key):
    return c.handler.stats.snapshot()[0].get(key, 0)


def pending_records(flash):
    """What the pile's flash outbox still holds unacknowledged: (kind, session_id)."""
    return [(journal.kind_name(kind), json.loads(payload).get("session_id"))
            for _seq, kind, payload in
            journal_scan.load(os.path.join(flash, "outbox.jrnl")).pending()]



# -- delivery ------------------------------------------------------------------------------------

def test_normal_session_reaches_the_consumer_once(broker, store, watcher, unix_binary):
    r = run("normal", broker.port)
    assert ended_idle(r)
    assert max(r.result["latencies_ms"]) < C_TO_B_LIMIT_MS
    wait_for(lambda: sessions(store), "the session row")
    assert sessions(store) == [("ev_disconnected",)]
    assert store.handler.stats.snapshot()[0].get("session_ended_new") == 1
    assert not store.handler.storage.query("SELECT reason FROM rejected")
    kinds = [t for t, _, retained in watcher.messages if not retained]  # not an earlier test's
    # docs/telemetry.md: online, then status, then the outbox, then live messages.
    assert kinds[:2] == ["online", "status"] and kinds.index("session/started") < kinds.index("session/ended")
    assert watcher.live("online")[0] == {"v": 1, "online": True, "boot": 1}
    assert watcher.live("online")[-1]["online"] is False  # the last will, when the process ended
    states = [s["state"] for s in watcher.live("status")]
    assert "charging" in states and states[-1] == "idle"
    for kind, schema in (("status", "status"), ("online", "online")):
        for obj in watcher.of(kind):
            SCHEMAS.check(schema, obj)
    # A new subscriber gets the retained ones.
    late = Watcher(broker)
    wait_for(lambda: {"status", "online"} <= {t for t, _, retained in late.messages if retained},
             "retained status and online")
    late.close()


def test_broker_away_then_back_replays_the_outbox_once(broker, store):
    proxy = Proxy(broker.port)  # down: the pile finds nothing listening

    def on_line(line):
        if "session: ended" in line and proxy.listener is None:
            proxy.up()

    try:
        r = run("broker_outage", proxy.port, on_line=on_line)
    finally:
        proxy.down()
    refused = [t for t in r.lines if "mqtt: connection refused" in t]
    assert refused and any("mqtt: connected" in t for t in r.lines), "\n".join(r.lines)
    wait_for(lambda: sessions(store), "the replayed session row")
    assert sessions(store) == [("ev_disconnected",)]
    starts = store.handler.storage.query("SELECT session_id FROM session_starts")
    assert starts == [(SESSION,)]
    assert ended_idle(r)


@pytest.mark.parametrize("how, hold", [(signal.SIGKILL, "puback"), (signal.SIGTERM, "publish")],
                         ids=["killed-after-passing-it-on", "restarted-before-receiving-it"])
def test_broker_restarted_mid_publish_stores_the_session_once(tmp_path, scenario_thread, new_broker, how,
                                                              hold):
    """The broker goes while the pile's session/ended is in flight, before its PUBACK: killed
    after it passed the record on (the PUBACK is held back on the way), or shut down before it
    got it (the PUBLISH is held back). It comes back empty on the same port; the pile sends the
    record again after reconnecting: stored once, nothing left in the pile's outbox."""
    b = new_broker(tmp_path)
    c = Store(b.url(), tmp_path / "telemetry.db")
    proxy = Proxy(b.port, hold=hold)
    proxy.up()
    flash = tmp_path / "flash"
    flash.mkdir()
    lines = []
    steps = [(300, "plug"), (1000, "request"), (3000, "stop_request"), (3500, "unplug"), (15000, "end")]
    thread, box = scenario_thread("session_then_wait", mqtt_config(proxy.port), steps, flash_dir=str(flash),
                                  on_line=lines.append)
    try:
        until(proxy.held.is_set, "session/ended in flight", thread, lines)
        if hold == "puback":  # the broker had it and passed it on: the consumer stored it
            wait_for(lambda: count(c, "session_ended_new") == 1, "the first copy stored")
        else:
            assert count(c, "session_ended_new") == 0
        proxy.down()
        b.restart(how)
        wait_for(lambda: not c.consumer.subscribed.is_set(), "the consumer to lose the broker")
        wait_for(c.consumer.subscribed.is_set, "the consumer to subscribe again", timeout=40)
        proxy.up()  # only now: a record sent before the consumer is back would reach no one
        wait_for(lambda: count(c, "session_ended_new") + count(c, "session_ended_duplicate") == (
            2 if hold == "puback" else 1), "the record sent again")
        thread.join(60)
        stored = c.handler.storage.query("SELECT session_id, stop_reason FROM sessions")
        started = c.handler.storage.query("SELECT session_id FROM session_starts")
        rejected = c.handler.storage.query("SELECT reason FROM rejected")
        arrived = (count(c, "session_ended_new"), count(c, "session_ended_duplicate"))
    finally:
        proxy.down()
        thread.join(60)
        c.stop()
        b.stop()
    r = box["run"]
    assert r.returncode == 0 and r.result is not None and r.result["boots"] == 1, "\n".join(r.lines[-30:])
    assert not any("Traceback" in line for line in r.lines)
    link = [t for _, t in r.firmware_events("mqtt")]
    assert len([t for t in link if t.startswith("connected")]) == 2, link
    assert stored == [(SESSION, "ev_disconnected")] and started == [(SESSION,)] and not rejected
    # How often it arrived: twice when the broker had passed it on before it died, else once.
    assert arrived == ((1, 1) if hold == "puback" else (1, 0))
    assert pending_records(str(flash)) == []  # every record acknowledged: nothing lost, nothing owed


def test_power_cut_mid_session_reaches_the_consumer_as_power_loss_once(broker, store, watcher, tmp_path,
                                                                       unix_binary):
    """kill -9 of the firmware while charging, then boots on the same flash folder with the
    broker and the consumer there all along: the cut session is stored once, as power_loss,
    and its started record once; a further boot sends neither again."""
    flash = str(tmp_path)
    config = mqtt_config(broker.port)
    cut = unix_port.run_scenario("charging_until_cut", config=config, heapsize=HEAP, flash_dir=flash,
                              kill_after_s=4.0)
    assert cut.result is None and any("contactor: closed" in t for t in cut.lines), "\n".join(cut.lines)
    wait_for(lambda: store.handler.storage.query("SELECT 1 FROM session_starts"), "the started record")
    wait_for(lambda: [m for m in watcher.live("online") if m == {"v": 1, "online": False, "boot": 1}],
             "the last will of boot 1")
    assert not sessions(store)  # the power went: nothing ended
    assert pending_records(flash) == []  # the started record was acknowledged before the cut
    assert os.path.exists(os.path.join(flash, "session.json"))

    again = unix_port.run_scenario("car_still_there", config=config, heapsize=HEAP, flash_dir=flash)
    assert again.returncode == 0 and again.result is not None, "\n".join(again.lines[-30:])
    wait_for(lambda: sessions(store), "the power_loss record")
    assert sessions(store) == [("power_loss",)]
    # Boot 2 ended with its own session open (the scenario stops the world): boot 3 closes
    # that one; by the time it is stored, a copy of boot 1's record would have come first.
    third = unix_port.run_scenario("car_still_there", config=config, heapsize=HEAP, flash_dir=flash,
                                kill_after_s=3.0)
    assert not any("Traceback" in t for t in third.lines + again.lines)
    wait_for(lambda: sessions(store, PILE + "-2-1"), "boot 2's session, closed by boot 3")
    assert sessions(store) == [("power_loss",)]
    assert count(store, "session_ended_duplicate") == 0  # acknowledged in flash: never sent again
    starts = "SELECT session_id FROM session_starts ORDER BY session_id"
    wait_for(lambda: len(store.handler.storage.query(starts)) == 3, "boot 3's started record")
    assert [s for (s,) in store.handler.storage.query(starts)] == [SESSION, PILE + "-2-1", PILE + "-3-1"]
    assert not store.handler.storage.query("SELECT reason FROM rejected")
    ended = [m for m in watcher.of("session/ended") if m["session_id"] == SESSION]
    assert len(ended) == 1 and ended[0]["stop_reason"] == "power_loss"
    SCHEMAS.check("session_ended", ended[0])


# -- the control loop never waits ---------------------------------------------------------------

def test_black_holed_broker_never_delays_the_contactor():
    hole = BlackHole()
    try:
        r = run("c_to_b_mid_charge", hole.port)
    finally:
        hole.close()
    lat = r.result["latencies_ms"]
    assert len(lat) == 3 and max(lat) < C_TO_B_LIMIT_MS
    assert ended_idle(r)
    assert hole.accepted  # it did connect, and then waited for a CONNACK that never came
    assert any("no CONNACK" in t for t in r.lines), "\n".join(r.lines)


def test_unreachable_broker_never_delays_the_contactor():
    r = run("normal", free_port())
    assert max(r.result["latencies_ms"]) < C_TO_B_LIMIT_MS
    assert ended_idle(r)
    assert any("mqtt: connection refused" in t for t in r.lines)


# -- commands ------------------------------------------------------------------------------------

FUZZ_COUNT = 1000
BAD_ARGS = [
    ("remote_start", {}), ("remote_start", {"auth_id": ""}), ("remote_start", {"auth_id": "x" * 65}),
    ("remote_start", {"auth_id": "caf\u00e9"}), ("remote_start", {"auth_id": "tab\there"}),
    ("remote_start", {"auth_id": 42}), ("remote_start", {"auth_id": "a", "extra": 1}),
    ("remote_stop", {"now": True}), ("request_status", {"x": None}), ("reboot", {"delay_s": 5}),
    ("set_current_limit", {}), ("set_current_limit", {"amps": 80.5}), ("set_current_limit", {"amps": -1}),
    ("set_current_limit", {"amps": "16"}), ("set_current_limit", {"amps": True}),
    ("set_current_limit", {"amps": [16]}), ("set_current_limit", {"amps": 16, "phases": 3}),
    ("set_availability", {"state": "maybe"}), ("set_availability", {"state": "AVAILABLE"}),
    ("set_availability", {}), ("clear_fault", {"fault": "diode"}), ("clear_fault", {"fault": ""}),
    ("clear_fault", {}),
]
# Each would be accepted if signed with a fresh counter: the fuzz wraps them wrongly.
GOOD_ARGS = [("remote_start", {"auth_id": "card-1"}), ("remote_stop", {}), ("request_status", {}),
             ("set_current_limit", {"amps": 16}), ("set_current_limit", {"amps": None}), ("reboot", {}),
             ("clear_fault", {"fault": "welded"}), ("set_availability", {"state": "unavailable_f"})]
# Signed bodies that break a rule of docs/commands.md: (keys changed, key left out, whether the
# ack can name the command: the id must be readable).
BAD_BODIES = [({"id": ""}, None, False), ({"id": "has space"}, None, False), ({"id": "x" * 65}, None, False),
              ({"id": 7}, None, False), ({"id": None}, None, False), ({"v": 2}, None, True),
              ({"v": "1"}, None, True), ({"v": 1.5}, None, True), ({"v": True}, None, True),
              ({"counter": 0}, None, True), ({"counter": -1}, None, True), ({"counter": 2 ** 53}, None, True),
              ({"counter": "12"}, None, True), ({"counter": 1.5}, None, True),
              ({"counter": None}, None, True), ({"counter": True}, None, True), ({"args": []}, None, True),
              ({"args": "x"}, None, True), ({"args": None}, None, True), ({"ts": 1}, None, True),
              ({}, "v", True), ({}, "args", True), ({}, "counter", True), ({}, "cmd", False)]
BAD_NAMES = ["Remote_stop", "remote-stop", "", 5, None, "a" * 33, "x" * 40]  # no ack: not an ack's cmd
OUTER_JUNK = [b"", b"{}", b"null", b"[]", b"42", b'"text"', b"true", b'{"body": "x"}',
              b'{"body": 1, "sig": 2}', b'{"body": "x", "sig": null}', b'{"Body": "x", "sig": "00"}',
              b'{"body": ["x"], "sig": "y"}', b"{", b"\xff\xfe\xfd"]


def fuzzed_commands(base, first):
    """FUZZ_COUNT payloads the pile must refuse after accepting `first` (counter `base`): each
    (category, payload, code, ack), where code is the refusal docs/commands.md gives and ack the
    (cmd_id, cmd) the pile must answer, or None when it only logs. Seeded: the same every run."""
    rnd = random.Random(20261123)
    out = []

    def body(cmd, args, counter, cmd_id, change=(), drop=None):
        d = {"v": 1, "id": cmd_id, "cmd": cmd, "counter": counter, "args": args}
        d.update(change)
        d.pop(drop, None)
        return json.dumps(d, separators=(",", ":"))

    def payload(text, sig):
        return json.dumps({"body": text, "sig": sig}, separators=(",", ":")).encode()

    def wrong_key(i, fresh, cid):
        cmd, args = rnd.choice(GOOD_ARGS)
        key = bytes(rnd.getrandbits(8) for _ in range(rnd.randint(16, 64)))
        return signed(cmd, args, fresh, cid, secret=key), "bad_signature", (cid, cmd)

    def sig_flipped(i, fresh, cid):
        cmd, args = rnd.choice(GOOD_ARGS)
        text = pilecmd.make_body(cmd, args, fresh, cid)
        sig = json.loads(pilecmd.sign(SECRET, text))["sig"]
        k = rnd.randrange(64)
        other = rnd.choice([c for c in "0123456789abcdef" if c != sig[k]])
        return payload(text, sig[:k] + other + sig[k + 1:]), "bad_signature", (cid, cmd)

    def tampered(i, fresh, cid):  # signed, then the counter changed on the way
        cmd, args = rnd.choice(GOOD_ARGS)
        sig = json.loads(signed(cmd, args, fresh, cid))["sig"]
        return payload(pilecmd.make_body(cmd, args, fresh + 1, cid), sig), "bad_signature", (cid, cmd)

    def sig_form(i, fresh, cid):  # unsigned, or not 64 hex digits
        cmd, args = rnd.choice(GOOD_ARGS)
        sig = rnd.choice(["", "00" * 31, "00" * 33, "g" * 64, " " * 64, "0x" + "ab" * 31])
        return payload(pilecmd.make_body(cmd, args, fresh, cid), sig), "bad_signature", (cid, cmd)

    def replayed(i, fresh, cid):  # the accepted command again, byte for byte
        return first, "replayed", ("first", "request_status")

    def stale(i, fresh, cid):  # signed right, counter at or below the last accepted
        cmd, args = rnd.choice(GOOD_ARGS)
        counter = rnd.choice([base, base - 1, rnd.randint(1, base)])
        return signed(cmd, args, counter, cid), "replayed", (cid, cmd)

    def unknown(i, fresh, cid):
        if rnd.random() < 0.7:
            name = rnd.choice("abcdefghijklmnopqrstuvwxyz") + "".join(
                rnd.choice("abcdefghijklmnopqrstuvwxyz0123456789_") for _ in range(rnd.randint(0, 31)))
            if name in pilecmd.COMMANDS:
                name += "_x"
            return signed(name, {}, fresh, cid), "unknown_command", (cid, name)
        text = body(rnd.choice(BAD_NAMES), {}, fresh, cid)
        return pilecmd.sign(SECRET, text), "unknown_command", None

    def bad_args(i, fresh, cid):
        cmd, args = rnd.choice(BAD_ARGS)
        return signed(cmd, args, fresh, cid), "bad_argument", (cid, cmd)

    def bad_body(i, fresh, cid):
        cmd, args = rnd.choice(GOOD_ARGS)
        change, drop, acked = rnd.choice(BAD_BODIES)
        if rnd.random() < 0.15:
            text, acked = rnd.choice(["not json", "[1,2]", "", "{"]), False
        else:
            text = body(cmd, args, fresh, cid, change, drop)
        return pilecmd.sign(SECRET, text), "malformed", (cid, cmd) if acked else None

    def outer(i, fresh, cid):
        if rnd.random() < 0.3:  # a good payload cut short
            good = signed("remote_stop", {}, fresh, cid)
            return good[:rnd.randrange(len(good) - 1)], "malformed", None
        if rnd.random() < 0.3:  # a third key
            good = json.loads(signed("remote_stop", {}, fresh, cid))
            return json.dumps(dict(good, extra=1)).encode(), "malformed", None
        return rnd.choice(OUTER_JUNK), "malformed", None

    def nested(i, fresh, cid):  # cheap to send, ~19 KB for MicroPython's json to parse at depth 250
        k = rnd.randint(100, 240)
        if rnd.random() < 0.4:  # where the body's claims are read, before the signature is checked
            return payload("[" * k + "]" * k, ""), "bad_signature", None
        if rnd.random() < 0.5:
            return b'{"a":' * (k // 3) + b"1" + b"}" * (k // 3), "malformed", None
        return b"[" * k + b"]" * k, "malformed", None

    def too_large(i, fresh, cid):  # over 512 bytes; over ~1 KiB the link skips it unread
        size = rnd.choice([rnd.randint(513, 990), rnd.randint(1100, 4000)])
        if rnd.random() < 0.5:
            return bytes(rnd.getrandbits(8) for _ in range(size)), "too_large", None
        pad = "x" * size
        return signed("remote_start", {"auth_id": "a", "pad": pad}, fresh, cid), "too_large", None

    def random_bytes(i, fresh, cid):
        data = bytes(rnd.getrandbits(8) for _ in range(rnd.randint(0, 700)))
        return data, "too_large" if len(data) > 512 else "malformed", None

    makers = [(wrong_key, 12), (sig_flipped, 8), (tampered, 6), (sig_form, 8), (replayed, 6), (stale, 8),
              (unknown, 8), (bad_args, 12), (bad_body, 12), (outer, 7), (nested, 3), (too_large, 5),
              (random_bytes, 7)]
    weighted = [m for m, w in makers for _ in range(w)]
    for i in range(FUZZ_COUNT):
        make = makers[i][0] if i < len(makers) else rnd.choice(weighted)  # every kind at least once
        raw, code, ack = make(i, base + 10 + i, "f-%d" % i)
        out.append((make.__name__, raw, code, ack))
    return out


def refusals(lines):
    """The refusal codes the pile logged ("mqtt: command refused: <code>..."), in order."""
    return [re.match(r"[a-z_]+", t.split("command refused: ", 1)[1]).group(0)
            for t in lines if "mqtt: command refused: " in t]


def test_fuzzed_commands_change_nothing_then_signed_ones_work(broker, store, watcher, scenario_thread,
                                                              unix_binary):
    """docs/commands.md: whatever arrives, a refused command changes nothing (not the charger,
    not the offer, not the contactor, not the counter) and is answered with an error ack when it
    names itself, else only logged. FUZZ_COUNT of them, end to end, then valid ones still work."""
    # ~130 commands a second get through (one per control loop, the acks in between): 1000 take
    # ~8 s, and the scenario leaves room for twice that on a busy machine.
    steps = [(300, "plug"), (1000, "request"), (25000, "end")]
    base = int(time.time() * 1000) + 60000  # above any counter "now" while the pile starts
    first = signed("request_status", {}, base, "first")
    fuzz = fuzzed_commands(base, first)
    seen = []
    thread, box = scenario_thread("fuzz_commands", mqtt_config(broker.port), steps, on_line=seen.append)

    def wait(predicate, what, timeout=TIMEOUT):
        until(predicate, what, thread, seen, timeout)

    try:
        wait(lambda: any(s["state"] == "charging" for s in watcher.live("status")), "charging")
        watcher.publish(first)  # accepted: sets the counter
        wait(lambda: [a for a in watcher.of("cmd/ack") if a["cmd_id"] == "first"], "the first ack")
        wait(lambda: len(watcher.live("status")) >= 2 and watcher.live("status")[-1]["state"] == "charging",
             "the requested status")
        before = watcher.of("status")[-1]
        acks_before = len(watcher.of("cmd/ack"))
        statuses_before = len(watcher.of("status"))
        window = len(seen)
        for n, (_, raw, _, _) in enumerate(fuzz):
            # mosquitto queues at most 1000 messages for the pile (max_queued_messages), and while
            # the contactor is closed the console holds at most 2 KiB of lines (console.py; more
            # are dropped and counted): keep 16 refusal lines (<= ~100 B each) in flight at most
            wait(lambda n=n: n - len(refusals(seen[window:])) < 16, "the pile to keep up")
            watcher.publish(raw)
        wait(lambda: len(refusals(seen[window:])) >= FUZZ_COUNT, "%d refusals" % FUZZ_COUNT, 60)
        expected_acks = [ack for _, _, _, ack in fuzz if ack is not None]
        wait(lambda: len(watcher.of("cmd/ack")) >= acks_before + len(expected_acks), "the error acks")
        time.sleep(0.5)  # nothing more may come
        during = seen[window:]
        acks = watcher.of("cmd/ack")[acks_before:]
        statuses = watcher.of("status")[statuses_before:]

        # Valid commands still work, and the counter did not move: base + 1 is the next one.
        watcher.publish(signed("request_status", {}, base + 1, "after"))
        wait(lambda: [a for a in watcher.of("cmd/ack") if a["cmd_id"] == "after"], "the ack of base + 1")
        wait(lambda: len(watcher.of("status")) > statuses_before + len(statuses), "the status after")
        after = watcher.of("status")[-1]
        watcher.publish(signed("remote_stop", {}, base + 2, "stop-1"))
        wait(lambda: [a for a in watcher.of("cmd/ack") if a["cmd_id"] == "stop-1"], "the stop's ack")
        wait(lambda: sessions(store), "the session row")
    finally:
        thread.join(90)
    r = box["run"]

    # Each one refused once, in order, for the reason docs/commands.md gives; nothing else happened.
    kinds = collections.Counter(kind for kind, _, _, _ in fuzz)
    assert len(kinds) == 13 and sum(kinds.values()) == FUZZ_COUNT, kinds
    assert refusals(during) == [code for _, _, code, _ in fuzz]
    others = [t for t in during if "mqtt: command refused: " not in t]
    assert not others, others[:20]  # no charger, pilot, contactor, session line; no reconnect
    # The error acks: exactly those that name themselves, in order, none accepted.
    assert [(a["cmd_id"], a["cmd"]) for a in acks] == expected_acks
    codes = [code for _, _, code, ack in fuzz if ack is not None]
    assert [a["reason"].split(":")[0] for a in acks] == codes
    assert [a["result"] for a in acks] == ["unknown_command" if c == "unknown_command" else "invalid"
                                          for c in codes]
    for a in acks:
        SCHEMAS.check("cmd_ack", a)
    assert not statuses  # no change to report
    keep = ("state", "pilot", "offer_a", "session_id", "faults")
    assert [after[k] for k in keep] == [before[k] for k in keep]
    assert after["state"] == "charging" and after["session_id"] == SESSION

    ack = {a["cmd_id"]: a for a in watcher.of("cmd/ack")}
    assert (ack["after"]["result"], ack["stop-1"]["result"]) == ("accepted", "accepted")
    assert sessions(store) == [("remote",)]
    assert r.returncode == 0 and r.result is not None, "\n".join(r.lines[-30:])
    assert r.result["boots"] == 1  # no reset, no watchdog
    assert not any("Traceback" in line or "MemoryError" in line for line in r.lines)
    assert len([t for _, t in r.firmware_events("session") if t.startswith("stopped")]) == 1
