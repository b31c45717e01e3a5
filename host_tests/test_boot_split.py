"""Issue 12 item 3: the boot-only code of resident modules lives in modules the boot drops at
once (charger_restore.py, journal_scan.py, session_restore.py, meter_setup.py and the S0 and
DL/T 645 drivers' s0_setup.py, dlt645_setup.py): none is loaded after the boot,
nothing built keeps one of their functions, and what they did at boot is done as before."""
import binascii
import errno
import struct

import pytest

from pilehost import unix_port
from pilehost.virtual_board import VirtualBoard

import journal as J
import journal_scan

BOOT_ONLY = ("charger_restore", "journal_scan", "session_restore", "meter_setup", "s0_setup",
             "dlt645_setup")


def test_nothing_built_keeps_a_function_of_the_boot_only_modules(monkeypatch, functions_of):
    """wiring.build drops them from sys.modules itself: a function of theirs kept by what it
    built (a bound lambda, a method stored on the charger or the log) would keep it all."""
    import importlib

    modules = [importlib.import_module(name) for name in BOOT_ONLY]  # the objects wiring uses
    vb = VirtualBoard(monkeypatch, config={
        "pile_id": "split-1", "meter": {"type": "ddsu666"},
        "mqtt": {"host": "127.0.0.1", "port": 1}})
    link = vb.build_link()
    import sys

    assert not set(BOOT_ONLY) & set(sys.modules), "wiring.build left one loaded"
    roots = [vb.ctl, link]
    for module in modules:
        assert functions_of(module, roots) == [], module.__name__
    vb.ctl.kept = eval("lambda: ch", vars(modules[0]))  # the check sees one if there is one
    assert functions_of(modules[0], roots) == ["<lambda>"]


def test_the_boot_only_modules_are_gone_after_the_boot_in_the_benchs_configuration():
    """On the 32-bit binary as `.mpy`, the configuration `make bench WHAT=heap32` bisects: the
    session completes and none of them is loaded at its end; the modules they serve are."""
    from pilehost import chipheap, procs

    program = unix_port.unix32_binary() or unix_port.micropython_binary()
    r = unix_port.run_scenario("normal", config=chipheap._config(procs.free_port(), "split-2"),
                               heapsize="400k", exact_heap=True, program=program)
    assert r.returncode == 0 and r.result and r.result["boots"] == 1, "\n".join(r.lines[-20:])
    loaded = set(r.result["modules"])
    assert not set(BOOT_ONLY) & loaded
    assert "files" not in loaded  # the boot's file names: without OTA nothing reads them after it
    # main.run's boot code and the modules its two phases build with: dropped before the link.
    assert not {"startup", "wiring", "wiring_link"} & loaded
    assert {"charger", "journal", "session_log", "session_store", "meter", "modbus_meter"} <= loaded


def _ack_bytes(seq):
    head = struct.pack("<I", seq)
    return head + struct.pack("<I", binascii.crc32(head) & 0xFFFFFFFF)


def test_the_ack_file_is_read_as_the_journal_read_it(tmp_path):
    """8 bytes: seq | crc32(seq); more after them is not looked at; fewer, or a bad CRC: the
    state record's watermark holds (the records come again)."""
    path = str(tmp_path / "j")
    j = journal_scan.load(path, max_bytes=8192, max_payload=256)
    for i in range(5):
        j.append(J.KIND_SESSION_END, b"rec%d" % i)
    j._rewrite(0, 0)  # a state record with the watermark 0 (as a load that cut a torn end makes it)
    for ack, acked in ((_ack_bytes(3), 3), (_ack_bytes(3) + b"junk", 3), (_ack_bytes(3)[:7], 0),
                       (_ack_bytes(3)[:4] + b"\0\0\0\0", 0)):
        with open(path + ".ack", "wb") as f:
            f.write(ack)
        j = journal_scan.load(path, max_bytes=8192, max_payload=256)
        assert j.acked == acked, ack
        assert [s for s, _, _ in j.pending()] == list(range(acked + 1, 6))
        assert j.next_seq == 6


