"""Review of issue 11 ("One house"): the records step moved out of the tick (session_record.py).
Each test names the fault it was written for."""
import time

import meter
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import charger_restore
import pilot
from session_record import _FINAL_READING_MAX_MS, _METER_SETTLE_MS
from wiring import new_records

TICKS_PERIOD = 1 << 30  # the ports' ticks_ms period (host_tests/shims/mp_time.py)


def reading(wh, t, w=0):
    return meter.Reading(wh, w, 230.0, None, t, epoch=0)


class Contactor:
    closed = False


class StepMeter:
    """A healthy meter: a new reading at each poll, the register as set."""

    def __init__(self):
        self.reading = None
        self.last_error = None
        self.epoch = 0
        self.wh = 1000

    def poll(self, now_ms):
        self.reading = reading(self.wh, now_ms)


# -- a record whose closing compares against a contactor opening from half a tick period ago ---

@settings(max_examples=60, deadline=None)
@given(uptime_ms=st.integers(0, 3 * TICKS_PERIOD), closed_once=st.booleans())
def test_a_stopped_record_closes_whatever_the_uptime(uptime_ms, closed_once):
    """A session stopped with the contactor open closes its record within _FINAL_READING_MAX_MS
    (at once with a fresh reading), at any uptime. `_opened_ms` is the last opening, or 0 at
    boot: compared by ticks_diff more than 2**29 ms (6.2 days) later it reads negative, and
    the record of a session that never drew (authorised, car in B, stopped remotely) stayed
    open until the next plug-in: no session/ended, and a scheduled availability change never
    taking effect."""
    charger = charger_restore.build(32000, 32000, True, False)
    contactor = Contactor()
    m = StepMeter()
    records = new_records(charger, contactor, m)
    t = 0
    records.poll(t)
    if closed_once:  # a session that charged and ended long ago: the last opening is old
        charger.step(t, pilot.C, True)
        records.poll(t)
        contactor.closed = True
        t += 1000
        records.poll(t)
        charger.step(t, pilot.A, True)
        contactor.closed = False
        t += 100
        records.poll(t)
        t += 100
        records.poll(t)
        assert records.record is None
    # the pile idles (the loop polls every period; only the clock matters here)
    step = max(1, uptime_ms // 64)
    while t < uptime_ms:
        t += step
        records.poll(t & (TICKS_PERIOD - 1))
    now = t & (TICKS_PERIOD - 1)
    charger.step(now, pilot.B, True)  # plugged in, free vend: authorised; the car never asks
    records.poll(now)
    record = records.record
    assert record is not None and record.meter_start_wh is not None
    stop = time.ticks_add(now, 1000)
    charger.remote_stop(stop)
    for dt in range(0, _FINAL_READING_MAX_MS + 2000, 100):
        records.poll(time.ticks_add(stop, dt))
        if record.ended_ms is not None:
            break
    assert record.ended_ms is not None, "the record never closed"
    assert record.meter_final  # the contactor never closed in this session: every reading is final
    assert records.record is None


def test_the_final_reading_still_waits_for_the_settle_after_an_opening():
    """The fix keeps the rule: a reading from before the opening (+ _METER_SETTLE_MS) is not final."""
    charger = charger_restore.build(32000, 32000, True, False)
    contactor = Contactor()
    m = StepMeter()
    records = new_records(charger, contactor, m)
    charger.step(0, pilot.C, True)
    records.poll(0)
    contactor.closed = True
    records.poll(10)
    record = records.record
    charger.remote_stop(2000)
    contactor.closed = False
    m.poll = lambda now_ms: None  # the meter falls silent at the opening
    records.poll(2000)
    assert record.ended_ms is None  # waiting for a reading after the opening
    m.reading = reading(1001, 2000 + _METER_SETTLE_MS - 1)
    records.poll(2100)
    assert record.ended_ms is None
    m.reading = reading(1002, 2000 + _METER_SETTLE_MS)
    records.poll(2200)
    assert record.ended_ms == 2200 and record.meter_final and record.meter_stop_wh == 1002


# -- boot.py's hand-over: the modules release selection loaded are the release's to import -----

def _firmware_imports(name, seen):
    """`name` and every firmware module its import loads: the imports run at import time (not
    those inside functions: release_boot.run_main's `import main` comes after the hand-over)."""
    import ast
    import os

    from pilehost import FIRMWARE

    path = os.path.join(FIRMWARE, name + ".py")
    if name in seen or not os.path.exists(path):
        return seen
    seen.add(name)
    with open(path) as f:
        tree = ast.parse(f.read())
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        todo.extend(ast.iter_child_nodes(node))
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        for mod in names:
            _firmware_imports(mod.split(".")[0], seen)
    return seen


def test_boot_drops_every_module_release_selection_loaded():
    """boot.py imports release_boot (and what it imports) from the root, then drops them from
    sys.modules so that a release imports its own copies. A module left behind is the root's
    for the release too: session_store imports durable (split out by issue 11), and a release
    with another durable.py would run the factory's."""
    import ast
    import os

    from pilehost import FIRMWARE

    loaded = _firmware_imports("release_boot", set())
    assert {"release_boot", "session_store", "durable"} <= loaded
    with open(os.path.join(FIRMWARE, "boot.py")) as f:
        tree = ast.parse(f.read())
    dropped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.For) and isinstance(node.iter, ast.Tuple):
            dropped |= {e.value for e in node.iter.elts if isinstance(e, ast.Constant)}
    assert loaded - dropped == set()


