"""journal.py: order, acks, reopen, power cut at every byte, damage, compaction, full policy.

Also runs upy_storage_selftest.py on the MicroPython unix port and cross-compiles the storage
and command modules for the ESP32.
"""
import json
import os
import shutil
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import journal as J

import journal_scan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNDROPPABLE = (J.KIND_SESSION_END, J.KIND_FAULT, J.KIND_SESSION_START)  # tiers 1..3: reported
STATE_REC, RESERVE = 90, 448  # journal.py _STATE_REC, _MARKER_RESERVE


def capacity(max_bytes, payload):
    """How many records of `payload` bytes fit before the first is dropped."""
    return (max_bytes - STATE_REC - RESERVE) // (14 + payload)


def jopen(path, **kw):
    kw.setdefault("max_bytes", 8192)
    kw.setdefault("max_payload", 256)
    return journal_scan.load(str(path), **kw)


def pending(j):
    return list(j.pending())


def markers(j):
    return [json.loads(p) for _, k, p in j.pending() if k == J.KIND_JOURNAL_FAULT]


def lost_reported(j):
    """Records dropped from the tiers above 0, the ones a journal_fault record reports (the
    firmware reads j.dropped(kind) alone: these are the undroppable kinds, tiers 1..3)."""
    return sum(j.dropped(k) for k in UNDROPPABLE)


def rewrite(j):
    """The journal's rewrite now, as the firmware makes one: _load's, when a scan cut a torn end
    off (an append that does not fit makes one too, with the new record's room)."""
    j._rewrite(0, 0)


def size(path):
    return os.path.getsize(str(path)) if os.path.exists(str(path)) else 0


# ----------------------------------------------------------------------------- basics

def test_append_ack_pending_in_order(tmp_path):
    j = jopen(tmp_path / "j")
    seqs = [j.append(J.KIND_SESSION_START, b"s1"), j.append(J.KIND_METER, b"m1"),
            j.append(J.KIND_SESSION_END, b"e1"), j.append(J.KIND_FAULT, b"")]
    assert seqs == [1, 2, 3, 4]
    assert pending(j) == [(1, J.KIND_SESSION_START, b"s1"), (2, J.KIND_METER, b"m1"),
                          (3, J.KIND_SESSION_END, b"e1"), (4, J.KIND_FAULT, b"")]
    assert j.backlog() == (4, 4 * 14 + 6)
    j.ack(2)
    assert [s for s, _, _ in j.pending()] == [3, 4]
    assert j.backlog() == (2, 2 * 14 + 2)
    j.ack(1)  # older than the watermark: nothing changes
    assert j.acked == 2
    j.ack(4)
    assert pending(j) == [] and j.backlog() == (0, 0)


def test_reopen_replays_unacknowledged_in_order(tmp_path):
    path = tmp_path / "j"
    j = jopen(path)
    for i in range(10):
        j.append(J.KIND_SESSION_END if i % 3 == 0 else J.KIND_METER, b"rec%d" % i)
    j.ack(4)
    before = pending(j)
    j2 = jopen(path)
    assert pending(j2) == before
    assert j2.acked == 4 and j2.next_seq == 11
    assert j2.append(J.KIND_FAULT, b"f") == 11
    assert pending(jopen(path))[-1] == (11, J.KIND_FAULT, b"f")


def test_seq_monotonic_across_reopen_even_when_everything_was_acked(tmp_path):
    path = tmp_path / "j"
    j = jopen(path)
    for _ in range(5):
        j.append(J.KIND_SESSION_END, b"x")
    j.ack(5)
    rewrite(j)  # nothing live left: the state record keeps next_seq
    assert size(path) == 90
    j = jopen(path)
    assert j.next_seq == 6 and pending(j) == []
    assert j.append(J.KIND_SESSION_END, b"y") == 6
    j.ack(6)
    # Journal file lost altogether: the ack watermark still keeps seqs from going back.
    os.remove(str(path))
    assert jopen(path).append(J.KIND_SESSION_END, b"z") == 7


def test_pending_follows_appends_acks_and_rewrites_between_steps(tmp_path):
    j = jopen(tmp_path / "j", max_bytes=4096, max_payload=128)
    for i in range(5):
        j.append(J.KIND_SESSION_END, b"a%d" % i)
    it = j.pending()
    assert next(it)[0] == 1
    j.ack(2)
    j.append(J.KIND_SESSION_END, b"new")
    rewrite(j)
    assert [s for s, _, _ in it] == [3, 4, 5, 6]


