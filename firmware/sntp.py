"""SNTP client (RFC 4330, unicast), one bounded step per control loop: never waits on the network.

A request goes out on a non-blocking UDP socket; its reply is read on a later poll, checked
(section 5: mode 4, stratum 1-15, leap indicator not 3, our transmit timestamp echoed as the
originate timestamp, a non-zero transmit timestamp) and turned into a machine.RTC().datetime()
tuple for the `set_clock` callback. No reply within _REPLY_MS, or a kiss-o'-death, is a failed
attempt: the next comes after a pause that doubles from one minute up to `interval_s`; after a
good one the clock is set again every `interval_s`. micropython-lib's ntptime.settime() is not
used: it blocks for up to a second.

A host name (not a numeric address) is looked up with getaddrinfo, which blocks on a board:
only while `may_block()` says so (wiring_link.py: the contactor open; docs/network.md). The address is
kept; after a failed attempt it is looked up again when allowed, else the kept one serves. A
numeric address needs no lookup: use one on piles.
"""
import random
import select
import socket
import struct
import time

from micropython import const

from backoff import Backoff
from netaddr import numeric_host

_NTP_PORT = const(123)
_PACKET = const(48)
_REPLY_MS = const(2000)  # a LAN or Internet server answers in well under a second
# RFC 4330 section 5: "under no conditions should requests be sent at less than one minute
# intervals"; section 10: back off exponentially while the server does not answer.
_RETRY_MIN_MS = const(60000)

# RFC 4330 section 3: NTP seconds count from 1900-01-01 while bit 0 is set (1968-2036); with it
# clear, from 2036-02-07T06:28:16Z (era 1, 2036-2104). Unix time counts from 1970-01-01.
_NTP_1900_TO_1970 = const(2208988800)
_ERA = const(1 << 32)
_UNIX_2000 = const(946684800)  # 2000-01-01, the ESP32 port's epoch (py/mpconfig.h MICROPY_EPOCH_IS_2000)
# A reply before 2024 is wrong (session_log: a clock before 2024 is not synced); MicroPython's
# time functions are defined up to 2099 (py/mpconfig.h).
_MIN_UNIX = const(1704067200)  # 2024-01-01
_MAX_UNIX = const(4102444800)  # 2100-01-01

_IDLE = const(0)
_WAITING = const(1)  # request sent


class SntpError(Exception):
    """A reply that must not set the clock; `kiss` is the kiss-o'-death code, if it was one."""

    def __init__(self, text, kiss=None):
        super().__init__(text)
        self.kiss = kiss


def ntp_to_unix(seconds):
    """NTP seconds (32 bits) -> Unix seconds, in NTP era 0 or 1 (RFC 4330 section 3)."""
    if seconds & 0x80000000:
        return seconds - _NTP_1900_TO_1970
    return seconds + _ERA - _NTP_1900_TO_1970


def _unix_us(data, at):
    seconds, fraction = struct.unpack_from("!II", data, at)
    return ntp_to_unix(seconds) * 1000000 + (fraction * 1000000 >> 32)


def parse_reply(data, nonce):
    """(receive, transmit) times of a server reply in Unix microseconds (RFC 4330 section 5);
    nonce: the (seconds, fraction) our request carried as its transmit timestamp."""
    if len(data) < _PACKET:
        raise SntpError("short reply (%d bytes)" % len(data))
    if struct.unpack_from("!II", data, 24) != nonce:
        raise SntpError("originate timestamp is not our request's")
    first = data[0]
    mode = first & 7
    version = first >> 3 & 7
    stratum = data[1]
    if mode != 4:
        raise SntpError("mode %d, not 4 (server)" % mode)
    if version not in (3, 4):  # the server answers with our version 4; NTPv3 servers with 3
        raise SntpError("version %d" % version)
    if stratum == 0:  # section 8: kiss-o'-death, its code in the reference identifier
        kiss = "".join(chr(c) if 32 < c < 127 else "?" for c in data[12:16])
        raise SntpError("kiss-o'-death %s" % kiss, kiss)
    if stratum > 15:
        raise SntpError("stratum %d (unsynchronised)" % stratum)
    if first >> 6 == 3:
        raise SntpError("leap indicator 3 (server clock not synchronised)")
    if struct.unpack_from("!II", data, 40) == (0, 0):
        raise SntpError("transmit timestamp 0")
    return _unix_us(data, 32), _unix_us(data, 40)


