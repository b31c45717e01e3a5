"""The pile's MQTT link (docs/telemetry.md, docs/commands.md): one bounded step per control loop,
never waiting on the network.

umqtt.simple only builds and parses packets here. It is handed `_Pipe`, a stand-in socket:
write() appends to an out-buffer, read() gives bytes only from a complete packet this module
put there and raises EAGAIN otherwise, so umqtt's blocking waits (CONNACK in connect(), PUBACK
in publish(qos=1), SUBACK in subscribe()) end at once and this module waits for those packets
itself, a poll at a time. The real socket is non-blocking: connect() in the background, then
each poll writes what the socket takes, reads what has arrived and handles complete packets.

TLS (config.json mqtt.tls_ca): after the TCP connect the socket is wrapped with an SSLContext
that trusts only the configured CA (CERT_REQUIRED, the broker's name checked), without the
handshake. Each poll then offers the CONNECT packet to the TLS socket: mbedTLS takes the
handshake as far as the bytes that have arrived allow and accepts the packet once it is over.
On an ESP32 one such call (certificate check, ECDHE) costs tens to hundreds of ms of CPU, more
than the 100 ms in which C->B must open the contactor: a TLS connection is only attempted while
the contactor is open, and one under way when it closes is given up (the outbox keeps the
records). Once connected, records cost little (symmetric crypto). umqtt never sees the socket.

A host name (not a numeric address) is looked up with getaddrinfo, which blocks on a board:
only while the contactor is open (docs/network.md). The address is kept; after a failed
connection it is looked up again, with the contactor open; while it is closed the kept one
serves. A numeric address needs no lookup: use one on piles.
"""
import errno
import json
import random
import select
import socket
import time

from micropython import const

import charger as ch
import command_auth
import journal
from netaddr import numeric_host
from session_log import clock_synced, iso_utc
from umqtt import simple as umqtt

_OUT_SIZE = const(2048)  # unsent bytes; more than that and the connection is dropped
_IN_SIZE = const(1024)  # a command is at most 512 bytes (docs/commands.md) plus its topic
_ROOM = const(768)  # free out-buffer needed before building a publish (session/ended ~450 B)
_CONNECT_MS = const(5000)  # TCP connect plus CONNACK; with TLS, the handshake, then the CONNACK
_STALL_MS = const(10000)  # out-buffer not draining
_BACKOFF_MIN_MS = const(1000)
_BACKOFF_MAX_MS = const(60000)
_STATUS_MIN_GAP_MS = const(500)  # a flapping pilot does not flood the broker
_MAX_PACKETS = const(4)  # broker packets handled per poll (one PUBLISH at most)
_MAX_ACKS = const(4)  # cmd/ack waiting to go out; a full queue holds back the next command

_DOWN = const(0)  # waiting for the next attempt
_TCP = const(1)  # TCP connect under way
_CONNACK = const(2)  # CONNECT sent
_UP = const(3)
_TLS = const(4)  # TLS handshake under way, CONNECT waiting in the pipe

_EAGAIN = errno.EAGAIN
_RESULT = {"unknown_command": "unknown_command", "storage_error": "failed"}  # others: invalid
_RUNNING = ("charging", "suspended_ev", "suspended_evse")


class _Pipe:
    """What umqtt takes for its socket (see the module doc). Buffers allocated once."""

    def __init__(self, size):
        self.buf = bytearray(size)
        self.mv = memoryview(self.buf)
        self.head = 0  # next byte to send
        self.tail = 0  # end of the unsent bytes
        self.feed = None  # a complete packet umqtt may read
        self.pos = 0

    def connect(self, addr):
        pass

    def setblocking(self, flag):
        pass

    def settimeout(self, seconds):
        # umqtt.simple >= 1.4 calls it in connect(); the stock ESP32 image freezes that newer
        # umqtt.simple (ports/esp32/boards/manifest.py), ahead of /lib on sys.path.
        pass

    def close(self):
        pass

    def reset(self):
        self.head = self.tail = 0
        self.feed = None

    def pending(self):
        return self.tail - self.head

    def free(self):
        return len(self.buf) - self.pending()

    def write(self, data, n=None):
        if n is None:
            n = len(data)
        if self.tail + n > len(self.buf):
            if self.pending() + n > len(self.buf):
                raise OSError(errno.ENOBUFS)
            self.buf[0:self.pending()] = bytes(self.mv[self.head:self.tail])
            self.tail -= self.head
            self.head = 0
        self.mv[self.tail:self.tail + n] = memoryview(data)[:n]
        self.tail += n
        return n

    def read(self, n):
        f = self.feed
        if f is None or n < 0 or len(f) - self.pos < n:
            raise OSError(_EAGAIN)
        data = bytes(f[self.pos:self.pos + n])
        self.pos += n
        return data


