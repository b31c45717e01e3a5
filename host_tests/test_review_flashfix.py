"""An adversary's review of the flashfix change (command_auth.py's released reservation,
flash_gate.py's one deferred write an iteration, console.step): each test is an input or a timing
that tries to break one of its claims.

- The release after a quiet minute is decided on ticks_ms stamps (`_look_at`, `_quiet_at`). The
  ticks wrap every 2**30 ms (12.4 days) and ticks_diff reads a stamp more than 2**29 ms (6.2 days)
  old as in the future: a pile idle a week, then one command, kept its reservation for days, and a
  reboot then left the floor a week above every counter the operator's tool signs.
- A counter write whose error comes after the new file is in place (durable.replace syncs after
  the rename on a port without fsync): a release that failed so left the verifier believing in
  the old, higher reservation while the flash held the lower floor, and the commands between the
  two were accepted without a write: after a power cut, each could be replayed. The same error
  left session_store's "unchanged, not rewritten" cache holding the value it tried: the same
  reservation written again later (the clock unset) was skipped, the flash still the lower floor.
- A remote_stop accepted while closed above the flash, its write at the open failed (flash
  full), no car after: it stayed off the flash until the next command, replayable after a cut.
- The whole floor under a hostile clock (set back, forth, unset) and flash (full, erring after
  landing, cut at any byte): no replay, a fresh command after every reboot (found nothing more).
- console.step was given the iteration's start: a tick that took longer than the next one's let
  the next step count the FIFO emptied for the difference and block with the contactor closed.
- A worst-case flash part (the stalls of test_flash_gate_spread.py): a set_current_limit with the
  contactor open after the reservation was released wrote the counter and then the settings in
  one iteration, past the 2 s watchdog; a command after a deferred write in the same iteration
  stacked the same way. Fixed: flash_gate.spent (the settings wait for the next iteration, a
  received command is verified in an iteration with no write before it).
"""
import json
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pilehost import pilecmd
from pilehost.virtual_board import VirtualBoard

import command_auth as C
import durable
import session_store

SECRET = bytes(range(32))
DAY_MS = 86_400_000
TICKS = 1 << 30  # MicroPython's ticks_ms period (host_tests/shims/mp_time.py, the ESP32's)


def signed(name, args, counter):
    return pilecmd.sign(SECRET, pilecmd.make_body(name, args, counter))


def boot(store, gate, plugged, unix=None):
    """The verifier as wiring.build_verifier makes it at boot, the contactor open."""
    v = C.CommandVerifier(SECRET, last_counter=store.load(), counter_store=store, gate=gate,
                          unix_ms=unix, may_close=lambda: plugged[0])
    assert v.reserve_ahead() is None
    return v


def open_steps(gate, t0, ms, every=1000, errors=None):
    """The flash gate's open steps every `every` ms for `ms`, from ticks t0; the ticks after.
    A write's error goes to `errors` if given, else fails the test."""
    t = t0
    for _ in range(ms // every):
        t = (t + every) % TICKS
        for fn in gate.steps:
            problem = fn(t)
            if errors is None:
                assert problem is None
            elif problem is not None:
                errors.append(problem)
    return t


# -- the release across the ticks wrap ------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(idle_days=st.integers(0, 14), plugged_days=st.integers(0, 14), t0=st.integers(0, TICKS - 1))
def test_the_reservation_is_released_a_quiet_minute_after_the_last_command_however_long_the_pile_idled(
        tmp_path_factory, fake_flash_gate, idle_days, plugged_days, t0):
    """A command, a minute's quiet (released), `idle_days` with nothing, a car plugged in for
    `plugged_days` with a command at its start, unplugged: 80 s later the flash holds the last
    accepted counter, so that a reboot moves no floor (test_counter_floor.py's no drift)."""
    path = str(tmp_path_factory.mktemp("w") / "cmd_counter.json")
    store = session_store.CounterStore(path)
    gate = fake_flash_gate()
    plugged = [False]
    v = boot(store, gate, plugged)
    counter = 1_800_000_000_000
    assert v.verify(signed("set_availability", {"state": "available"}, counter)).counter == counter
    t = open_steps(gate, t0, 80_000)
    assert session_store.CounterStore(path).load() == counter  # released
    # Idle: the loop runs, the open steps look at nothing new (sampled: a step every minute).
    t = open_steps(gate, t, idle_days * DAY_MS, every=60_000)
    plugged[0] = True
    counter += 1
    assert v.verify(signed("set_availability", {"state": "available"}, counter)).counter == counter
    t = open_steps(gate, t, plugged_days * DAY_MS, every=60_000)
    plugged[0] = False
    open_steps(gate, t, 80_000)
    assert session_store.CounterStore(path).load() == counter, (
        "the reservation kept after %d idle days and %d plugged: a reboot now moves the floor "
        "to %d" % (idle_days, plugged_days, session_store.CounterStore(path).load()))


# -- a write that landed but reported an error ----------------------------------------------------


class LandedThenFailed(session_store.CounterStore):
    """The counter file: with `fail` set, the next save puts the new file in place and then
    raises the OSError a sync after the rename can raise (durable.replace on a port without
    fsync)."""

    fail = False

    def _save(self, value):
        if not self.fail:
            return super()._save(value)
        self.fail = False
        real = session_store.write_atomic
        session_store.write_atomic = landed_then_failed
        try:
            return super()._save(value)
        finally:
            session_store.write_atomic = real


def landed_then_failed(path, data):
    """durable.write_atomic whose sync after the rename errs: the new file in place."""
    durable.write_atomic(path, data)
    raise OSError(5, "EIO after the rename")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, 30), gap=st.integers(1, C.RESERVE))
