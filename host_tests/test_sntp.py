"""SNTP client (firmware/sntp.py, RFC 4330): reply checks on hand-written packets, NTP eras, the
RTC tuple, retry and resync timing on CPython against a UDP server on loopback (virtual time),
then the firmware on the unix port setting the simulated RTC from such a server."""
import json
import os
import socket
import struct
import threading
import time

import jsonschema
import pytest
from pilehost.virtual_board import ROOT

import config
import sntp

T_2031 = 1936785600  # 2031-05-17T12:00:00Z, a Saturday
NONCE = (0x12345678, 0x9ABCDEF0)

# A server's reply written out by hand (RFC 4330 section 4, figure 1): LI 0, VN 4, mode 4;
# stratum 2, poll 6, precision -20; root delay and dispersion; reference id 192.168.4.1;
# reference timestamp; originate = NONCE; receive 2031-05-17T12:00:00.000Z (NTP 0xf71b7f40);
# transmit 12:00:00.250 (fraction 0x40000000).
GOOD = bytes.fromhex(
    "240206ec" "00000010" "00000020" "c0a80401"
    "f71b7f0000000000"
    "123456789abcdef0"
    "f71b7f4000000000"
    "f71b7f4040000000")


def patched(packet, at, value):
    data = bytearray(packet)
    data[at:at + len(value)] = value
    return bytes(data)


# -- the packet ----------------------------------------------------------------------------------

def test_a_good_reply_gives_the_servers_receive_and_transmit_times():
    assert sntp.parse_reply(GOOD, NONCE) == (T_2031 * 1000000, T_2031 * 1000000 + 250000)


def test_an_ntpv3_reply_is_taken_too():
    assert sntp.parse_reply(patched(GOOD, 0, b"\x1c"), NONCE)[1] == T_2031 * 1000000 + 250000


@pytest.mark.parametrize("packet, why", [
    (GOOD[:47], "short reply"),
    (patched(GOOD, 24, b"\x00"), "originate timestamp"),  # not an answer to our request
    (patched(GOOD, 0, b"\x23"), "mode 3"),  # a client's request, echoed
    (patched(GOOD, 0, b"\x25"), "mode 5"),  # broadcast
    (patched(GOOD, 0, b"\x14"), "version 2"),
    (patched(GOOD, 1, b"\x10"), "stratum 16"),
    (patched(GOOD, 0, b"\xe4"), "leap indicator 3"),
    (patched(GOOD, 40, bytes(8)), "transmit timestamp 0"),
], ids=["short", "not-ours", "mode-3", "mode-5", "v2", "stratum-16", "li-3", "tx-0"])
def test_replies_that_must_not_set_the_clock(packet, why):
    with pytest.raises(sntp.SntpError, match=why) as e:
        sntp.parse_reply(packet, NONCE)
    assert e.value.kiss is None


def test_kiss_o_death_carries_its_code():
    with pytest.raises(sntp.SntpError) as e:
        sntp.parse_reply(patched(patched(GOOD, 1, b"\x00"), 12, b"RATE"), NONCE)
    assert e.value.kiss == "RATE" and "kiss-o'-death RATE" in str(e.value)


# -- eras and epochs -----------------------------------------------------------------------------

def test_ntp_era_0_and_era_1():
    assert sntp.ntp_to_unix(0xF71B7F40) == T_2031
    assert sntp.ntp_to_unix(3913056000) == 1704067200  # 2024-01-01
    # RFC 4330 section 3: bit 0 clear is era 1, counted from 2036-02-07T06:28:16Z
    assert sntp.ntp_to_unix(0) == 2085978496
    assert sntp.ntp_to_unix(123010304) == 2208988800  # 2040-01-01
    assert sntp.ntp_to_unix(0x80000000) == 2147483648 - 2208988800  # 1968-01-20, era 0


def test_rtc_tuple_on_a_1970_port():
    assert sntp.epoch_offset(1970) == 0
    # machine.RTC.datetime order: year, month, day, weekday (Monday 0), h, m, s, microseconds
    assert sntp.rtc_datetime(T_2031 + 3661, 250000, 0) == (2031, 5, 17, 5, 13, 1, 1, 250000)


def test_rtc_tuple_on_a_2000_port_like_the_esp32(monkeypatch):
    """time.gmtime counting from 2000 (the ESP32 port): the same calendar date goes to the RTC."""
    real = time.gmtime
    monkeypatch.setattr(sntp.time, "gmtime", lambda secs: real(secs + sntp._UNIX_2000))
    assert sntp.epoch_offset() == sntp._UNIX_2000  # read from gmtime(0)[0] == 2000
    assert sntp.rtc_datetime(T_2031, 0, sntp.epoch_offset()) == (2031, 5, 17, 5, 12, 0, 0, 0)
    assert sntp.iso(T_2031, sntp._UNIX_2000) == "2031-05-17T12:00:00Z"


