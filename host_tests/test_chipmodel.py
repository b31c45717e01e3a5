"""The chip-time model (pilehost/chipmodel.py): its arithmetic against the data sheet and the
rules it states, and, where valgrind and the chip build are at hand, that a run under callgrind
is cut where it says and counts the same every time (figures: `make bench WHAT=chip`)."""

import pytest

from pilehost import chipmodel

CAL = chipmodel.Calibration(50000)


def item(**kw):
    base = {"kind": "loop", "t": 0, "ir": 0, "bursts": 1, "console": 0, "flash": [], "meta": [], "net": [],
            "lines": [], "coil": False, "car": "A", "meter_rx": 0}
    base.update(kw)
    return base


def test_a_small_file_is_inlined_a_larger_one_erases_a_sector():
    small = item(flash=[["cmd_counter.json.tmp", "wb", 13, 0]], meta=[["rename", "cmd_counter.json"]])
    assert chipmodel.flash_ops(small) == (0, 3, 2)  # data + commit in metadata, the rename's commit
    big = item(flash=[["outbox.jrnl.tmp", "wb", 600, 0]])
    assert chipmodel.flash_ops(big) == (1, 1 + 3, 1)


def test_an_append_copies_the_last_block_into_a_newly_erased_one():
    # a 313-byte journal gets a 600-byte record: 913 bytes go into a fresh block
    e, p, c = chipmodel.flash_ops(item(flash=[["outbox.jrnl", "ab", 600, 313]]))
    assert (e, p, c) == (1, 1 + 4, 1)
    # crossing a block boundary erases two
    e, _, _ = chipmodel.flash_ops(item(flash=[["outbox.jrnl", "ab", 600, 4096 + 3800]]))
    assert e == 2


def test_flash_times_are_the_data_sheets():
    c = chipmodel.costs(item(flash=[["outbox.jrnl", "ab", 600, 313]]), CAL)
    assert c["flash"] == (1 * 45.0 + 5 * 0.4, 2 * 400.0 + 5 * 3.0)  # worst: a metadata compaction too


def test_console_blocks_past_the_fifo_at_115200_baud():
    assert chipmodel.costs(item(console=128), CAL)["console"] == 0
    # the figure: a 577-byte record line (579 with CR LF) is ~40 ms
    assert 39 < chipmodel.costs(item(console=579), CAL)["console"] < 40


def test_flash_writes_and_console_bytes_while_closed_are_counted():
    """Issue 12 item 2: no flash write, no console burst with the contactor closed (counts)."""
    run = [item(coil=False, flash=[["session.json.tmp", "wb", 90, 0]], meta=[["rename", "session.json"]],
                console=600),  # open: free
           item(coil=True, console=48), item(coil=True, console=40)]
    assert chipmodel.closed_io(run) == {"flash_writes": 0, "console_bytes": 88, "console_most": 48,
                                        "console_over_fifo": 0}
    run.append(item(coil=True, flash=[["cmd_counter.json.tmp", "wb", 13, 0]],
                    meta=[["rename", "cmd_counter.json"]], console=579))
    c = chipmodel.closed_io(run)
    assert c["flash_writes"] == 2 and c["console_over_fifo"] == 1 and c["console_most"] == 579
    assert "2 flash write(s) (target 0)" in chipmodel.closed_io_line(run)


def test_calibration_scales_by_the_published_pystones():
    cal = chipmodel.Calibration(60000)
    one_ms_slow = 1 / cal.slow
    assert round(one_ms_slow) == round(60000 * 1014 / 1000)
    assert cal.fast < cal.slow


def test_each_iteration_counts_under_one_path_the_first_that_applies():
    assert chipmodel.primary_path(item()) == "idle tick"
    assert chipmodel.primary_path(item(coil=True, car="C")) == "charging tick"
    cmd = item(coil=True, net=["received 320 B", "publish status"],
               flash=[["cmd_counter.json.tmp", "wb", 13, 0]])
    assert chipmodel.primary_path(cmd) == "command"
    assert chipmodel.primary_path(item(coil=True, net=["received 4 B"])) is None  # a PUBACK
    assert chipmodel.primary_path(item(coil=True, meter_rx=9)) == "meter reply"
    assert chipmodel.primary_path(item(coil=True, lines=["[1.0] contactor: open"])) == "C->B decision"


