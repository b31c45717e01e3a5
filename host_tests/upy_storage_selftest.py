"""Journal, session store and command check on the MicroPython unix port.

Run from the repo root (the files go to WORKDIR, default /tmp/upy_storage_selftest):
    MICROPYPATH="firmware:.frozen" micropython -X heapsize=64k host_tests/upy_storage_selftest.py [WORKDIR]
with firmware/ holding the three modules as .mpy (test_journal.py makes such a copy): compiling
journal.py from source needs ~68 KiB of heap by itself, the board loads bytecode.
Covers a journal reopened after a torn append, the same on a LittleFS2 RAM disk (rename over
an existing file), the session snapshot, RFC 4231 HMAC-SHA256 and a signed command and its
replay. Prints "upy storage selftest ok".
"""
import gc
import os
import sys

import journal as J

import journal_scan
import session_store
import command_auth


def check(cond, what):
    if not cond:
        raise SystemExit("FAIL: " + what)


def rm(path):
    try:
        os.remove(path)
    except OSError:
        pass


def pending(j):
    return [r for r in j.pending()]


def journal_case(path, max_bytes, max_payload):
    for p in (path, path + ".ack", path + ".tmp", path + ".ack.tmp"):
        rm(p)
    j = journal_scan.load(path, max_bytes=max_bytes, max_payload=max_payload)
    s1 = j.append(J.KIND_SESSION_START, b'{"s":"S1"}')
    s2 = j.append(J.KIND_METER, b"1234")
    s3 = j.append(J.KIND_SESSION_END, b'{"s":"S1","wh":5}')
    check((s1, s2, s3) == (1, 2, 3), "seqs %r" % ((s1, s2, s3),))
    j.ack(1)
    check([r[0] for r in j.pending()] == [2, 3], "pending after ack")
    size = os.stat(path)[6]
    # Power cut in the middle of an append: half a record at the end of the file.
    f = open(path, "ab")
    f.write(b"RJ\x01\x00\x40\x00\x04\x00\x00\x00abc")
    f.close()
    j = journal_scan.load(path, max_bytes=max_bytes, max_payload=max_payload)
    check(j.discarded_bytes == 13, "discarded %d" % j.discarded_bytes)
    check(pending(j) == [(2, J.KIND_METER, b"1234"), (3, J.KIND_SESSION_END, b'{"s":"S1","wh":5}')],
          "pending after torn append")
    check(os.stat(path)[6] <= size, "torn tail cut off")
    check(j.append(J.KIND_FAULT, b"f") == 4, "seq after reopen")
    # Full of session ends: the oldest go, a journal_fault record reports it.
    for _ in range(40):
        j.append(J.KIND_SESSION_END, b"e" * max_payload)
    check(j.dropped(J.KIND_SESSION_END) > 0, "overflow happened")
    check(os.stat(path)[6] <= max_bytes, "bounded")
    next_seq = j.next_seq  # 45 + one seq per journal_fault record written
    j = journal_scan.load(path, max_bytes=max_bytes, max_payload=max_payload)
    kinds = [r[1] for r in j.pending()]
    check(J.KIND_JOURNAL_FAULT in kinds, "overflow reported")
    check(j.dropped(J.KIND_SESSION_END) > 0, "drop count survives")
    check(j.next_seq == next_seq > 45, "seq %d" % j.next_seq)


class RAMDisk:
    """Block device for VfsLfs2 (extended interface: erase via ioctl 6)."""

    def __init__(self, block_size, blocks):
        self.bs = block_size
        self.n = blocks
        self.data = bytearray(block_size * blocks)

    def readblocks(self, block, buf, off=0):
        a = block * self.bs + off
        buf[:] = self.data[a:a + len(buf)]

    def writeblocks(self, block, buf, off=0):
        a = block * self.bs + off
        self.data[a:a + len(buf)] = buf

    def ioctl(self, op, arg):
        if op == 4:
            return self.n
        if op == 5:
            return self.bs
        if op == 6:
            return 0
        return None


def main():
    work = sys.argv[1] if len(sys.argv) > 1 else "/tmp/upy_storage_selftest"
    try:
        os.mkdir(work)
    except OSError:
        pass
    os.chdir(work)

    journal_case("journal.log", 1200, 64)
    gc.collect()

    # The same on LittleFS2, the ESP32's filesystem (small blocks: a 6 KiB RAM disk).
    disk = RAMDisk(256, 24)
    os.VfsLfs2.mkfs(disk)
    os.mount(os.VfsLfs2(disk), "/lfs")
    journal_case("/lfs/journal.log", 1200, 64)
    st = session_store.SessionStore("/lfs/session.json")
    check(st.save({"id": "S1", "wh": 1}) and st.load() == {"id": "S1", "wh": 1}, "lfs session")
    os.umount("/lfs")
    del disk
    gc.collect()

    st = session_store.SessionStore("session.json")
    st.clear()
    check(st.load() is None and st.error is None, "no snapshot")
    snap = {"id": "S2", "state": "charging", "start_wh": 1000, "wh": 1500}
    check(st.save(snap), "saved")
    check(not st.save(snap), "unchanged: not written again")
    check(session_store.SessionStore("session.json").load() == snap, "snapshot back")
    f = open("session.json", "wb")
    f.write(b"0000beef\n{\"id\":")
    f.close()
    check(st.load() is None and "garbled" in st.error, "garbled snapshot ignored")
    ctr = session_store.CounterStore("counter.json")
    ctr.clear()
    check(ctr.load() == 0, "no counter yet")
    gc.collect()

    # RFC 4231 test case 2.
    mac = command_auth._hmac(*command_auth._pads(b"Jefe"), b"what do ya want for nothing?")
    check(mac == bytes.fromhex("5bdcc146bf60754e6a042426089575c7"
                               "5a003f089d2739839dec58b964ec3843"), "RFC 4231 case 2")
    secret = bytes(range(32))
    # tools/pilecmd.py --counter 7 --id upy-1 remote_start auth_id=card-1 (secret 00..1f)
    payload = (b'{"body":"{\\"v\\":1,\\"id\\":\\"upy-1\\",\\"cmd\\":\\"remote_start\\",'
               b'\\"counter\\":7,\\"args\\":{\\"auth_id\\":\\"card-1\\"}}",'
               b'"sig":"503ac7bea81504ee0dd963df455b8a005d1518770ab3e323be131487501a6667"}')
    v = command_auth.CommandVerifier(secret, counter_store=ctr)
    cmd = v.verify(payload)
    check(cmd.cmd == "remote_start" and cmd.args == {"auth_id": "card-1"} and cmd.id == "upy-1",
          "command %r" % cmd)
    check(ctr.load() == 7 + command_auth.RESERVE, "counter stored, reserved ahead")
    for raw, code in ((payload, "replayed"), (payload.replace(b"card-1", b"card-2"), "bad_signature"),
                      (b"\xff" * 600, "too_large"), (b"{not json", "malformed")):
        try:
            v.verify(raw)
            check(False, "accepted " + code)
        except command_auth.CommandError as e:
            check(e.code == code, "%s, not %s" % (e.code, code))
    check(v.last_counter == 7, "no change on error")
    print("upy storage selftest ok")


main()