# -- a UDP server on loopback --------------------------------------------------------------------

def answer_with(unix_s, stratum=2, first=0x24, kiss=b"GPS\0"):
    """A server whose clock reads unix_s; it echoes the request's transmit timestamp."""
    def answer(request):
        ntp = (unix_s + sntp._NTP_1900_TO_1970) % (1 << 32)
        org = request[40:48]
        return struct.pack("!BBbb", first, stratum, 6, -20) + bytes(8) + kiss + \
            struct.pack("!II", ntp, 0) + org + struct.pack("!IIII", ntp, 0, ntp, 0)
    return answer


def garbage(request):
    return b"\x24\x02" + os.urandom(46)  # mode 4, stratum 2, but not an answer to our request


def silent(request):
    return None


class NtpServer:
    """UDP on 127.0.0.1: each request is kept and answered with answer(request): a datagram, a
    list of them, or None (silence)."""

    def __init__(self, answer):
        self.answer = answer
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.requests = []
        self.got = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                data, addr = self.sock.recvfrom(512)
            except OSError:
                return
            self.requests.append(data)
            reply = self.answer(data)
            for datagram in [reply] if isinstance(reply, bytes) else reply or ():
                self.sock.sendto(datagram, addr)
            self.got.set()

    def close(self):
        self.sock.close()


@pytest.fixture
def server_factory():
    servers = []

    def make(answer):
        s = NtpServer(answer)
        servers.append(s)
        return s
    yield make
    for s in servers:
        s.close()


class Rig:
    """The client on CPython, virtual milliseconds; the server's answer arrives in real time."""

    def __init__(self, server, interval_s=900, start_jitter_s=0, **kwargs):
        self.server = server
        self.set = []
        self.lines = []
        self.wall = 41  # an unsynced board: 41 s after its epoch
        self.client = sntp.SntpClient("127.0.0.1", self.set.append, self.report, port=server.port,
                                      interval_s=interval_s, start_jitter_s=start_jitter_s,
                                      wall=lambda: self.wall, **kwargs)
        self.now = 0

    def report(self, now_ms, what, text):
        assert what == "ntp"
        self.lines.append((now_ms, text))

    def poll(self, online=True):
        """One poll; when a request just went out, give the server the time to answer."""
        sent = len(self.server.requests)
        self.server.got.clear()
        self.client.poll(self.now, online)
        if self.client.requests > sent and self.server.answer is not silent:
            assert self.server.got.wait(5), "the server never saw the request"
            time.sleep(0.02)  # its answer on its way over loopback

    def run(self, until_ms, step_ms=5):
        while self.now < until_ms:
            self.poll()
            self.now += step_ms

    def request_times(self):
        return [t for t, text in self.lines if "next try" in text or "clock set" in text]


def test_a_good_answer_sets_the_rtc_and_the_clock_is_set_again_every_interval(server_factory):
    server = server_factory(answer_with(T_2031))
    rig = Rig(server, interval_s=900)
    rig.run(100)
    assert len(server.requests) == 1
    request = server.requests[0]
    assert len(request) == 48 and request[0] == 0x23 and request[40:48] != bytes(8)
    (dt,) = rig.set
    assert dt[:7] == (2031, 5, 17, 5, 12, 0, 0)
    assert rig.client.synced == 1
    assert "clock set to 2031-05-17T12:00:00Z from 127.0.0.1" in rig.lines[-1][1]
    rig.now = 900000 - 10
    rig.poll()
    assert len(server.requests) == 1  # not before the interval
    rig.now = 900000
    rig.run(900100)
    assert len(server.requests) == 2 and len(rig.set) == 2
    assert server.requests[1][40:48] != request[40:48]  # a fresh nonce each time


def test_an_answer_in_ntp_era_1_sets_2040(server_factory):
    server = server_factory(answer_with(2208988800))  # 2040-01-01, NTP seconds 123010304
    rig = Rig(server)
    rig.run(100)
    assert rig.set[0][:3] == (2040, 1, 1)


def test_silence_backs_off_from_a_minute_up_to_the_interval(server_factory):
    server = server_factory(silent)
    rig = Rig(server, interval_s=900)
    sent = []
    while rig.now < 3000000:
        before = rig.client.requests
        rig.poll()
        if rig.client.requests > before:
            sent.append(rig.now)
        rig.now += 100
    assert rig.set == []
    gaps = [b - a for a, b in zip(sent, sent[1:], strict=False)]
    # RFC 4330 section 5: never less than a minute apart; doubling, capped at the interval;
    # each pause counts from the end of the 2 s wait for the reply
    assert gaps[:5] == [d + 2000 for d in (60000, 120000, 240000, 480000, 900000)]
    assert set(gaps[5:]) == {902000}
    assert "no valid reply from 127.0.0.1 within 2 s; next try in 60 s" in rig.lines[0][1]