def test_c_to_b_waits_the_debounce_then_one_gap_a_burst_and_the_decision():
    r = {"plain": 6.0, "max": 9.5, "gc": 18.0, "max_flash": 400.0, "decide": 1.5}
    cb = chipmodel.c_to_b(r, 15.0)
    burst = chipmodel.BURST_US / 1000
    assert cb["alone"] == 20 + 6.0 + burst + 1.5
    assert cb["stacked"] == 20 + 18.0 + burst + 1.5  # the collection's gap is the longer one
    assert cb["auto_gc"] == 20 + 9.5 + 15.0 + burst + 1.5
    assert cb["flash_worst"] == 20 + 400.0 + burst + 1.5


def piece(kind, ir, coil=True, bursts=1, **kw):
    return item(kind=kind, ir=ir, coil=coil, bursts=bursts, **kw)


def test_pieces_make_iterations_and_the_gaps_between_reads():
    # loop head -> tick's read | tick, records | guard's read | link | feed ; next: head -> read ...
    pieces = [piece("boot", 5, bursts=0),
              piece("burst", 10, bursts=0), piece("burst", 300, collects=1), piece("loop", 40),
              piece("burst", 20, bursts=0), piece("burst", 200, net=["publish status"]),
              piece("open", 30), piece("loop", 500, coil=False, bursts=0),
              piece("burst", 10, coil=False, bursts=0), piece("loop", 100, coil=False)]
    its = chipmodel.merge(pieces)
    assert [i["kind"] for i in its] == ["boot", "loop", "loop", "loop"]
    assert [i["ir"] for i in its] == [5, 350, 750, 110]
    assert [i["bursts"] for i in its] == [0, 2, 2, 1]
    assert its[2]["net"] == ["publish status"] and its[1]["collects"] == 1
    gs = chipmodel.gaps(its)
    # read 1 -> read 2: the tick's piece (with the collection); read 2 -> read 3: the rest of
    # that iteration and the next one's head; read 3 -> read 4: the tick to a guard; read 4 ->
    # the coil opening: the rest is no longer closed (no gap until the next read's successor)
    assert [(g["ir"], g["first"], g["closed"], g["bursts"]) for g in gs] == [
        (300, True, True, 0), (40 + 20, False, True, 0), (200, True, True, 0), (30, False, True, 0)]
    assert gs[0]["collects"] == 1
    assert [d["ir"] for d in chipmodel.decisions(its)] == [30]


def test_reads_leave_the_collection_out_of_the_largest_gap_and_find_the_decision():
    pieces = [piece("boot", 5, bursts=0),
              piece("burst", 10, bursts=0), piece("burst", 300000, collects=1), piece("loop", 40),
              piece("burst", 20, bursts=0), piece("burst", 200000), piece("loop", 40),
              piece("burst", 20, bursts=0, lines=[]),
              piece("open", 30000, lines=["[ 1.0] pilot: C -> B"]), piece("loop", 500, coil=False)]
    cal = chipmodel.Calibration(50000, gc_ir=800000)
    r = chipmodel.reads(chipmodel.merge(pieces), cal, 0)
    assert r["max"] == pytest.approx(200000 * cal.slow)
    assert r["gc"] == pytest.approx((300000 + 800000) * cal.slow)
    assert r["decide"] == pytest.approx(30000 * cal.slow)
    assert r["gc_in_run"] == 1


def test_a_dump_in_which_a_collection_ran_counted_is_marked(tmp_path):
    """read_dumps: callgrind names a function once ("fn=(7) name"), by number after, in calls
    ("cfn=") as well as in costs; only a cost of gc_collect_start marks the dump."""
    out = tmp_path / "callgrind.out"
    out.write_text("version: 1\ncreator: callgrind\npositions: line\nevents: Ir\n"
                   "part: 1\nfn=(1) mp_execute_bytecode\n0 900\ncfn=(2) gc_collect_start\ncalls=1 0\n"
                   "0 0\ntotals: 900\n"  # called, but from uncounted code: no cost of its own
                   "part: 2\nfn=(1)\n0 500\nfn=(2)\n0 40\nfn=(3) gc_mark_subtree\n0 60\ntotals: 600\n"
                   "part: 3\nfn=(1)\n0 70\ntotals: 70\n")
    assert chipmodel.read_dumps(str(out)) == [(900, False), (600, True), (70, False)]
    assert chipmodel.dump_totals(str(out)) == [900, 600, 70]