def test_bad_arguments(tmp_path):
    j = jopen(tmp_path / "j")
    with pytest.raises(ValueError):
        j.append(0, b"")
    with pytest.raises(ValueError):
        j.append(15, b"")
    with pytest.raises(ValueError):
        j.append(J.KIND_JOURNAL_FAULT, b"")
    with pytest.raises(ValueError):
        j.append(J.KIND_METER, b"x" * 257)
    with pytest.raises(TypeError):
        j.append(J.KIND_METER, "text")
    with pytest.raises(ValueError):
        j.ack(1)  # nothing appended yet
    with pytest.raises(ValueError):
        jopen(tmp_path / "k", max_bytes=1000)
    with pytest.raises(ValueError):
        jopen(tmp_path / "k", tiers=((J.KIND_SESSION_END,), ()))  # never silently
    with pytest.raises(ValueError):
        jopen(tmp_path / "k", tiers=((J.KIND_METER,),))  # where would a session end go?


# ----------------------------------------------------------------------------- power cuts

def _history(path):
    """A file with a compacted base (live record + state) and then appends and acks, without
    any rewrite. Returns (file bytes, records [(end offset, seq, kind, payload)],
    acks [(file length at the time, .ack bytes)])."""
    j = jopen(path)
    ack_path = str(path) + ".ack"
    a = j.append(J.KIND_SESSION_START, b"start-1")
    j.append(J.KIND_METER, b"meter-1")
    j.ack(a)
    rewrite(j)
    records = [(14 + 7, 2, J.KIND_METER, b"meter-1")]
    acks = [(0, open(ack_path, "rb").read())]
    steps = [("a", J.KIND_SESSION_END, b'{"session":"S1","wh":1234}'), ("k", 2),
             ("a", J.KIND_FAULT, b'{"fault":"welded"}'), ("a", J.KIND_METER, b"m" * 40),
             ("k", 4), ("a", J.KIND_SESSION_START, b""), ("a", J.KIND_STATUS, b"idle"),
             ("k", 5), ("a", J.KIND_SESSION_END, b'{"session":"S2","wh":99}')]
    for step in steps:
        if step[0] == "a":
            seq = j.append(step[1], step[2])
            records.append((size(path), seq, step[1], step[2]))
        else:
            j.ack(step[1])
            acks.append((size(path), open(ack_path, "rb").read()))
    assert j.next_seq == 9
    return open(str(path), "rb").read(), records, acks


def test_power_cut_at_every_byte_offset(tmp_path):
    data, records, acks = _history(tmp_path / "orig")
    assert len(data) > 300
    ends = [0, 21 + 90] + [r[0] for r in records]  # the state record ends at 111
    for cut in range(len(data) + 1):
        d = tmp_path / ("cut%d" % cut)
        d.mkdir()
        path = d / "j"
        path.write_bytes(data[:cut])
        ack_bytes = [b for at, b in acks if at <= cut][-1]
        (d / "j.ack").write_bytes(ack_bytes)
        acked = int.from_bytes(ack_bytes[:4], "little")
        complete = [r[1:] for r in records if r[0] <= cut]
        expect = [r for r in complete if r[0] > acked]

        j = jopen(path)
        got = pending(j)
        assert got == expect, cut
        assert j.discarded_bytes == cut - max(e for e in ends if e <= cut)
        assert markers(j) == []  # a torn tail is no corruption: nothing reported
        seq = j.append(J.KIND_SESSION_END, b"after")
        assert seq > max([acked] + [r[0] for r in complete]), cut
        assert pending(jopen(path)) == expect + [(seq, J.KIND_SESSION_END, b"after")], cut
        shutil.rmtree(str(d))


def test_power_cut_during_rewrite_keeps_the_old_file(tmp_path):
    path = tmp_path / "j"
    j = jopen(path)
    for i in range(6):
        j.append(J.KIND_SESSION_END, b"rec%d" % i)
    j.ack(2)
    before = pending(j)
    old = path.read_bytes()
    rewrite(j)
    new = path.read_bytes()
    for cut in range(0, len(new) + 1, 7):
        path.write_bytes(old)
        (tmp_path / "j.tmp").write_bytes(new[:cut])  # the rename never happened
        j = jopen(path)
        assert pending(j) == before
        assert not os.path.exists(str(tmp_path / "j.tmp"))