def test_garbage_is_ignored_and_changes_nothing(server_factory):
    server = server_factory(garbage)
    rig = Rig(server)
    rig.run(3000)
    assert rig.set == [] and rig.client.synced == 0
    assert "(last: originate timestamp is not our request's)" in rig.lines[0][1]


def test_a_forged_datagram_first_does_not_hide_the_real_answer(server_factory):
    good = answer_with(T_2031)
    server = server_factory(lambda request: [garbage(request), good(request)])
    rig = Rig(server)
    rig.run(3000)
    assert len(rig.set) == 1 and rig.set[0][:3] == (2031, 5, 17)


def test_kiss_o_death_ends_the_attempt_at_once(server_factory):
    server = server_factory(answer_with(T_2031, stratum=0, kiss=b"RATE"))
    rig = Rig(server)
    rig.run(100)
    assert rig.set == []
    assert rig.lines[0][0] < 100 and "refused: kiss-o'-death RATE; next try in 60 s" in rig.lines[0][1]


def test_an_unsynchronised_server_is_not_believed(server_factory):
    server = server_factory(answer_with(T_2031, first=0xE4))  # leap indicator 3
    rig = Rig(server)
    rig.run(3000)
    assert rig.set == [] and "leap indicator 3" in rig.lines[0][1]


def test_a_server_clock_before_2024_is_refused(server_factory):
    server = server_factory(answer_with(946684800 + 41))  # another board's unsynced 2000 clock
    rig = Rig(server)
    rig.run(100)
    assert rig.set == [] and "implausible time" in rig.lines[0][1]


def test_nothing_goes_out_offline_and_the_first_request_is_spread(server_factory):
    server = server_factory(answer_with(T_2031))
    rig = Rig(server, start_jitter_s=10)
    for _ in range(100):
        rig.poll(online=False)
        rig.now += 1000
    assert server.requests == []
    online_at = rig.now
    while not rig.set and rig.now < online_at + 11000:
        rig.poll()
        rig.now += 50
    assert len(rig.set) == 1 and rig.now - online_at <= 10050  # RFC 4330 section 10, step 2


class NoDns:
    """A socket module whose name lookup fails (a board without DNS): the client must cope."""
    AF_INET = socket.AF_INET
    SOCK_DGRAM = socket.SOCK_DGRAM

    def getaddrinfo(self, host, port):
        raise OSError(-202)

    def socket(self, *args):
        raise AssertionError("no socket without an address")


def test_a_failed_lookup_is_a_failed_attempt():
    lines = []
    client = sntp.SntpClient("ntp.example", lambda dt: None, lambda t, w, text: lines.append(text),
                             start_jitter_s=0, sock_module=NoDns())
    client.poll(0)
    client.poll(59999)
    client.poll(60000)
    assert client.requests == 2
    assert lines[0] == "cannot send to ntp.example (-202); next try in 60 s"


# -- the records once NTP has set the clock ----------------------------------------------------------

def test_a_power_cut_after_ntp_answered_mid_session_reports_real_times(tmp_path):
    """The session began on the unsynced clock; NTP answered; the power went. The snapshot was
    rebased at its next checkpoint, so the power_loss record carries synced times."""
    import charger as ch
    import journal_scan
    import session_log
    import session_restore
    import session_store
    from session_record import Record

    wall = [41]  # 41 s after the epoch: not synced

    def make(boot):
        # As wiring.build_session_log:
        log = session_restore.load("pile-0042", boot, journal_scan.load(str(tmp_path / "outbox")),
                                   session_store.SessionStore(str(tmp_path / "session.json")),
                                   metered=False, checkpoint_s=60, wall=lambda: wall[0])
        return log
    log = make(7)
    s = Record(ch.Session(0))
    s.auth_source, s.auth_id, s.authorized_ms = "free_vend", None, 0
    log.poll(0, s, None)
    wall[0] = T_2031 + 30  # NTP set the clock 30 s into the session
    log.poll(61000, s, None)  # the next checkpoint, at 61 s
    log2 = make(8)  # the power went; the next boot closes the session
    log2.poll(0, None, None)
    recs = [json.loads(p) for _s, _k, p in journal_scan.load(str(tmp_path / "outbox")).pending()]
    started, ended = recs
    assert started["clock_synced"] is False
    assert ended["stop_reason"] == "power_loss" and ended["clock_synced"] is True
    assert ended["start_time"] == session_log.iso_utc(T_2031 + 30 - 61)
    assert ended["stop_time"] == session_log.iso_utc(T_2031 + 30)