class _SocketModule:
    """Stands in for umqtt.simple's `socket` module: the pipe, and the address looked up once."""

    def __init__(self, pipe, addr):
        self.pipe = pipe
        self.addr = addr

    def socket(self, *args):
        return self.pipe

    def getaddrinfo(self, *args):
        return [(None, None, None, None, self.addr)]


def _would_block(e):
    return e.args and e.args[0] == _EAGAIN


class MqttLink:
    """conf: config.json's mqtt section; ctl: the Controller (charger, meter, pilot output);
    log: the SessionLog (pile id, boot, the outbox journal); verifier: a CommandVerifier, or
    None to take no commands; reset: restarts the board (machine.reset)."""

    def __init__(self, conf, ctl, log, report=None, verifier=None, fw="0", board="",
                 reset=None, boot_ms=None, wall=time.time, tls=None):
        self._ctl = ctl
        self._log = log
        self._outbox = log.outbox
        self._report = report
        self._verifier = verifier
        self._fw = fw
        self._board = board
        self._reset = reset
        self._wall = wall
        self._host = conf.host
        self._port = conf.port
        self._tls = tls  # tls_context()'s SSLContext, or None: plain TCP
        self._tls_name = conf.tls_server_name or conf.host
        self._raw = None  # the TCP socket under the TLS one
        self._repeat = 0  # bytes of a write that would block: offered again, no more, no fewer
        self._held = False  # a TLS connection waits for the contactor to open
        self._step_us = 0  # longest handshake step of this attempt
        self._keepalive_ms = conf.keepalive_s * 1000
        self._status_ms = conf.status_interval_s * 1000
        self._meter_ms = conf.meter_interval_s * 1000
        pile = log.pile_id
        root = "evse/v1/%s/" % pile
        self._t_online = (root + "online").encode()
        self._t_status = (root + "status").encode()
        self._t_meter = (root + "meter").encode()
        self._t_ack = (root + "cmd/ack").encode()
        self._t_cmd = (root + "cmd").encode()
        self._t_outbox = {
            journal.KIND_SESSION_START: (root + "session/started").encode(),
            journal.KIND_SESSION_END: (root + "session/ended").encode(),
            journal.KIND_FAULT: (root + "fault").encode(),
            # No schema of its own yet: the cloud keeps it in its `rejected` table.
            journal.KIND_JOURNAL_FAULT: (root + "fault").encode(),
        }
        self._pipe = _Pipe(_OUT_SIZE)
        self._in = bytearray(_IN_SIZE)
        self._in_mv = memoryview(self._in)
        self._in_len = 0
        self._skip = 0  # bytes still to discard of a packet larger than the in-buffer
        user = None if conf.username is None else conf.username.encode()
        password = None if user is None else (conf.password or "").encode()
        c = self._client = umqtt.MQTTClient(pile.encode(), self._host, self._port, user, password,
                                            keepalive=conf.keepalive_s)
        c.set_last_will(self._t_online, self._online(False), retain=True, qos=1)
        c.set_callback(self._on_message)
        self._message = None
        self._addr = None
        self._stale = False  # the kept address failed to connect: look it up again when allowed
        self._lookup_held = False  # a lookup waits for the contactor to open (said once)
        self._numeric = numeric_host(self._host)
        self._shim = None
        self._sock = None
        self._poller = None
        self._state = _DOWN
        self.last_error = None  # why the last connection attempt or connection ended (diag.py)
        self._retry_at = 0 if boot_ms is None else boot_ms
        self._backoff = _BACKOFF_MIN_MS
        self._since = 0
        self._last_rx = 0
        self._ping_at = 0
        self._progress = 0
        self._last_now = boot_ms
        self._uptime_ms = 0
        self._todo_online = self._todo_status = self._todo_subscribe = False
        self._acks = []
        self._inflight = None  # (packet id, outbox seq)
        self._pending = None  # the outbox's pending() iterator
        self._drained_at = None  # outbox.next_seq when the iterator ran dry
        self._reboot = False
        # What the last status said, to publish on a change.
        self._s_state = self._s_pilot = self._s_offer = self._s_faults = None
        self._status_at = 0
        self._status_due = True
        self._meter_at = 0

    def _emit(self, now_ms, text):
        if self._report is not None:
            self._report(now_ms, "mqtt", text)

    @property
    def connected(self):
        return self._state == _UP

    # -- the step --------------------------------------------------------------------------------

    def poll(self, now_ms):
        """One bounded, non-blocking step; call it every control loop."""
        if self._last_now is not None:
            self._uptime_ms += time.ticks_diff(now_ms, self._last_now)
        self._last_now = now_ms
        self._watch(now_ms)
        state = self._state
        if state == _DOWN:
            if time.ticks_diff(now_ms, self._retry_at) >= 0:
                self._open(now_ms)
            return
        try:
            if state == _TCP:
                self._tcp_step(now_ms)
                return
            if state == _TLS:
                self._tls_step(now_ms)
                return
            self._flush(now_ms)
            self._receive(now_ms)
            if self._state == _CONNACK and time.ticks_diff(now_ms, self._since) > _CONNECT_MS:
                self._drop(now_ms, "no CONNACK within %d s" % (_CONNECT_MS // 1000))
            elif self._state == _UP:
                self._work(now_ms)
                self._flush(now_ms)
        except OSError as e:
            self._drop(now_ms, "connection lost (%s)" % e)

    # -- connection ------------------------------------------------------------------------------

    def _open(self, now_ms):
        if self._tls is not None and self._ctl.contactor.closed:
            if not self._held:  # said once per wait
                self._held = True
                self._emit(now_ms, "TLS connection waits for the contactor to open")
            return
        self._held = False
        # getaddrinfo blocks on a board (DNS): never with the contactor closed (issue 10, item 19).
        may_look_up = self._numeric or not self._ctl.contactor.closed
        if self._addr is None and not may_look_up:
            if not self._lookup_held:  # said once per wait
                self._lookup_held = True
                self._emit(now_ms, "%s: name lookup waits for the contactor to open" % self._host)
            return
        self._lookup_held = False
        try:
            if self._addr is None or self._stale and may_look_up:
                self._addr = socket.getaddrinfo(self._host, self._port)[0][-1]
                self._stale = False
                self._shim = _SocketModule(self._pipe, self._addr)
            sock = socket.socket()
            self._sock = self._raw = sock
            sock.setblocking(False)
            try:
                sock.connect(self._addr)
            except OSError as e:
                if e.args[0] != errno.EINPROGRESS:
                    raise
            self._poller = select.poll()
            self._poller.register(sock, select.POLLOUT)
        except OSError as e:
            self._drop(now_ms, "cannot connect (%s)" % e)
            return
        self._state = _TCP
        self._since = now_ms

    def _tcp_step(self, now_ms):
        events = self._poller.poll(0)
        if not events:
            if time.ticks_diff(now_ms, self._since) > _CONNECT_MS:
                self._drop(now_ms, "no TCP connection within %d s" % (_CONNECT_MS // 1000))
            return
        flags = events[0][1]
        if flags & (select.POLLERR | select.POLLHUP):
            self._drop(now_ms, "connection refused")
            return
        self._pipe.reset()
        self._in_len = self._skip = self._repeat = 0
        # connect() "opens" the pipe and writes CONNECT into it
        umqtt.socket = self._shim  # type: ignore[assignment]  # the module doc's stand-in
        try:
            self._client.connect(True)  # clean session: a stale command must not run later
        except OSError as e:
            if not _would_block(e):
                raise
        self._last_rx = self._progress = now_ms
        if self._tls is not None:
            self._start_tls(now_ms)
            return
        self._poller.modify(self._sock, select.POLLIN)
        self._state = _CONNACK
        self._flush(now_ms)

    def _start_tls(self, now_ms):
        if self._ctl.contactor.closed:
            self._drop(now_ms, "TLS connection given up: the contactor closed")
            return
        try:
            sock = self._tls.wrap_socket(self._raw, server_hostname=self._tls_name,
                                         do_handshake_on_connect=False)
        except OSError as e:  # no memory for mbedTLS's buffers
            self._drop(now_ms, "TLS setup failed (%s)" % e)
            return
        self._sock = sock
        self._poller = select.poll()
        self._poller.register(sock, select.POLLIN)
        self._state = _TLS
        self._since = now_ms
        self._step_us = 0

    def _tls_step(self, now_ms):
        """One handshake step: offer the CONNECT; taking it means the handshake is over."""
        if self._ctl.contactor.closed:  # the next step could outlast the 100 ms C->B limit
            self._drop(now_ms, "TLS handshake given up: the contactor closed")
            return
        pipe = self._pipe
        waiting = pipe.pending()
        t0 = time.ticks_us()
        try:
            self._flush(now_ms)
        except ValueError as e:  # mbedTLS: the certificate check failed, its reasons as text
            self._drop(now_ms, "TLS: broker certificate refused (%s)" % _one_line(e))
            return
        except OSError as e:
            self._drop(now_ms, "TLS handshake failed (%s)" % e)
            return
        finally:
            self._step_us = max(self._step_us, time.ticks_diff(time.ticks_us(), t0))
        if pipe.pending() < waiting:
            self._emit(now_ms, "TLS handshake done in %d ms, longest step %d.%d ms" % (
                time.ticks_diff(now_ms, self._since), self._step_us // 1000, self._step_us % 1000 // 100))
            self._state = _CONNACK
            self._since = self._last_rx = now_ms
        elif time.ticks_diff(now_ms, self._since) > _CONNECT_MS:
            self._drop(now_ms, "TLS handshake not finished within %d s" % (_CONNECT_MS // 1000))

    def _drop(self, now_ms, why):
        if self._state in (_DOWN, _TCP):  # no TCP connection: the address may have changed
            self._stale = True
        for sock in (self._sock, self._raw):  # a failed handshake leaves the TCP socket open
            if sock is not None:
                try:
                    sock.close()
                except OSError:
                    pass
        self._sock = self._raw = self._poller = None
        self._state = _DOWN
        self.last_error = why
        self._pipe.reset()
        self._in_len = self._skip = self._repeat = 0
        self._acks = []  # answers for a dead connection: the sender has given up
        self._inflight = self._pending = self._drained_at = None
        delay = self._backoff
        delay = delay // 2 + random.getrandbits(16) % (delay // 2 + 1)  # jitter: a fleet spreads out
        self._backoff = min(self._backoff * 2, _BACKOFF_MAX_MS)
        self._retry_at = time.ticks_add(now_ms, delay)
        self._emit(now_ms, "%s; next try in %d.%d s" % (why, delay // 1000, delay % 1000 // 100))

    def _up(self, now_ms):
        self._state = _UP
        self._backoff = _BACKOFF_MIN_MS
        self._ping_at = now_ms
        # docs/telemetry.md order: online, status, subscribe, the outbox, then live messages.
        self._todo_online = self._todo_status = True
        self._todo_subscribe = self._verifier is not None
        self._emit(now_ms, "connected to %s:%d" % (self._host, self._port))

    # -- bytes in and out ------------------------------------------------------------------------

    def _flush(self, now_ms):
        pipe = self._pipe
        if pipe.pending():
            # mbedTLS may already hold the bytes of a write that would block: it wants the same
            # call again (the same length), or it reports bytes it never sent.
            n = self._repeat or pipe.pending()
            sent = self._sock.write(pipe.mv[pipe.head:pipe.head + n])
            self._repeat = 0 if sent else n
            if sent:
                pipe.head += sent
                self._progress = now_ms
        if not pipe.pending():
            pipe.head = pipe.tail = 0
            self._progress = now_ms
        elif time.ticks_diff(now_ms, self._progress) > _STALL_MS:
            raise OSError("nothing sent for %d s" % (_STALL_MS // 1000))

    def _receive(self, now_ms):
        events = self._poller.poll(0)
        if events and self._in_len < _IN_SIZE:
            n = self._sock.readinto(self._in_mv[self._in_len:])
            if n == 0 or (n is None and events[0][1] & (select.POLLERR | select.POLLHUP)):
                raise OSError("closed by the broker")
            if n:
                self._in_len += n
        self._packets(now_ms)

    def _consume(self, n):
        left = self._in_len - n
        if left > 0:
            self._in[0:left] = self._in[n:self._in_len]  # a copy first: overlap is safe
        self._in_len = left

    def _packets(self, now_ms):
        buf = self._in
        handled = 0
        while handled < _MAX_PACKETS and self._state != _DOWN:
            n = self._in_len
            if self._skip:
                k = min(self._skip, n)
                self._consume(k)
                self._skip -= k
                if self._skip:
                    return
                continue
            if n < 2:
                return
            length = shift = 0
            i = 1
            while True:  # MQTT 3.1.1 section 2.2.3: remaining length, 1-4 bytes
                if i >= n:
                    return
                b = buf[i]
                length |= (b & 0x7F) << shift
                i += 1
                if not b & 0x80:
                    break
                shift += 7
                if i > 4:
                    raise OSError("bad packet length")
            total = i + length
            if total > _IN_SIZE:
                if not self._oversized(now_ms, buf[0], i, total):
                    return
                continue
            op = buf[0]
            if total > n or not self._packet(now_ms, op, i, total):
                return
            self._consume(total)
            handled += 1
            if op & 0xF0 == 0x30:
                return  # one command per poll

    def _oversized(self, now_ms, op, i, total):
        """A packet that cannot fit: only a PUBLISH may be that large (an oversized command).
        Its PUBACK goes out, the rest is skipped unread: `too_large` has no id to answer."""
        buf = self._in
        if op & 0xF0 != 0x30 or op & 6 not in (0, 2):
            raise OSError("packet too large")
        if self._in_len < i + 4:
            return False
        need = i + 2 + (buf[i] << 8 | buf[i + 1]) + (2 if op & 6 else 0)
        if need > _IN_SIZE:
            raise OSError("topic too long")
        if self._in_len < need or self._pipe.free() < 4:
            return False
        if op & 6:
            self._pipe.write(bytes((0x40, 2, buf[need - 2], buf[need - 1])))
        self._last_rx = now_ms
        self._emit(now_ms, "command refused: too_large (%d bytes)" % total)
        self._skip = total
        return True

    def _packet(self, now_ms, op, i, total):
        """Handle one complete packet; False: not now (leave it in the buffer)."""
        kind = op & 0xF0
        buf = self._in
        if kind == 0x30:
            return self._publish_in(now_ms, op, total)
        self._last_rx = now_ms
        if kind == 0x20 and total == 4:  # CONNACK
            if self._state == _CONNACK:
                if buf[3]:
                    self._drop(now_ms, "broker refused the connection (return code %d)" % buf[3])
                    return False
                self._up(now_ms)
        elif kind == 0x40 and total == 4:  # PUBACK
            inflight = self._inflight
            if inflight is not None and inflight[0] == buf[2] << 8 | buf[3]:
                self._inflight = None
                try:
                    self._outbox.ack(inflight[1])
                except OSError as e:  # it is sent again after the next connect: a duplicate
                    self._emit(now_ms, "outbox ack failed (%s)" % e)
        elif kind == 0x90 and total >= 5:  # SUBACK
            if buf[4] == 0x80:
                self._emit(now_ms, "broker refused the command subscription")
        return True  # PINGRESP and anything else: only the sign of life

    def _publish_in(self, now_ms, op, total):
        if op & 6 not in (0, 2):
            raise OSError("QoS 2 publish")  # we subscribe with QoS 1
        if len(self._acks) >= _MAX_ACKS or self._pipe.free() < 4:
            return False
        self._last_rx = now_ms
        if self._state != _UP:
            return True
        pipe = self._pipe
        pipe.feed = self._in_mv[:total]
        pipe.pos = 0
        self._message = None
        try:
            self._client.wait_msg()  # calls _on_message, writes the PUBACK into the pipe
        except OSError as e:
            if _would_block(e):
                raise OSError("malformed publish") from None
            raise
        finally:
            pipe.feed = None
        message = self._message
        self._message = None
        if message is not None and message[0] == self._t_cmd:
            self._command(now_ms, message[1])
        return True

    def _on_message(self, topic, msg):
        self._message = (topic, msg)

    # -- what goes out ---------------------------------------------------------------------------

    def _work(self, now_ms):
        if time.ticks_diff(now_ms, self._last_rx) > self._keepalive_ms * 3 // 2:
            raise OSError("broker silent for 1.5 x keep-alive")
        if time.ticks_diff(now_ms, self._ping_at) >= self._keepalive_ms // 2:
            self._ping_at = now_ms
            self._client.ping()
        if self._pipe.free() < _ROOM:
            return
        if self._reboot:
            if not self._acks and not self._pipe.pending():
                self._reboot = False
                self._emit(now_ms, "rebooting (remote command)")
                self._ctl.safe_off()  # contactor open first: never rely on the reset's pin state
                if self._reset is not None:
                    self._reset()
        if self._todo_online:
            self._todo_online = False
            self._publish(self._t_online, self._online(True), retain=True)
        elif self._todo_status:
            self._todo_status = False
            self._publish_status(now_ms)
        elif self._todo_subscribe:
            self._todo_subscribe = False
            try:
                self._client.subscribe(self._t_cmd, 1)
            except OSError as e:
                if not _would_block(e):
                    raise
        elif self._acks:
            self._publish(self._t_ack, self._acks.pop(0))
        elif self._inflight is None and self._send_record():
            pass
        elif self._status_due and time.ticks_diff(now_ms, self._status_at) >= _STATUS_MIN_GAP_MS \
                or time.ticks_diff(now_ms, self._status_at) >= self._status_ms:
            self._publish_status(now_ms)
        elif time.ticks_diff(now_ms, self._meter_at) >= self._meter_ms:
            self._meter_at = now_ms
            payload = self._meter_payload()
            if payload is not None:
                self._publish(self._t_meter, payload, qos=0)

    def _publish(self, topic, payload, retain=False, qos=1):
        """Writes the packet into the pipe; returns its packet id (QoS 1)."""
        try:
            self._client.publish(topic, payload, retain, qos)
        except OSError as e:  # umqtt now waits for the PUBACK: this module does that
            if not _would_block(e):
                raise
        return self._client.pid

    def _send_record(self):
        """The oldest unacknowledged outbox record, one in flight at a time."""
        outbox = self._outbox
        while True:
            if self._pending is None:
                if self._drained_at == outbox.next_seq:
                    return False
                self._pending = outbox.pending()
            try:
                seq, kind, payload = next(self._pending)
            except StopIteration:
                self._pending = None
                self._drained_at = outbox.next_seq
                return False
            topic = self._t_outbox.get(kind)
            if topic is not None:
                self._inflight = (self._publish(topic, payload), seq)
                return True
            outbox.ack(seq)  # a kind the link does not publish (live data): nothing to keep

    # -- status, meter, online -------------------------------------------------------------------

    def _offer_ma(self):
        return self._ctl.charger.offer_ma if self._ctl.output.pwm_on else 0

    def _watch(self, now_ms):
        """A status goes out on every change of state, pilot, offer or faults (no allocation)."""
        c = self._ctl.charger
        if c.state != self._s_state or c.pilot != self._s_pilot or c.faults != self._s_faults \
                or self._offer_ma() != self._s_offer:
            self._status_due = True

    def _session(self):
        s = self._ctl.record or self._ctl.charger.session
        return s if s is not None and s.id is not None else None

    def _publish_status(self, now_ms):
        c = self._ctl.charger
        self._s_state = c.state
        self._s_pilot = c.pilot
        self._s_faults = c.faults
        offer = self._s_offer = self._offer_ma()
        self._status_due = False
        self._status_at = now_ms
        s = self._session()
        meter = self._ctl.meter
        reading = None if meter is None else meter.reading
        power = None if reading is None or reading.power_w is None else max(0, int(reading.power_w))
        wall = self._wall()
        self._publish(self._t_status, json.dumps({
            "v": 1, "ts": iso_utc(wall), "clock_synced": clock_synced(wall), "boot": self._log.boot,
            "uptime_s": self._uptime_ms // 1000, "state": c.state, "pilot": c.pilot,
            "offer_a": round(offer / 100) / 10 if offer else 0, "power_w": power,
            "session_id": None if s is None else s.id,
            "session_energy_wh": 0 if s is None else max(0, s.energy_wh or 0),
            "faults": ch.fault_list(c.faults), "fw": self._fw, "board": self._board,
        }).encode(), retain=True)

    def _meter_payload(self):
        s = self._session()
        meter = self._ctl.meter
        reading = None if meter is None else meter.reading
        if s is None or reading is None or self._ctl.charger.state not in _RUNNING:
            return None
        wall = self._wall()
        return json.dumps({
            "v": 1, "session_id": s.id, "ts": iso_utc(wall), "clock_synced": clock_synced(wall),
            "meter_wh": reading.energy_wh, "session_energy_wh": max(0, s.energy_wh or 0),
            "power_w": max(0, int(reading.power_w or 0)),
            "current_a": _one_decimal(reading.current_a), "voltage_v": _one_decimal(reading.voltage_v),
        }).encode()

    def _online(self, online):
        return json.dumps({"v": 1, "online": online, "boot": self._log.boot}).encode()

    # -- commands (docs/commands.md) -------------------------------------------------------------

    def _command(self, now_ms, raw):
        try:
            cmd = self._verifier.verify(raw)
        except command_auth.CommandError as e:  # str(e): fixed texts, never the payload or key
            self._emit(now_ms, "command refused: %s" % e)
            if e.command_id is not None and e.cmd is not None:
                self._ack(now_ms, e.command_id, e.cmd, _RESULT.get(e.code, "invalid"), str(e))
            return
        except MemoryError:  # a fragmented heap: refuse this one (nothing changed), keep running
            self._emit(now_ms, "command refused: out of memory")
            return
        result, reason = self._apply(now_ms, cmd)
        self._emit(now_ms, "command %s %s: %s%s" % (cmd.cmd, cmd.id, result,
                                                    "" if reason is None else ", " + reason))
        self._ack(now_ms, cmd.id, cmd.cmd, result, reason)

    def _apply(self, now_ms, cmd):
        """(result, reason) of an authentic command, per the cmd_ack schema."""
        name = cmd.cmd
        args = cmd.args
        charger = self._ctl.charger
        if name == "remote_start":
            if charger.authorize(now_ms, "remote", args["auth_id"]):
                return "accepted", None
            if charger.availability_wanted != ch.AVAILABLE:
                return "rejected", "out of service"
            s = charger.session
            if s is None:
                return "rejected", "no car plugged in"
            if s.authorized:
                return "rejected", "already authorised"
            return "rejected", "not in this state"
        if name == "remote_stop":
            if charger.remote_stop(now_ms):
                return "accepted", None
            return "rejected", "no session"
        if name == "set_current_limit":
            amps = args["amps"]
            note = charger.set_remote_limit(None if amps is None else int(amps * 1000))
            self._status_due = True
            return "accepted", note  # None, or why it was not saved to flash
        if name == "clear_fault":
            text = self._ctl.clear_fault(now_ms, args["fault"])
            if text.startswith("cleared"):  # "cleared, but not saved to flash ...": say so
                return "accepted", None if text == "cleared" else text[len("cleared, but "):]
            return "rejected", text
        if name == "request_status":
            self._todo_status = True
            return "accepted", None
        if name == "reboot":
            self._reboot = True
            return "accepted", None
        if name == "set_availability":
            # OCPP 1.6 "Scheduled" has no result of its own: accepted, the reason says so.
            return "accepted", charger.set_availability(now_ms, args["state"])
        return "unknown_command", None

    def _ack(self, now_ms, cmd_id, cmd, result, reason):
        wall = self._wall()
        self._acks.append(json.dumps({
            "v": 1, "cmd_id": cmd_id, "cmd": cmd, "result": result, "reason": reason,
            "ts": iso_utc(wall), "clock_synced": clock_synced(wall)}).encode())


def _one_line(e):
    """mbedTLS's verification reasons come one per line."""
    return "; ".join(line for line in str(e).split("\n") if line)


_PEM_BEGIN = b"-----BEGIN CERTIFICATE-----"
_PEM_END = b"-----END CERTIFICATE-----"


def tls_context(ca):
    """An SSLContext trusting only the certificates in `ca` (the bytes of the tls_ca file: PEM,
    one certificate or several, or one DER certificate). ValueError if one is not usable."""
    import binascii
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # micropython-lib's ssl starts at CERT_NONE. The ESP32 has verify_mode; its stub lacks it.
    ctx.verify_mode = ssl.CERT_REQUIRED  # type: ignore[attr-defined]
    start = ca.find(_PEM_BEGIN)
    if start < 0:
        ctx.load_verify_locations(cadata=ca)
        return ctx
    while start >= 0:
        end = ca.find(_PEM_END, start)
        if end < 0:
            raise ValueError("no END CERTIFICATE line")
        # Decoded here: some builds' mbedTLS (the unix port's) parse DER only.
        ctx.load_verify_locations(cadata=binascii.a2b_base64(ca[start + len(_PEM_BEGIN):end]))
        start = ca.find(_PEM_BEGIN, end)
    return ctx


def _one_decimal(values):
    if values is None:
        return None
    if not isinstance(values, (list, tuple)):
        values = (values,)
    return [round(max(0, v) * 10) / 10 for v in values]