def test_no_firmware_module_but_files_py_spells_a_flash_file():
    """Issue 11: flash file names are spelled in files.py only. The layout test looks only for
    the names files.py already has, so a module that brings its own (ota.py's job file,
    release_boot.py's state file) passed it. boot.py reads board.json before any module loads;
    release_boot.py, which boot.py imports before the release is chosen, keeps its own name: what
    it imports stays the root's for the release (see the test below)."""
    import ast
    import glob
    import os

    from pilehost import FIRMWARE

    spelled = {}
    for path in sorted(glob.glob(os.path.join(FIRMWARE, "*.py"))):
        name = os.path.basename(path)[:-3]
        if name in ("files", "boot", "release_boot"):
            continue
        with open(path) as f:
            tree = ast.parse(f.read())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body
                      and isinstance(node.body[0], ast.Expr)}
        found = sorted(node.value for node in ast.walk(tree)
                       if isinstance(node, ast.Constant) and isinstance(node.value, str)
                       and id(node) not in docstrings and node.value.endswith((".json", ".jrnl")))
        if found:
            spelled[name] = found
    assert spelled == {}


# -- the tick's gate is read one step late: does that ever let the contactor close? ------------

ACTIONS = st.sampled_from([("plug", None), ("request", None), ("stop_request", None),
                           ("unplug", None), ("meter_fault", "silent"), ("meter_fault", None)])


@settings(max_examples=25, deadline=None)
@given(events=st.lists(st.tuples(st.integers(50, 3000), ACTIONS), min_size=1, max_size=10),
       silent_at_boot=st.booleans())
def test_the_contactor_is_closed_only_on_a_known_meter_start(events, silent_at_boot):
    """`Records.ready` is the records step's state from the last iteration: in the tick a
    session begins it still speaks of the last one (or of none: ready). Whatever the car and
    the meter do, after every loop iteration a closed contactor has the charger's session's
    own record, open, with its meter start; and no iteration that began a session ends with
    the contactor closed (the stale gate never decides alone)."""
    from pilehost.virtual_board import VirtualBoard

    steps, t = [(0, "meter_fault", "silent")] if silent_at_boot else [], 0
    for gap, (action, arg) in events:
        t += gap
        steps.append((t, action, arg) if arg is not None else (t, action))
    with pytest.MonkeyPatch.context() as monkeypatch:
        vb = VirtualBoard(monkeypatch, steps, config={"pile_id": "p-r", "meter": {"type": "ddsu666"}})
        _check_every_iteration(vb, t + 4000)


def _check_every_iteration(vb, end_ms):
    ctl = vb.ctl
    records = ctl.records
    closed = 0
    while vb.world.advance() < end_ms * 1000:
        before = ctl.charger.session
        vb.tick()
        if not ctl.contactor.closed:
            continue
        closed += 1
        session = ctl.charger.session
        assert session is before, "closed in the iteration its session began"
        record = records.record
        assert record is not None and record.session is session and record.ended_ms is None
        assert record.meter_start_wh is not None and record.authorized
        assert records.log.failed is None
    return closed


def test_the_invariant_check_sees_a_charging_session(monkeypatch):
    """The property above is not vacuous: plugged and asking, the contactor closes, once the
    meter that was silent at the plug-in has given the start (without the gate: at once)."""
    from pilehost.virtual_board import VirtualBoard

    vb = VirtualBoard(monkeypatch, [(0, "meter_fault", "silent"), (100, "plug"), (600, "request"),
                                    (3000, "meter_fault", None), (8000, "unplug"), (8300, "plug"),
                                    (8400, "request")],
                      config={"pile_id": "p-r", "meter": {"type": "ddsu666"}})
    assert _check_every_iteration(vb, 12000) > 1000