# -- config ----------------------------------------------------------------------------------------

def test_ntp_config_defaults_and_bounds():
    conf = config.parse_config({"ntp": {"host": "192.168.4.1"}})
    assert (conf.ntp.port, conf.ntp.interval_s, conf.ntp.start_jitter_s) == (123, 3600, 60)
    assert config.parse_config({}).ntp is None
    for bad, key in (({"host": ""}, "host"), ({}, "host"), ({"host": "h", "interval_s": 60}, "interval_s"),
                     ({"host": "h", "start_jitter_s": 301}, "start_jitter_s"),
                     ({"host": "h", "pool": 1}, "pool")):
        with pytest.raises(config.ConfigError, match="ntp: .*'%s'" % key):
            config.parse_config({"ntp": bad})


# -- the firmware on the unix port ------------------------------------------------------------------

from pilehost import unix_port  # noqa: E402

C_TO_B_LIMIT_MS = 100  # IEC 61851-1 Table A.6 seq. 8.1

try:
    HAVE_UNIX_PORT = bool(unix_port.micropython_binary())
except FileNotFoundError:  # pragma: no cover - `make test` installs it
    HAVE_UNIX_PORT = False
unix = pytest.mark.skipif(not HAVE_UNIX_PORT, reason="MicroPython unix port not installed (make venv)")


def run_with(server, flash):
    r = unix_port.run_scenario("ntp_sync", flash_dir=flash, config={
        "ntp": {"host": "127.0.0.1", "port": server.port, "start_jitter_s": 0}})
    assert r.returncode == 0 and r.result is not None, "\n".join(r.lines[-30:])
    assert not any("Traceback" in line or "MemoryError" in line for line in r.lines), "\n".join(r.lines)
    return r


def ended_record(flash):
    import journal
    import journal_scan

    outbox = journal_scan.load(os.path.join(flash, "outbox.jrnl"))
    records = [json.loads(p) for _s, kind, p in outbox.pending() if journal.kind_name(kind) == "session_end"]
    assert len(records) == 1
    with open(os.path.join(ROOT, "docs", "schemas", "session_ended.v1.schema.json")) as f:
        jsonschema.validate(records[0], json.load(f))
    return records[0]


def charged_and_opened_in_time(r):
    assert [text for _, text in r.sim_events("contactor")].count("coil ON") == 1
    assert len(r.result["latencies_ms"]) == 1 and max(r.result["latencies_ms"]) < C_TO_B_LIMIT_MS


@unix
def test_the_firmware_sets_the_rtc_from_the_server_and_the_records_carry_that_time(server_factory, tmp_path):
    server = server_factory(answer_with(T_2031))
    r = run_with(server, str(tmp_path))
    (rtc,) = r.sim_events("rtc")
    assert rtc[1].startswith("set to 2031-05-17T12:00:00.")
    joined = [t for t, text in r.firmware_events("wifi") if text.startswith("connected to")][0]
    assert "clock set to 2031-05-17T12:00:00Z" in r.firmware_events("ntp")[0][1]
    assert r.firmware_events("ntp")[0][0] - joined < 100  # asked as soon as the Wi-Fi was up
    charged_and_opened_in_time(r)
    ended = ended_record(str(tmp_path))
    # The session started before NTP answered (unsynced 2000 clock); stopped after: the record
    # back-computes its start from the synced stop (docs/telemetry.md).
    assert ended["clock_synced"] is True
    assert ended["stop_time"].startswith("2031-05-17T12:00:0")
    assert ended["start_time"] <= ended["stop_time"] and ended["start_time"].startswith("2031-05-17T1")


@unix
@pytest.mark.parametrize("answer", [silent, garbage], ids=["silent", "garbage"])
def test_a_server_that_never_answers_right_changes_nothing_and_blocks_nothing(server_factory, tmp_path,
                                                                              answer):
    server = server_factory(answer)
    r = run_with(server, str(tmp_path))
    assert len(server.requests) == 1  # one request; the next only after a minute
    assert r.sim_events("rtc") == []
    (line,) = r.firmware_events("ntp")
    assert "no valid reply from 127.0.0.1 within 2 s" in line[1] and "next try in 60 s" in line[1]
    charged_and_opened_in_time(r)
    ended = ended_record(str(tmp_path))
    assert ended["clock_synced"] is False and ended["stop_time"].startswith("2000-01-01T00:00:0")