def test_a_drop_of_the_heap_without_the_firmwares_collection_is_a_collection_counted_or_not():
    """One started in the simulator's uncounted code has no cost in callgrind's dumps, but the heap
    in use at the cuts shows it (sim/chip_rom.py's lines carry gc.mem_alloc())."""
    pieces = [piece("boot", 5, alloc=90000),
              piece("burst", 10, alloc=90400), piece("loop", 40, alloc=60000, collects=1),  # main.py's
              piece("burst", 10, alloc=60300), piece("loop", 40, alloc=60100),  # a list shrunk
              piece("burst", 10, alloc=110000), piece("loop", 40, t=750, alloc=70000)]  # automatic
    assert chipmodel.uncounted_collections(chipmodel.merge(pieces)) == [750]


HOLD_PROBE = """
import gc
import heap_hold

M = 0x3FFFFFFF  # an object()'s hash is its address (bits 0-29, a small int)


def above(objs, floor):
    n = 0
    for o in objs:
        n += hash(o) & M > floor
    return n


junk = [bytearray(i % 97 + 1) for i in range(600)]  # the start-up's leavings: holes of all sizes
kept = junk[::7]
junk = None
held, held_bytes = heap_hold.hold(96 * 1024)
top = max(hash(o) & M for o in held)
sim = [object() for _ in range(3000)]  # the simulator's set-up
print("SIM", above(sim, top), len(sim))
heap_hold.release(held, held_bytes)
fw = [object() for _ in range(8)]  # the firmware's, after
print("FW", len(fw) - above(fw, top))
held, held_bytes = heap_hold.hold(96 * 1024)
stale = held[100:300]  # as a stale pointer in a frame would keep them
try:
    heap_hold.release(held, held_bytes)
except RuntimeError:
    print("STAYED")
"""


