"""session_store.py: atomic snapshot of the open session, command counter, garbled files."""
import binascii
import os

import pytest

import session_store as S

SNAP = {"id": "S-17", "state": "charging", "auth_id": "card-1", "start_wh": 1234567,
        "wh": 1236000, "started_s": 1700000000, "limit_a": 16.5, "phases": 3}


def test_save_load_clear(tmp_path):
    path = str(tmp_path / "session.json")
    st = S.SessionStore(path)
    assert st.load() is None and st.error is None  # first boot: nothing, no error
    assert st.save(SNAP) is True
    assert S.SessionStore(path).load() == SNAP
    assert not os.path.exists(path + ".tmp")
    st.clear()
    assert not os.path.exists(path)
    assert st.load() is None and st.error is None
    st.clear()  # twice is fine


def test_unchanged_snapshot_is_not_written_again(tmp_path):
    path = str(tmp_path / "session.json")
    st = S.SessionStore(path)
    assert st.save(dict(SNAP))
    mtime = os.stat(path).st_mtime_ns
    os.utime(path, ns=(0, 0))
    assert st.save(dict(SNAP)) is False
    assert os.stat(path).st_mtime_ns == 0 != mtime
    assert st.save(dict(SNAP, wh=1236100)) is True
    # After a reboot the first save compares with what load() found.
    st2 = S.SessionStore(path)
    st2.load()
    assert st2.save(dict(SNAP, wh=1236100)) is False


def test_file_format_is_checksum_line_then_json(tmp_path):
    path = tmp_path / "session.json"
    S.SessionStore(str(path)).save({"a": 1})
    data = path.read_bytes()
    assert data[8:9] == b"\n" and int(data[:8], 16) >= 0
    assert data[9:] == b'{"a":1}'


@pytest.mark.parametrize("content", [
    b"", b"0000", b"deadbeef\n{}", b"zzzzzzzz\n{}",
    b"not a checksum at all\n",
    b"\xff" * 50,
    b"0" * 5000,
])
def test_garbled_file_is_ignored_with_an_error(tmp_path, content):
    path = tmp_path / "session.json"
    path.write_bytes(content)
    st = S.SessionStore(str(path))
    assert st.load() is None
    assert "garbled" in st.error


def test_valid_checksum_over_something_else_is_still_refused(tmp_path):
    path = tmp_path / "session.json"
    for text in (b"[1, 2]", b"{\"a\": ", b"17"):
        path.write_bytes(b"%08x\n" % binascii.crc32(text) + text)
        st = S.SessionStore(str(path))
        assert st.load() is None and "garbled" in st.error


def test_power_cut_at_every_byte_of_a_save_keeps_the_old_snapshot(tmp_path):
    path = tmp_path / "session.json"
    st = S.SessionStore(str(path))
    st.save(SNAP)
    new = S._encode(dict(SNAP, wh=1299999, state="suspended_ev"))
    for cut in range(len(new) + 1):
        # The temp file is written (maybe partly), the rename has not happened.
        (tmp_path / "session.json.tmp").write_bytes(new[:cut])
        assert S.SessionStore(str(path)).load() == SNAP
    # A torn final file (not possible with rename, but flash can go bad) is never half-read.
    for cut in range(len(new)):
        path.write_bytes(new[:cut])
        st = S.SessionStore(str(path))
        assert st.load() is None and st.error


def test_bit_flips_are_caught(tmp_path):
    path = tmp_path / "session.json"
    good = S._encode(SNAP)
    for off in range(len(good)):
        bad = bytearray(good)
        bad[off] ^= 0x04
        path.write_bytes(bytes(bad))
        assert S.SessionStore(str(path)).load() is None, off


def test_bad_snapshots_are_refused_before_writing(tmp_path):
    st = S.SessionStore(str(tmp_path / "s.json"))
    with pytest.raises(TypeError):
        st.save([1, 2])
    with pytest.raises(ValueError):
        st.save({"big": "x" * 2000})
    with pytest.raises(TypeError):
        st.save({"obj": object()})
    assert not os.path.exists(str(tmp_path / "s.json"))


def test_counter_store(tmp_path):
    path = str(tmp_path / "counter.json")
    c = S.CounterStore(path)
    assert c.load() == 0 and c.error is None  # first boot
    c.save(41)
    assert S.CounterStore(path).load() == 41
    for bad in (-1, 1.5, True, "7", None):
        with pytest.raises(ValueError):
            c.save(bad)
    with open(path, "wb") as f:
        f.write(b"garbage")
    c2 = S.CounterStore(path)
    assert c2.load() is None and "garbled" in c2.error  # fail closed, never back to 0
    c2.save(5)
    with open(path, "wb") as f:
        f.write(S._encode(-3))
    assert c2.load() is None and "garbled" in c2.error


def test_unreadable_file_is_not_taken_for_a_missing_one(tmp_path):
    (tmp_path / "counter.json").mkdir()  # open() fails with EISDIR, not ENOENT
    c = S.CounterStore(str(tmp_path / "counter.json"))
    assert c.load() is None and "unreadable" in c.error  # fail closed
    (tmp_path / "session.json").mkdir()
    st = S.SessionStore(str(tmp_path / "session.json"))
    assert st.load() is None and "unreadable" in st.error