def test_no_command_accepted_above_what_the_flash_holds_when_a_write_errs_after_landing(
        tmp_path_factory, fake_flash_gate, which, gap):
    """Each counter write in turn (`which`) lands and then errs; after every accepted command the
    counter file holds at least that counter (a power cut then, and a replay of it is refused)."""
    path = str(tmp_path_factory.mktemp("l") / "cmd_counter.json")
    store = LandedThenFailed(path)
    gate = fake_flash_gate()
    plugged = [True]
    v = boot(store, gate, plugged)
    saves = [0]
    real_save = session_store.CounterStore.save

    def counting(self, counter):
        if saves[0] == which:
            self.fail = True
        saves[0] += 1
        return real_save(self, counter)

    store.save = counting.__get__(store)
    counter = 1_000
    t = 0
    errors = []
    for round_ in range(6):
        plugged[0] = round_ % 2 == 0
        t = open_steps(gate, t, 20_000, errors=errors)  # reservation written, or released
        for _ in range(3):
            counter += gap // 3 + 1
            try:
                v.verify(signed("set_availability", {"state": "available"}, counter))
            except C.CommandError as e:
                assert e.code == "storage_error", e
                continue
            on_flash = session_store.CounterStore(path).load()
            assert on_flash >= counter, (
                "counter %d accepted while the flash holds %d: a power cut, and it is accepted "
                "again" % (counter, on_flash))
        t = open_steps(gate, t, 70_000, errors=errors)
    assert saves[0] > which or not errors




def test_a_reservation_written_again_after_a_landed_then_failed_release_reaches_the_flash(
        tmp_path, fake_flash_gate):
    """The clock unset: the reservation is the last counter + RESERVE, the same value each time.
    A release lands and errs; at the next plug-in that same reservation is written again, and
    must really be written: the store's "unchanged, not rewritten" must not take the value it
    tried last for what the file holds."""
    path = str(tmp_path / "cmd_counter.json")
    store = LandedThenFailed(path)
    gate = fake_flash_gate()
    plugged = [False]
    v = boot(store, gate, plugged)
    counter = 5_000
    assert v.verify(signed("set_availability", {"state": "available"}, counter)).counter == counter
    assert store.load() == counter + C.RESERVE  # the reservation, written with the command
    store.fail = True
    errors = []
    t = open_steps(gate, 0, 80_000, errors=errors)  # the release lands, then errs
    plugged[0] = True
    open_steps(gate, t, 70_000, errors=errors)  # past the retry: the same reservation again
    assert len(errors) == 1, errors
    gate.closed = True
    for c in range(counter + 1, counter + 4):
        assert v.verify(signed("set_availability", {"state": "available"}, c)).counter == c
        on_flash = session_store.CounterStore(path).load()
        assert on_flash >= c, "counter %d accepted while the flash holds %d" % (c, on_flash)


# -- a stop accepted while closed whose write at the open failed ----------------------------------


class FailingStore(session_store.CounterStore):
    """The counter file; every save raises ENOSPC while `full` (the flash full)."""

    full = False

    def save(self, counter):
        if self.full:
            raise OSError(28, "ENOSPC")
        return super().save(counter)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(minutes=st.integers(2, 30), replug=st.booleans())