@pytest.mark.parametrize("ack_bytes", [b"", b"\x05\x00", b"\x05\x00\x00\x00\x00\x00\x00\x00"])
def test_torn_or_garbled_ack_file_replays_instead_of_losing(tmp_path, ack_bytes):
    path = tmp_path / "j"
    j = jopen(path)
    for i in range(6):
        j.append(J.KIND_SESSION_END, b"rec%d" % i)
    j.ack(5)
    (tmp_path / "j.ack").write_bytes(ack_bytes)
    (tmp_path / "j.ack.tmp").write_bytes(b"\x06\x00")
    j = jopen(path)
    assert [s for s, _, _ in j.pending()] == [1, 2, 3, 4, 5, 6]  # sent again, not lost
    assert not os.path.exists(str(tmp_path / "j.ack.tmp"))


# ----------------------------------------------------------------------------- damage

def test_flipped_bytes_never_yield_a_damaged_record(tmp_path):
    data, records, _ = _history(tmp_path / "orig")
    originals = {r[1:] for r in records}
    path = tmp_path / "j"
    for off in range(len(data)):
        for flip in (0x01, 0x80, 0xFF):
            damaged = bytearray(data)
            damaged[off] ^= flip
            path.write_bytes(bytes(damaged))
            for p in (tmp_path / "j.ack", tmp_path / "j.tmp"):
                if p.exists():
                    p.unlink()
            j = jopen(path)
            got = pending(j)
            seqs = [s for s, _, _ in got]
            assert seqs == sorted(set(seqs)), off
            for rec in got:
                if rec[1] != J.KIND_JOURNAL_FAULT:
                    assert rec in originals, (off, rec)
            assert size(path) <= 8192


def test_damage_in_the_middle_is_reported(tmp_path):
    path = tmp_path / "j"
    j = jopen(path)
    for i in range(8):
        j.append(J.KIND_SESSION_END, b"session-%d" % i)
    data = bytearray(path.read_bytes())
    data[90 + 23 + 10 + 2] ^= 0x10  # after the state record: the second record's payload
    path.write_bytes(bytes(data))
    j = jopen(path)
    got = pending(j)
    assert got[0] == (1, J.KIND_SESSION_END, b"session-0")
    (m,) = markers(j)
    assert m["fault"] == "journal_corrupt" and m["corrupt_bytes"] == 7 * 23
    assert got[-1][0] == 9  # the report is new: after every seq seen
    j = jopen(path)  # reported once, and the counter survives
    assert len(markers(j)) == 1
    assert j.append(J.KIND_SESSION_END, b"next") == 10
    j.ack(10)
    j = jopen(path)
    while not markers(j):  # full: the overflow's report carries the corruption's total too
        j.append(J.KIND_SESSION_END, b"x" * 256)
    (m,) = markers(j)
    assert m["fault"] == "journal_overflow" and m["corrupt_bytes"] == 161


def test_failed_write_is_repaired_before_the_next_one(tmp_path, monkeypatch, request):
    path = tmp_path / "j"
    j = jopen(path)
    j.append(J.KIND_SESSION_END, b"first")
    request.getfixturevalue("torn_appends")  # from here on, appends tear
    with pytest.raises(OSError):
        j.append(J.KIND_SESSION_END, b"second")
    monkeypatch.undo()
    assert size(path) == 90 + 14 + 5 + 3  # state, first, a torn record
    assert j.append(J.KIND_SESSION_END, b"third") == 2
    assert pending(jopen(path)) == [(1, J.KIND_SESSION_END, b"first"),
                                    (2, J.KIND_SESSION_END, b"third")]