def test_an_ack_without_its_journal_keeps_new_seqs_above_it(tmp_path):
    path = str(tmp_path / "j")
    with open(path + ".ack", "wb") as f:
        f.write(_ack_bytes(41))
    j = journal_scan.load(path)
    assert (j.acked, j.next_seq) == (41, 42)
    assert j.append(J.KIND_SESSION_END, b"x") == 42


def test_an_unreadable_ack_file_is_an_unreadable_journal(tmp_path):
    """Not an empty one: wiring.build_session_log holds the pile unavailable (OSError)."""
    path = tmp_path / "j"
    (tmp_path / "j.ack").mkdir()  # opening it fails, and not with ENOENT
    with pytest.raises(OSError) as e:
        journal_scan.load(str(path))
    assert e.value.args[0] != errno.ENOENT


def test_a_repair_at_run_time_keeps_the_watermark_held_in_ram(tmp_path, monkeypatch, fake_flash_gate,
                                                              request):
    """The ack file is read at boot only: a repair after a failed write (which scans the file
    again) keeps the watermark an ack set while the contactor was closed, not yet on flash; the
    acknowledged records are not sent again, and it is written when the contactor opens."""
    gate = fake_flash_gate()
    path = str(tmp_path / "j")
    j = journal_scan.load(path, max_bytes=8192, max_payload=256, gate=gate)
    for i in range(3):
        j.append(J.KIND_SESSION_END, b"rec%d" % i)
    gate.closed = True
    j.ack(2)  # held in RAM
    request.getfixturevalue("torn_appends")  # from here on, appends tear
    with pytest.raises(OSError):
        j.append(J.KIND_SESSION_END, b"torn")
    monkeypatch.undo()
    assert j.append(J.KIND_SESSION_END, b"after") == 4  # repaired first: the torn end cut off
    assert j.acked == 2 and [s for s, _, _ in j.pending()] == [3, 4]
    assert gate.open() == [None]
    again = journal_scan.load(path, max_bytes=8192, max_payload=256)
    assert again.acked == 2 and [p for _, _, p in again.pending()] == [b"rec2", b"after"]


def test_the_numbers_a_boot_module_repeats_are_its_modules():
    """A boot module repeats a private constant of the module it serves (a public one would
    cost a global and an interned name for the whole run): they stay the same."""
    import charger as ch
    import charger_restore

    assert charger_restore._LIMIT_REMOTE == ch._LIMIT_REMOTE
    for name in ("_KIND_STATE", "_KINDS", "_HDR", "_OVERHEAD", "_STATE_REC", "_PAYLOAD_LIMIT",
                 "_MARKER_RESERVE"):
        assert getattr(journal_scan, name) == getattr(J, name), name
    import dlt645
    import dlt645_setup
    import meter
    import meter_setup
    import modbus_meter
    import s0_meter
    import s0_setup

    for module, name, theirs, their_name in (
            (meter_setup, "_IDLE", meter, "_IDLE"), (meter_setup, "_BITS_PER_CHAR", meter, "_BITS_PER_CHAR"),
            (meter_setup, "_MODBUS_RX_SIZE", modbus_meter, "_RX_SIZE"),
            (meter_setup, "_FN_READ_INPUT", modbus_meter, "_FN_READ_INPUT"),
            (dlt645_setup, "_OVERHEAD", dlt645, "_OVERHEAD"), (dlt645_setup, "_RX_SIZE", dlt645, "_RX_SIZE"),
            (s0_setup, "_RING", s0_meter, "_RING")):
        assert getattr(module, name) == getattr(theirs, their_name), name
    assert dlt645_setup._TX_SIZE == dlt645._MAX_WAKE + dlt645._OVERHEAD + 4