def test_a_stop_accepted_unsaved_while_closed_reaches_the_flash_once_it_has_room_again(
        tmp_path_factory, fake_flash_gate, minutes, replug):
    """The flash full when a car is plugged in (no reservation) and still at the open: the
    remote_stop accepted while closed is not on flash (the documented window). The car goes,
    the flash has room again: within `minutes` the counter file holds the stop's counter, so a
    captured stop cannot be replayed after a power cut to end a later session."""
    path = str(tmp_path_factory.mktemp("s") / "cmd_counter.json")
    store = FailingStore(path)
    gate = fake_flash_gate()
    plugged = [False]
    v = boot(store, gate, plugged)
    counter = 1_000
    assert v.verify(signed("request_status", {}, counter)).counter == counter
    t = open_steps(gate, 0, 80_000)
    assert store.load() == counter  # released
    store.full = True
    plugged[0] = True
    t = open_steps(gate, t, 2000, errors=[])  # the reservation not written
    gate.closed = True
    stop = counter + 5
    assert v.verify(signed("remote_stop", {}, stop)).counter == stop  # unsaved, due at the open
    problems = gate.open()
    assert problems[0] is not None  # the flush failed: reported
    plugged[0] = replug
    store.full = False
    open_steps(gate, t, minutes * 60_000, errors=[])
    assert session_store.CounterStore(path).load() >= stop, (
        "the stop's counter never written: a power cut, and it is accepted again")



# -- the whole floor under a hostile clock and a failing flash -------------------------------------


class PowerCut(Exception):
    """The supply gone in the middle of a counter write."""


class HostileStore(session_store.CounterStore):
    """The counter file under `mode`: None works; "full" raises before writing; "late" writes
    the new file and then raises; ("cut", byte, renamed) cuts the power in the write."""

    mode = None

    def save(self, counter):
        mode = self.mode
        if mode is None:
            return super().save(counter)
        if mode == "full":
            raise OSError(28, "ENOSPC")
        if mode == "late":
            self.mode = None
            real = session_store.write_atomic
            session_store.write_atomic = landed_then_failed
            try:
                return super().save(counter)
            finally:
                session_store.write_atomic = real
        self.mode = None
        _, at, renamed = mode
        if renamed:
            super().save(counter)
        else:
            data = session_store._encode(counter)
            with open(self.path + ".tmp", "wb") as f:
                f.write(data[:at % (len(data) + 1)])
        raise PowerCut()