def test_damage_after_the_scan_stops_the_rewrite_then_is_reported(tmp_path):
    path = tmp_path / "j"
    j = jopen(path)
    for i in range(6):
        j.append(J.KIND_SESSION_END, b"session-%d" % i)
    good = path.read_bytes()
    data = bytearray(good)
    data[90 + 23 + 12] ^= 0x01  # the second record goes bad while the journal is open
    path.write_bytes(bytes(data))
    with pytest.raises(OSError):
        rewrite(j)  # not while the bad record is in the way: nothing is rewritten
    assert path.read_bytes() == bytes(data)
    assert j.append(J.KIND_FAULT, b"f") == 8  # rescans first: good records kept, the damage reported
    assert [k for _, k, _ in j.pending()] == [J.KIND_SESSION_END, J.KIND_JOURNAL_FAULT, J.KIND_FAULT]
    assert markers(j)[0]["fault"] == "journal_corrupt" and markers(j)[0]["corrupt_bytes"] == 5 * 23
    path.write_bytes(good)
    j = jopen(path)
    path.write_bytes(good[:90 + 23] + bytes(len(good) - 90 - 23))  # zeroed while open
    assert [s for s, _, _ in j.pending()] == [1]  # stops at the damage, never yields it
    assert j.append(J.KIND_FAULT, b"f") > 6  # rescanned first


def test_unreadable_journal_is_not_taken_for_an_empty_one(tmp_path):
    (tmp_path / "j").mkdir()  # open() fails with EISDIR, not ENOENT
    with pytest.raises(OSError):
        jopen(tmp_path / "j")


# ----------------------------------------------------------------------------- full policy

def test_rewrite_keeps_order_and_seq_and_bounds_the_file(tmp_path):
    path = tmp_path / "j"
    j = jopen(path, max_bytes=4096, max_payload=128)
    model = []
    for i in range(400):
        payload = (b"%d-" % i) * (i % 13)
        seq = j.append(J.KIND_SESSION_END, payload)
        model.append((seq, J.KIND_SESSION_END, payload))
        if i % 3 == 2:  # the link falls behind, then catches up
            j.ack(model[-2][0])
        assert size(path) <= 4096
    assert [m[0] for m in model] == list(range(1, 401))
    live = [m for m in model if m[0] > j.acked]
    assert pending(j) == live
    assert pending(jopen(path, max_bytes=4096, max_payload=128)) == live
    assert [j.dropped(k) for k in range(1, 15)] == [0] * 14


def test_droppable_kinds_go_oldest_first(tmp_path):
    path = tmp_path / "j"
    j = jopen(path, max_bytes=4096, max_payload=128)
    ends = [j.append(J.KIND_SESSION_END, b"end%d" % i) for i in range(5)]
    meters = [j.append(J.KIND_METER, b"%06d" % i + b"m" * 90) for i in range(200)]
    assert size(path) <= 4096
    got = pending(j)
    assert [s for s, k, _ in got if k == J.KIND_SESSION_END] == ends
    kept = [s for s, k, _ in got if k == J.KIND_METER]
    assert kept == meters[-len(kept):]  # the newest survive
    assert j.dropped(J.KIND_METER) == 200 - len(kept) > 0
    assert lost_reported(j) == 0 and markers(j) == []
    assert jopen(path, max_bytes=4096, max_payload=128).dropped(J.KIND_METER) == \
        j.dropped(J.KIND_METER)


def test_full_of_reported_tiers_refuses_tier_0_without_rewriting(tmp_path):
    path = tmp_path / "j"
    j = jopen(path, max_bytes=4096, max_payload=128)
    n = capacity(4096, 128)
    for _ in range(n):
        j.append(J.KIND_SESSION_END, b"e" * 128)
    rewrites = []
    real = j._rewrite
    j._rewrite = lambda kind, length: rewrites.append(kind) or real(kind, length)
    for _ in range(50):
        assert j.append(J.KIND_METER, b"m" * 100) is None
    assert j.dropped(J.KIND_METER) == 50
    assert rewrites == [J.KIND_METER]  # one rewrite found it full; no rewrite per record
    assert [k for _, k, _ in j.pending()] == [J.KIND_SESSION_END] * n
    assert lost_reported(j) == 0 and markers(j) == [] and size(path) <= 4096
    j.ack(3)  # room again
    assert j.append(J.KIND_METER, b"m") == n + 1
    # Refusals without a rewrite are counted in RAM and stored by the next rewrite.
    rewrite(j)
    assert jopen(path, max_bytes=4096, max_payload=128).dropped(J.KIND_METER) == 50