def epoch_offset(epoch_year=None):
    """Unix seconds at the port's epoch: time.gmtime(0)[0] is 2000 on the ESP32, 1970 on the
    unix port (MicroPython docs, time module: 'Epoch year may be determined with gmtime(0)[0]')."""
    if epoch_year is None:
        epoch_year = time.gmtime(0)[0]
    return _UNIX_2000 if epoch_year == 2000 else 0


def unix_ms():
    """Unix time in ms once the clock is set (NTP; before 2024 it is not), else None (the command
    verifier's wall clock, commands.unix_ms)."""
    t = int(time.time()) + epoch_offset()
    return None if t < _MIN_UNIX else t * 1000


def while_open(contactor):
    """may_block for SntpClient: a name lookup only with the contactor open (issue 10, item 19)."""
    return lambda: not contactor.closed


def rtc_datetime(unix_s, micros, offset):
    """machine.RTC.datetime() tuple: (year, month, day, weekday, hours, minutes, seconds, us)."""
    t = time.gmtime(unix_s - offset)
    return (t[0], t[1], t[2], t[6], t[3], t[4], t[5], micros)


def iso(unix_s, offset):
    t = time.gmtime(unix_s - offset)
    return "%04d-%02d-%02dT%02d:%02d:%02dZ" % t[:6]