HOSTILE = st.one_of(
    st.tuples(st.sampled_from(("plug", "unplug", "close", "open", "reboot", "full", "heal",
                               "late", "unset"))),
    st.tuples(st.just("step"), st.sampled_from((5, 1000, 20000, 90000))),
    st.tuples(st.just("clock"), st.integers(-3 * C.RESERVE, 3 * C.RESERVE)),
    st.tuples(st.just("cmd"), st.sampled_from(("set_current_limit", "remote_stop", "request_status",
                                               "reboot")),
              st.sampled_from((0, 1, C.RESERVE // 2, C.RESERVE + 1, 3 * C.RESERVE))),
    st.tuples(st.just("cut"), st.integers(0, 40), st.booleans()))
ARGS = {"set_current_limit": {"amps": 10}}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(HOSTILE, max_size=50))
def test_no_replay_and_a_fresh_command_after_every_reboot_under_a_hostile_clock_and_flash(
        tmp_path_factory, fake_flash_gate, ops):
    """The pile's clock set back and forth or unset (SNTP, a reboot), the operator's own clock
    going forward; the flash full, erring after a write landed, cut at any byte: no command is
    accepted twice (but the documented window: a stop or status accepted above the flash while
    closed, the power cut before it was written), and after every reboot with a working flash
    the operator's tool gets a command accepted (--floor after a `replayed`)."""
    path = str(tmp_path_factory.mktemp("h") / "cmd_counter.json")
    world = {"now": 0, "pile_unix": 1_800_000_000_000, "op_unix": 1_800_000_000_000,
             "plugged": False}
    accepted = {}  # payload -> counter
    window = set()  # payloads in the documented window
    state = {}

    def boot():
        HostileStore.mode = None if HostileStore.mode != "full" else "full"
        store = HostileStore(path)
        gate = fake_flash_gate()
        floor = store.load()
        assert floor is not None
        v = C.CommandVerifier(SECRET, last_counter=floor, counter_store=store, gate=gate,
                              unix_ms=lambda: world["pile_unix"],
                              may_close=lambda: world["plugged"])
        v.reserve_ahead()
        state.update(v=v, gate=gate, store=store)

    def send(payload, name):
        v, gate = state["v"], state["gate"]
        try:
            cmd = v.verify(payload)
        except C.CommandError as e:
            return e
        assert payload not in accepted, "accepted twice"
        accepted[payload] = cmd.counter

        if gate.held and name in ("remote_stop", "request_status") and cmd.counter > v.reserved:
            window.add(payload)
        return cmd

    def settle():
        """Payloads the flash now covers leave the window."""
        on_flash = session_store.CounterStore(path).load() or 0
        for payload in list(window):
            if accepted[payload] <= on_flash:
                window.discard(payload)

    def steps(ms):
        gate = state["gate"]
        for _ in range(max(1, ms // 1000)):
            world["now"] += min(ms, 1000)
            if world["pile_unix"] is not None:
                world["pile_unix"] += min(ms, 1000)
            world["op_unix"] += min(ms, 1000)
            if not gate.held:
                due, gate.due = gate.due, []
                for fn in due + gate.steps:
                    fn(world["now"] % TICKS)
            settle()

    def reboot():
        boot()
        v = state["v"]
        for payload in accepted:
            if payload in window:
                continue  # docs/commands.md, "Replays": the documented window
            err = send(payload, None)
            assert isinstance(err, C.CommandError) and err.code == "replayed", err
        window.clear()
        if HostileStore.mode == "full":
            return
        world["op_unix"] += 1
        payload = signed("request_status", {}, world["op_unix"])
        got = send(payload, "request_status")
        if isinstance(got, C.CommandError):
            assert got.code == "replayed", got
            floor = pilecmd.floor_of(str(got))
            assert floor is not None and floor < C._MAX_COUNTER, got
            got = send(signed("request_status", {}, max(world["op_unix"], floor + 1)),
                       "request_status")
        assert isinstance(got, C.Command), "no fresh command after a reboot: %s" % got
        assert v.last_counter == got.counter

    HostileStore.mode = None
    boot()
    for op in ops:
        kind = op[0]
        try:
            if kind == "plug":
                world["plugged"] = True
            elif kind == "unplug":
                world["plugged"] = state["gate"].closed = False
            elif kind == "close" and world["plugged"]:
                state["gate"].closed = True
            elif kind == "open":
                state["gate"].closed = False
            elif kind == "step":
                steps(op[1])
            elif kind == "clock":
                world["pile_unix"] = max(1, (world["pile_unix"] or world["op_unix"]) + op[1])
            elif kind == "unset":
                world["pile_unix"] = None
            elif kind == "full":
                HostileStore.mode = "full"
            elif kind == "heal":
                HostileStore.mode = None
            elif kind == "late":
                HostileStore.mode = "late"
            elif kind == "cut":
                HostileStore.mode = ("cut", op[1], op[2])
            elif kind == "cmd":
                world["op_unix"] += 1
                counter = max(world["op_unix"], state["v"].last_counter + 1) + op[2]
                send(signed(op[1], ARGS.get(op[1], {}), counter), op[1])
            elif kind == "reboot":
                if HostileStore.mode != "full":
                    HostileStore.mode = None
                reboot()
        except PowerCut:
            HostileStore.mode = None
            reboot()


# -- a command with the contactor open on a worst-case flash part --------------------------------

WATCHDOG_MS = 2000  # config.py's wdt_timeout_ms default


def test_a_command_after_the_release_stays_within_the_watchdog_on_a_worst_case_part(monkeypatch, slow_flash):
    import session_log  # noqa: F401 - every writer imported before its `open` is wrapped

    config = {"free_vend": True, "pile_id": "review-1",
              "meter": {"type": "ddsu666", "failure_timeout_s": 5},
              "mqtt": {"host": "127.0.0.1", "secret": SECRET.hex()}}
    vb = VirtualBoard(monkeypatch, config=config, period_ms=5)
    link = vb.build_link()
    v = link._verifier
    w = vb.world

    vb.run_for(1000)
    first = v.reserved + 1
    link._commands.received(link, vb.clock.ticks_ms(), signed("request_status", {}, first))
    assert json.loads(link._acks[-1])["result"] == "accepted", link._acks[-1]
    vb.run_for(80000)  # no car, no command: released
    assert v.reserved == v.last_counter == first
    log = slow_flash(vb)
    start = vb.clock.t
    w.advance()
    vb.tick()
    link._commands.received(link, vb.clock.ticks_ms(), signed("set_current_limit", {"amps": 10}, first + 1))
    assert json.loads(link._acks[-1])["result"] == "accepted", link._acks[-1]
    spent_ms = (vb.clock.t - start) / 1000 - vb.period_ms
    assert spent_ms < WATCHDOG_MS, "an iteration took %.0f ms of flash stalls: %s" % (
        spent_ms, [what for _, what in log])



# -- the console's queue over any sequence of iterations -------------------------------------------




LINES = st.lists(st.integers(1, 700), max_size=3)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(LINES, st.sampled_from((None, None, None, "close", "open")),
                          st.floats(0, 12), LINES, st.integers(0, 40)), max_size=60))
def test_no_console_write_blocks_while_closed_over_any_iterations(fresh_console, console_uart,
                                                                   iterations):
    """main.py's loop: each iteration the tick reports (and may close or open the contactor,
    closes at least relay.MIN_OPEN_MS after an open) and takes up to 12 ms, console.step at the
    clock then, then the records step and the link report more, taking up to 40 ms; 5 ms
    periods. No write blocks while closed. (console.step at the iteration's start, a tick
    longer than the next one's made the next step write into bytes still in the FIFO.)"""
    import time

    import console
    import relay

    uart = console_uart(5000)
    clock = uart.clock
    opened_at = -10 ** 9
    for tick_lines, change, tick_ms, late_lines, slow_ms in iterations:
        start = int(clock[0])
        for n in tick_lines:
            console.report(start, "charger", "t" * n)
        if change == "close" and clock[0] - opened_at >= relay.MIN_OPEN_MS:
            fresh_console.held = True
        elif change == "open" and fresh_console.held:
            fresh_console.held = False
            opened_at = clock[0]
        clock[0] += tick_ms
        console.step(time.ticks_ms())  # as main.py
        for n in late_lines:
            console.report(start, "mqtt", "l" * n)
        clock[0] += slow_ms
        spent = clock[0] - start
        if spent < 5:
            clock[0] += 5 - spent
    held_blocks = uart.held_blocks()
    assert held_blocks == [], "a console write blocked %.1f ms with the contactor closed" % max(
        held_blocks)


def test_a_command_received_in_an_iteration_that_wrote_is_verified_in_the_next(monkeypatch):
    """The link's step comes after the records step: a command received while the gate ran a
    deferred write that iteration would stack its counter write on it (the watchdog above).
    It is held over to the next iteration with no write before it (flash_gate.spent)."""
    import flash_gate

    config = {"free_vend": True, "pile_id": "review-1",
              "mqtt": {"host": "127.0.0.1", "secret": SECRET.hex()}}
    vb = VirtualBoard(monkeypatch, config=config, period_ms=5)
    link = vb.build_link()
    v = link._verifier
    gate = vb.ctl.records.gate
    assert isinstance(gate, flash_gate.FlashGate)
    for _ in range(3):
        vb.world.advance()
        vb.tick()
    counter = v.reserved + 1
    gate.spend()  # a write in this iteration, before the link's step
    link._cmd_in = signed("request_status", {}, counter)
    import mqtt_conn

    monkeypatch.setattr(link._conn, "step", lambda now_ms: None)
    monkeypatch.setattr(link._conn, "state", mqtt_conn._CONNACK)  # connected, not yet UP
    link.poll(vb.clock.ticks_ms())
    assert link._cmd_in is not None and v.last_counter < counter, "verified after a write"
    vb.tick()  # the next iteration: the gate's poll clears `spent`
    assert not gate.spent
    link.poll(vb.clock.ticks_ms())
    assert link._cmd_in is None and v.last_counter == counter


def test_the_settings_a_command_changes_wait_for_an_iteration_without_another_write(tmp_path):
    from wiring import new_gate

    class Open:
        closed = False

    gate = new_gate(Open())
    store = session_store.SettingsStore(str(tmp_path / "settings.json"), gate)
    gate.poll(0)
    gate.spend()  # the command's counter
    assert store.save({"limit_a": 10}) is True
    assert not os.path.exists(str(tmp_path / "settings.json")) and len(gate._due) == 1
    gate.poll(5)  # the next iteration: the settings, and nothing else after them
    assert gate.spent and len(gate._due) == 0 and store.load() == {"limit_a": 10}
    gate.poll(10)
    assert not gate.spent


def test_any_commit_through_durable_counts_as_this_iterations_write(tmp_path):
    """A session's start or end writes its journal and snapshot in the records step (not through
    the gate): a command received in that iteration would stack its counter write on them. Every
    commit through durable.py since the gate's poll sets `spent`."""
    from wiring import new_gate

    class Open:
        closed = False

    gate = new_gate(Open())
    gate.poll(0)
    assert not gate.spent
    durable.write_atomic(str(tmp_path / "session.json"), b"{}")
    assert gate.spent
    gate.poll(5)
    assert not gate.spent