def test_tiers_go_in_order_meter_fault_start_end(tmp_path):
    path = tmp_path / "j"
    j = jopen(path, max_bytes=4096, max_payload=128)
    kinds = [J.KIND_SESSION_END, J.KIND_SESSION_START, J.KIND_FAULT, J.KIND_METER] * 6
    for i, kind in enumerate(kinds[:capacity(4096, 128)]):
        j.append(kind, bytes([kind, i]) * 64)

    def left(kind):
        return [s for s, k, _ in j.pending() if k == kind]

    counts = []
    for i in range(40):
        j.append(J.KIND_SESSION_END, b"new-%03d" % i + b" " * 121)
        counts.append(tuple(len(left(k)) for k in (J.KIND_METER, J.KIND_FAULT,
                                                   J.KIND_SESSION_START)))
        assert size(path) <= 4096
    # Each tier is empty before the next one loses anything.
    for m, f, st_ in counts:
        assert (m == 0 or (f, st_) == (6, 6)) and (f == 0 or st_ == 6)
    assert counts[-1] == (0, 0, 0)
    assert j.dropped(J.KIND_METER) == 6 and j.dropped(J.KIND_FAULT) == 6
    assert j.dropped(J.KIND_SESSION_START) == 6 and j.dropped(J.KIND_SESSION_END) > 0
    assert markers(j)[0]["dropped"] == {"session_end": j.dropped(J.KIND_SESSION_END),
                                        "fault": 6, "session_start": 6, "meter": 6}
    # A fault never pushes out a session end: it is dropped itself, and reported.
    before = left(J.KIND_SESSION_END)
    assert j.append(J.KIND_FAULT, b"late fault") is None
    assert left(J.KIND_SESSION_END) == before
    assert markers(j)[0]["dropped"]["fault"] == 7 == j.dropped(J.KIND_FAULT)


def test_session_end_is_never_dropped_silently(tmp_path):
    path = tmp_path / "j"
    j = jopen(path, max_bytes=4096, max_payload=128)
    appended = []
    for i in range(120):
        payload = b'{"session":"S%03d"}' % i + b" " * 80
        appended.append(j.append(J.KIND_SESSION_END, payload))
        assert size(path) <= 4096
    got = pending(j)
    ends = [s for s, k, _ in got if k == J.KIND_SESSION_END]
    assert ends == appended[-len(ends):]  # the oldest went
    lost = 120 - len(ends)
    assert lost > 0 and j.dropped(J.KIND_SESSION_END) == lost == lost_reported(j)
    (m,) = markers(j)  # exactly one report, superseded each time, with the total
    assert m == {"fault": "journal_overflow", "corrupt_bytes": 0,
                 "dropped": {"session_end": lost}}
    j2 = jopen(path, max_bytes=4096, max_payload=128)
    assert markers(j2) == [m] and j2.dropped(J.KIND_SESSION_END) == lost
    # The report is published and acknowledged like any record (it comes after the records
    # kept); the next overflow reports the new total.
    j2.ack(max(s for s, k, _ in j2.pending() if k == J.KIND_JOURNAL_FAULT))
    assert markers(j2) == []
    for _ in range(40):
        j2.append(J.KIND_SESSION_END, b"x" * 128)
    assert j2.dropped(J.KIND_SESSION_END) > lost
    assert markers(j2)[0]["dropped"]["session_end"] == j2.dropped(J.KIND_SESSION_END)


_KINDS = st.sampled_from([J.KIND_SESSION_END, J.KIND_FAULT, J.KIND_SESSION_START,
                          J.KIND_METER, J.KIND_STATUS])