class SntpClient:
    """set_clock: takes an RTC datetime tuple (machine.RTC().datetime); report(now_ms, "ntp",
    text) gets every result. Polls only while `online` (the Wi-Fi up). may_block: a callable,
    True when a name lookup may block (wiring_link.py: the contactor is open); None: always."""

    def __init__(self, host, set_clock, report=None, port=_NTP_PORT, interval_s=3600,
                 start_jitter_s=60, wall=time.time, sock_module=socket, may_block=None):
        self._host = host
        self._may_block = may_block
        self._numeric = numeric_host(host)
        self._stale = False  # the kept address gave no reply: look it up again when allowed
        self._held = False  # a lookup waits (said once)
        self._port = port
        self._set_clock = set_clock
        self._report = report
        self._interval_ms = interval_s * 1000
        self._start_jitter_ms = start_jitter_s * 1000
        self._wall = wall
        self._socket = sock_module
        self._offset = epoch_offset()
        self._buf = bytearray(_PACKET)
        self._addr = None
        self._sock = None
        self._poller = None
        self._state = _IDLE
        self._next_at = None  # None: the first request is not planned yet
        self._backoff = Backoff(_RETRY_MIN_MS, max(self._interval_ms, _RETRY_MIN_MS), spread=False)
        self._sent_at = 0
        self._nonce = (0, 0)
        self._bad = None  # why the last datagram of this attempt was refused
        self.synced = 0  # good replies so far
        self.requests = 0

    def _emit(self, now_ms, text):
        if self._report is not None:
            self._report(now_ms, "ntp", text)

    def poll(self, now_ms, online=True):
        """One bounded, non-blocking step; call it every control loop."""
        if self._state == _WAITING:
            self._receive(now_ms)
            return
        if not online:
            return
        if self._next_at is None:  # RFC 4330 section 10: a fleet's restarts spread their requests
            spread = random.getrandbits(24) % (self._start_jitter_ms + 1)
            self._next_at = time.ticks_add(now_ms, spread)
        if time.ticks_diff(now_ms, self._next_at) >= 0:
            self._send(now_ms)

    def _send(self, now_ms):
        lookup = self._addr is None or self._stale
        if lookup and not (self._numeric or self._may_block is None or self._may_block()):
            if self._addr is None:  # nothing to send to: wait for the contactor (issue 10, item 19)
                if not self._held:
                    self._held = True
                    self._emit(now_ms, "%s: name lookup waits for the contactor to open" % self._host)
                return
            lookup = False  # the kept address serves until a lookup may block
        self._held = False
        self.requests += 1
        try:
            if lookup:
                self._addr = self._socket.getaddrinfo(self._host, self._port)[0][-1]
                self._stale = False
            sock = self._sock = self._socket.socket(self._socket.AF_INET, self._socket.SOCK_DGRAM)
            sock.setblocking(False)
            sock.connect(self._addr)  # replies from any other address or port are not ours
            buf = self._buf
            buf[:] = bytes(_PACKET)
            buf[0] = 0x23  # leap indicator 0, version 4, mode 3 (client)
            # Our transmit timestamp, echoed by the server: random, so a forged reply cannot
            # guess it (RFC 4330 section 5, check 3); the clock is not known anyway.
            self._nonce = (random.getrandbits(32), random.getrandbits(32))
            struct.pack_into("!II", buf, 40, self._nonce[0], self._nonce[1])
            sock.send(buf)
            self._poller = select.poll()
            self._poller.register(sock, select.POLLIN)
        except OSError as e:
            self._failed(now_ms, "cannot send to %s (%s)" % (self._host, e))
            return
        self._state = _WAITING
        self._sent_at = now_ms
        self._bad = None

    def _receive(self, now_ms):
        if self._poller.poll(0):
            try:
                data = self._sock.recv(_PACKET + 20)  # room to see a longer (authenticated) reply
                received = parse_reply(data, self._nonce)
            except OSError as e:  # e.g. ICMP port unreachable on the connected socket
                self._failed(now_ms, "no reply from %s (%s)" % (self._host, e))
                return
            except SntpError as e:
                if e.kiss is not None:  # section 8: a refusal ends the attempt
                    self._failed(now_ms, "%s refused: %s" % (self._host, e))
                    return
                self._bad = str(e)  # a stray or forged datagram: the real reply may follow
            else:
                self._good(now_ms, received)
                return
        if time.ticks_diff(now_ms, self._sent_at) >= _REPLY_MS:
            last = "" if self._bad is None else " (last: %s)" % self._bad
            self._failed(now_ms, "no valid reply from %s within %d s%s" % (
                self._host, _REPLY_MS // 1000, last))

    def _good(self, now_ms, received):
        server_rx, server_tx = received
        # RFC 4330 section 5: round trip d = (T4 - T1) - (T3 - T2); the time now is T3 + d / 2.
        trip_us = time.ticks_diff(now_ms, self._sent_at) * 1000 - (server_tx - server_rx)
        now_us = server_tx + max(0, trip_us) // 2
        unix_s = now_us // 1000000
        if not _MIN_UNIX <= unix_s < _MAX_UNIX:
            self._failed(now_ms, "%s answered an implausible time (%d)" % (self._host, unix_s))
            return
        self._close()
        before = self._wall() + self._offset
        self._set_clock(rtc_datetime(unix_s, now_us % 1000000, self._offset))
        self.synced += 1
        self._backoff.reset()
        self._next_at = time.ticks_add(now_ms, self._interval_ms)
        self._emit(now_ms, "clock set to %s from %s (was %s, step %+d s, round trip %d ms)" % (
            iso(unix_s, self._offset), self._host, iso(before, self._offset), unix_s - before,
            max(0, trip_us) // 1000))

    def _failed(self, now_ms, why):
        self._close()
        self._stale = True
        delay = self._backoff.next_ms()
        self._next_at = time.ticks_add(now_ms, delay)
        self._emit(now_ms, "%s; next try in %d s" % (why, delay // 1000))

    def _close(self):
        self._state = _IDLE
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
        self._sock = self._poller = None