def test_what_the_simulator_sets_up_while_the_bottom_is_held_goes_above_it(chip_image, tmp_path):
    """sim/heap_hold.py: every hole below the held point is held too (4 KB chunks alone left the
    holes between the start-up's objects to the simulator: ~21 KB of it under the firmware's
    heap); freed, the firmware allocates from the bottom; what a stale pointer keeps is seen."""
    import subprocess

    from pilehost import chipbuild

    probe = tmp_path / "hold_probe.py"
    probe.write_text(HOLD_PROBE)
    env = dict(__import__("os").environ, MICROPYPATH=chipbuild.frozen_micropypath())
    r = subprocess.run([chip_image, "-X", "heapsize=256k", str(probe)], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = dict((line.split()[0], line.split()[1:]) for line in r.stdout.splitlines())
    above, made = map(int, out["SIM"])
    assert above >= made - 8, out  # the old hold (4 KB chunks): 155 of 3000 below
    assert out["FW"] == ["8"]
    assert "STAYED" in out


@pytest.mark.xfail(strict=True, reason="the run's meter replies while closed come 41-120 ms after "
                   "one of the firmware's collections, never right after one (README: the worst phase)")
def test_the_run_has_a_meter_reply_right_after_a_collection_of_the_firmwares(chip_image):
    """A collection sets the allocator's first free block back to the heap's bottom: the larger
    allocations after it scan the allocation table up from there. On a pile the 250 ms collection
    and the meter's replies drift against each other; the run, the same every time, must hold the
    worst phase for its between-reads figure to be the pile's worst."""
    intervals, _ = chipmodel.run_chip(chip_image, measure=False)
    last = None
    after = []
    for it in intervals:
        for p in it.get("pieces", [it]):
            if it["kind"] == "loop" and p.get("collects"):
                last = p["t"]
            if it["kind"] == "loop" and p.get("coil") and p.get("meter_rx") and last is not None:
                after.append(p["t"] - last)
    assert after and min(after) <= 10, sorted(after)[:5]


def test_a_chip_run_is_cut_at_every_feed_and_counts_the_same_twice(chip_binary):
    binary = chip_binary
    scenario = chipmodel.chip_scenario(charge_s=1, commands_at=(1300, 1600), tail_ms=600)
    runs = [chipmodel.run_chip(binary, scenario=scenario) for _ in range(2)]
    (first, result), (second, _) = runs
    assert result["boots"] == 1
    kinds = [i["kind"] for i in first]
    assert kinds[:3] == ["rom", "gc", "boot"] and kinds[-2:] == ["tail", "gc"]
    # the heap chip_rom.py holds below the simulator while it sets up is freed for the firmware
    sim_alone = next(i for i in first if i["kind"] == "gc" and i["who"] == "simulator")
    assert abs(result["heap_simulator"] - sim_alone["live"]) < 4096
    # deterministic: instruction for instruction, but where a collection ran counted (the ROM's
    # own, the boot's): the collector scans the C stack conservatively, and a word there that
    # differs from process to process can fall in the heap's range and mark a block (1 run in ~16
    # counted 12 instructions more in the ROM's 20 million)
    pieces = [[p for i in run for p in i["pieces"]] for run in (first, second)]
    assert len(pieces[0]) == len(pieces[1])
    for a, b in zip(*pieces, strict=True):
        assert a["auto_gc"] == b["auto_gc"]
        assert abs(a["ir"] - b["ir"]) <= (a["ir"] // 100000 if a["auto_gc"] else 0)
    assert not any(p["auto_gc"] for i in first if i["kind"] == "loop" for p in i["pieces"])
    loops = [i for i in first if i["kind"] == "loop"]
    assert len(loops) > 300 and all(i["bursts"] >= 1 for i in loops)  # the tick's burst at least
    # the guard reads only while closed: with the contactor open all along, the tick's read alone
    assert all(i["bursts"] == 1 for i in loops
               if not i["coil"] and not any(p["kind"] == "open" for p in i["pieces"]))
    paths = chipmodel.classify(first)
    for name in ("idle tick", "charging tick", "command", "session start", "C->B decision"):
        assert paths[name], name
    # issue 12 item 2: nothing written and no console burst while the contactor is closed
    closed = chipmodel.closed_io(first)
    assert closed["flash_writes"] == 0, closed
    assert closed["console_over_fifo"] == 0 and closed["console_most"] <= chipmodel.CONSOLE_FIFO, closed
    assert chipmodel.closed_io(second) == closed  # deterministic counts
    # the simulated hardware is not counted: an idle tick is well under a million instructions
    assert max(i["ir"] for i in paths["idle tick"]) < 1000000
    # Issue 12's target, on the reference calibration (instructions are deterministic: not a timed
    # test): at most 10 ms of chip time between two pilot reads while the contactor is closed,
    # the gaps holding one of the firmware's collections excepted (at most one per 20 ms).
    cal = chipmodel.Calibration(chipmodel.REFERENCE_PER_PYSTONE, scan_ir=chipmodel.REFERENCE_SCAN_IR)
    r = chipmodel.reads(first, cal, 0)
    assert r["n"] > 100
    assert r["max"] <= chipmodel.TARGET_BETWEEN_READS_MS, r["where"]["t"]
    assert r["gc_every"] is None or r["gc_every"] >= 20
    assert r["decide"] < 3  # a C->B seen opens the coil before anything else in that slice


def test_a_piece_of_a_long_line_before_a_cut_counts_in_its_iteration():
    """console.py writes a line longer than the UART's FIFO in pieces while the contactor is
    closed: the chip ROM's cut line then follows a piece on the same output line."""
    out = ["CHIP loop 5 1 C 100 1", "[   1.000] outbox: " + "r" * 100 + "CHIP loop 10 1 C 100 1",
           "r" * 40, "CHIP loop 15 1 C 100 1"]
    intervals, _ = chipmodel.pair(out, None)
    assert [i["console"] for i in intervals] == [0, 119, 42]
