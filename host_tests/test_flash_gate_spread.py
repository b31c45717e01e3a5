"""The writes deferred while the contactor is closed, once it opens (firmware/flash_gate.py): one
an iteration, none in the iteration that opened it, so that a worst-case flash part cannot stack
them past the watchdog (2 s, config wdt_timeout_ms).

On a worst-case SPI NOR part (W25Q32JV: tSE 400 ms max) a file written into a fresh block erases
it and may compact a metadata block too (800 ms), a rename or a remove may compact one (400 ms).
The four writers a session defers (checkpoint, command counter, journal ack, settings) all in
one iteration came to ~3.6 s of such stalls.
"""
import hashlib
import hmac
import json

from hypothesis import given, settings
from hypothesis import strategies as st
from pilehost.virtual_board import VirtualBoard

import command_auth
from wiring import new_gate

SECRET = bytes(range(32))
WATCHDOG_MS = 2000  # config.py's wdt_timeout_ms default


class Contactor:
    closed = False


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(("defer", "close", "open", "poll", "poll", "poll")), max_size=60))
def test_one_deferred_write_an_iteration_none_while_closed_nor_in_the_opening_iteration(ops):
    contactor = Contactor()
    gate = new_gate(contactor)
    ran = []  # (poll number, what)
    deferred = []
    steps = []
    gate.every_open_step(lambda now: steps.append(now))
    n = 0
    closed_before = False  # the contactor at the previous poll
    for op in ops:
        if op == "defer":
            name = len(deferred)
            deferred.append(name)
            gate.defer(lambda now, name=name: ran.append((now, name)))
        elif op == "close":
            contactor.closed = True
        elif op == "open":
            contactor.closed = False
        else:
            n += 1
            before = len(ran)
            steps_before = len(steps)
            gate.poll(n)
            wrote = len(ran) - before
            assert wrote <= 1, "two deferred writes in one iteration"
            if contactor.closed or closed_before:
                assert wrote == 0 and len(steps) == steps_before  # closed, or the opening iteration
            if wrote:
                assert len(steps) == steps_before  # the open steps wait for the deferred ones
            closed_before = contactor.closed
    assert [name for _, name in ran] == deferred[:len(ran)]  # in the order deferred
    assert len(gate._due) == len(deferred) - len(ran)


# -- the wired firmware on a worst-case flash part -----------------------------------------------

def signed(name, args, counter):
    body = json.dumps({"v": 1, "id": "c%d" % counter, "cmd": name, "counter": counter, "args": args})
    return json.dumps({"body": body, "sig": hmac.new(SECRET, body.encode(), hashlib.sha256)
                       .hexdigest()}).encode()


def test_the_writes_deferred_by_a_session_never_stack_past_the_watchdog(monkeypatch, slow_flash):
    import session_log  # noqa: F401 - every writer imported before its `open` is wrapped
    import session_store

    config = {"free_vend": True, "pile_id": "spread-1", "checkpoint_s": 10,
              "meter": {"type": "ddsu666", "failure_timeout_s": 5},
              "mqtt": {"host": "127.0.0.1", "secret": SECRET.hex()}}
    vb = VirtualBoard(monkeypatch, config=config, period_ms=5)
    vb.world.energy_wh = 1234500
    link = vb.build_link()
    w = vb.world

    w.do("plug", 220)
    w.do("request")
    vb.run_for(4000)
    ctl = vb.ctl
    assert ctl.contactor.closed
    gate = ctl.records.gate
    v = link._verifier
    # All four writers defer while closed: the command counter (past half of its reservation),
    # the settings (a new limit), the journal's ack (the cloud acked the started record), the
    # checkpoint (due every 10 s).
    counter = v.reserved - command_auth.RESERVE // 2 + 1000
    link._commands.received(link, vb.clock.ticks_ms(), signed("set_current_limit", {"amps": 10}, counter))
    assert json.loads(link._acks[-1])["result"] == "accepted", link._acks[-1]
    outbox = ctl.records.log.outbox
    outbox.ack(outbox._next_seq - 1)
    vb.run_for(12000)
    assert ctl.contactor.closed
    assert len(gate._due) == 3, len(gate._due)  # the counter, the settings, the journal's ack
    log = slow_flash(vb)
    w.do("stop_request")
    worst = []  # (virtual ms an iteration took, its stalls)
    for _ in range(800):  # 4 s of iterations
        start = vb.clock.t
        first = len(log)
        w.advance()
        vb.tick()
        spent_ms = (vb.clock.t - start) / 1000 - vb.period_ms
        worst.append((spent_ms, [what for _, what in log[first:]]))
    assert not ctl.contactor.closed and len(gate._due) == 0
    slowest = max(worst, key=lambda x: x[0])
    assert slowest[0] < WATCHDOG_MS, "an iteration took %.0f ms of flash stalls: %s" % slowest
    # All of it on flash in the end.
    assert session_store.CounterStore("cmd_counter.json").load() >= counter
    assert session_store.SettingsStore("settings.json").load()["limit_ma"] == 10000


def test_the_console_queue_is_the_console_step_s_not_the_gate_s(monkeypatch, capsys):
    """One concern, one home: the flash gate writes files; the console's queue is drained by
    console.step (main.py's loop), within the UART's FIFO while the contactor is closed."""
    import console

    contactor = Contactor()
    gate = new_gate(contactor)
    monkeypatch.setattr(console, "hold", gate)
    monkeypatch.setattr(console, "_queue", [])
    monkeypatch.setattr(console, "_queued", 0)
    monkeypatch.setattr(console, "_head", 0)
    monkeypatch.setattr(console, "_fifo", 0)
    monkeypatch.setattr(console, "lines_dropped", 0)
    contactor.closed = True
    capsys.readouterr()
    for i in range(4):
        console._write("line %d %s\n" % (i, "z" * 60))
    gate.poll(1000)
    assert capsys.readouterr().out == ""  # the gate leaves the console alone
    console.step(1000)
    first = capsys.readouterr().out
    assert 0 < len(first) <= console._UART_FIFO and first.startswith("line 0")
    contactor.closed = False
    gate.poll(1005)
    assert capsys.readouterr().out == ""
    console.step(1005)
    assert capsys.readouterr().out.endswith("line 3 %s\n" % ("z" * 60))
    assert console._queue == []