_OPS = st.lists(st.one_of(
    st.tuples(st.just("append"), _KINDS, st.integers(0, 64), st.integers(1, 25)),  # n records
    st.tuples(st.just("ack"), st.integers(0, 5)),
    st.tuples(st.just("reopen")),
    st.tuples(st.just("rewrite")),
), min_size=1, max_size=30)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_OPS)
def test_random_operations_keep_the_invariants(tmp_path_factory, ops):
    path = tmp_path_factory.mktemp("j") / "j"
    kw = {"max_bytes": 900, "max_payload": 64}  # the smallest allowed: ~10 records
    j = jopen(path, **kw)
    model = {}  # seq -> (kind, payload)
    reported = set()  # undroppable totals carried by acknowledged journal_fault records
    last_seq = 0
    for op in ops:
        if op[0] == "append":
            for i in range(op[3]):
                payload = bytes([op[1], i]) * (op[2] // 2)
                seq = j.append(op[1], payload)
                if seq is not None:
                    assert seq > last_seq
                    last_seq = seq
                    model[seq] = (op[1], payload)
        elif op[0] == "ack":
            live = [s for s, _, _ in j.pending()]
            if live:
                upto = live[min(op[1], len(live) - 1)]
                for s, k, p in j.pending():
                    if k == J.KIND_JOURNAL_FAULT and s <= upto:
                        reported.add(tuple(sorted(json.loads(p)["dropped"].items())))
                j.ack(upto)
        elif op[0] == "reopen":
            before = (pending(j), j.next_seq, j.acked, lost_reported(j))
            j = jopen(path, **kw)
            assert (pending(j), j.next_seq, j.acked, lost_reported(j)) == before
        else:
            rewrite(j)
        assert size(path) <= kw["max_bytes"]
        got = pending(j)
        seqs = [s for s, _, _ in got]
        assert seqs == sorted(set(seqs)) and all(s > j.acked for s in seqs)
        for s, k, p in got:
            if k != J.KIND_JOURNAL_FAULT:
                assert model[s] == (k, p)
        # Every undroppable record is pending, acknowledged, or counted as dropped...
        for kind in UNDROPPABLE:
            missing = sum(1 for s, (k, _) in model.items()
                          if k == kind and s > j.acked and (s, k, model[s][1]) not in got)
            assert missing <= j.dropped(kind)
        # ...and the drop is in a journal_fault record, pending or acknowledged.
        if lost_reported(j):
            now = tuple(sorted((J.kind_name(k), j.dropped(k)) for k in UNDROPPABLE
                               if j.dropped(k)))
            carried = [tuple(sorted((n, c) for n, c in m["dropped"].items()
                                    if n in ("session_end", "fault", "session_start")))
                       for m in markers(j)]
            carried += [tuple((n, c) for n, c in r if n in ("session_end", "fault",
                                                            "session_start")) for r in reported]
            assert now in carried


# ----------------------------------------------------------------------------- MicroPython

def _tool(name):
    for path in (shutil.which(name), os.path.join(ROOT, ".venv", "bin", name)):
        if path and os.path.exists(path):
            return path
    return None


STORAGE_MODULES = ("durable", "journal", "journal_scan", "session_store", "command_auth")


def test_storage_selftest_on_micropython_unix_port(tmp_path):
    """In a temp copy whose firmware/ holds the modules as bytecode (.mpy, as on a board and
    as `make sim` loads them): the 64 KiB heap is for running, not for compiling."""
    exe, cross = _tool("micropython"), _tool("mpy-cross")
    if exe is None or cross is None:
        pytest.skip("micropython unix port or mpy-cross not found")
    (tmp_path / "firmware").mkdir()
    (tmp_path / "host_tests").mkdir()
    for name in STORAGE_MODULES:
        subprocess.run([cross, "-o", str(tmp_path / "firmware" / (name + ".mpy")),
                        os.path.join(ROOT, "firmware", name + ".py")], check=True, timeout=60)
    shutil.copy(os.path.join(ROOT, "host_tests", "upy_storage_selftest.py"),
                str(tmp_path / "host_tests"))
    env = dict(os.environ, MICROPYPATH="firmware:.frozen")
    proc = subprocess.run([exe, "-X", "heapsize=64k", "host_tests/upy_storage_selftest.py",
                           str(tmp_path / "work")], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "upy storage selftest ok" in proc.stdout


@pytest.mark.parametrize("name", [m + ".py" for m in STORAGE_MODULES])
def test_compiles_for_esp32(tmp_path, name):
    exe = _tool("mpy-cross")
    if exe is None:
        pytest.skip("mpy-cross not found")
    proc = subprocess.run([exe, "-march=xtensawin", "-o", str(tmp_path / "x.mpy"),
                           os.path.join(ROOT, "firmware", name)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_largest_journal_fault_record_fits_its_reserve(tmp_path):
    j = jopen(tmp_path / "j")
    payload = j._marker_payload([0xFFFFFFFF] * 16, 0xFFFFFFFF)
    assert 14 + len(payload) <= RESERVE
    json.loads(payload)
