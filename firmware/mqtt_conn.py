"""One MQTT 3.1.1 connection over a non-blocking TCP or TLS socket, a bounded step at a time:
packets in and out, OSError(why) when it ends. Knows nothing of piles (docs/network.md, "The
MQTT connection": the pipe, the TLS steps)."""
import errno
import select
import socket
import sys
import time

from micropython import const

TYPE_CHECKING = const(False)  # mypy takes it as True (tools/typecheck.py); compiled out here
if TYPE_CHECKING:
    from typing import Any

# The in-buffer's size (link_setup.py's buffers, or wiring.py's at the settings: the same).
_IN_SIZE = const(1024)  # a command is at most 512 bytes (docs/commands.md) plus its topic
_CONNECT_MS = const(5000)  # TCP connect plus CONNACK; with TLS, the handshake, then the CONNACK
_STALL_MS = const(10000)  # out-buffer not draining
_MAX_PACKETS = const(4)  # broker packets handled per step (one PUBLISH at most)

DOWN = const(0)  # no connection
TCP = const(1)  # TCP connect under way
_CONNACK = const(2)  # CONNECT sent
UP = const(3)
TLS = const(4)  # TLS handshake under way, CONNECT waiting in the pipe
WRAP = const(5)  # TCP connected, CONNECT in the pipe: start_tls() next (the owner decides when)

_EAGAIN = errno.EAGAIN


class _Pipe:
    """What umqtt takes for its socket: write() appends to the out-buffer, read() gives bytes
    only from the one complete packet in `feed`, else EAGAIN. Buffers allocated once."""

    def __init__(self, size, buf=None):
        self.buf = bytearray(size) if buf is None else buf
        self.mv = memoryview(self.buf)
        self.head = 0  # next byte to send
        self.tail = 0  # end of the unsent bytes
        self.feed = None  # a complete packet umqtt may read
        self.pos = 0

    def setblocking(self, flag):
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
            # In place (memmove: the regions may overlap): a copy would be the link's biggest
            # allocation at run time, up to the whole buffer (issue 12).
            self.mv[0:self.pending()] = self.mv[self.head:self.tail]
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


def fixed_header(buf, n):
    """(header bytes, remaining length) of the packet at buf[0:n]; None until the header is all
    in. MQTT 3.1.1 section 2.2.3: the remaining length in 1-4 bytes of 7 bits, low first."""
    length = shift = 0
    i = 1
    while i < n:
        b = buf[i]
        length |= (b & 0x7F) << shift
        i += 1
        if not b & 0x80:
            return i, length
        shift += 7
        if i > 4:
            raise OSError("bad packet length")
    return None


def drop_setup():
    """link_setup.py, link_tls.py and link_reset.py off the heap (main.py's next collection frees
    them): the code of the boot, of TLS and of the board reset, never needed while the contactor
    is closed (issue 12 item 3)."""
    sys.modules.pop("link_setup", None)
    sys.modules.pop("link_tls", None)
    sys.modules.pop("link_reset", None)


def _tls_code():
    """link_tls.py, imported now (the contactor open). Its import failing (a fragmented heap's
    MemoryError, a damaged file's ValueError) is a failed connection attempt, retried with the
    backoff: up in main.run() it would reset the board, a session open or not."""
    try:
        import link_tls
    except (MemoryError, ImportError, ValueError, SyntaxError) as e:
        raise OSError("TLS code not loaded (%r)" % (e,)) from None
    return link_tls


def _would_block(e):
    return e.args and e.args[0] == _EAGAIN


class MqttConn:
    """client_id, user, password, will topic and message: bytes (will: QoS 1, retained).
    owner: told what arrives, by conn_up(now_ms), conn_puback(now_ms, packet id),
    conn_publish(now_ms, topic, msg) (only while conn_may_take()), conn_too_large(now_ms, size),
    and conn_report(now_ms, text) (a refused subscription too). tls: an SSLContext or None.
    bufs: (out-buffer, in-buffer), made by the caller first (None: link_setup.buffers())."""

    # Set by link_setup.setup_conn (annotations only: no code on the board).
    _owner: "Any"
    tls: "Any"
    _tls_name: "Any"
    _raw: "Any"
    _sock: "Any"
    _poller: "Any"
    _repeat: int
    _step_us: int
    _pipe: "_Pipe"
    _in: bytearray
    _in_mv: memoryview
    _in_len: int
    _skip: int
    _client: "Any"
    _message: "Any"
    _refused: int
    state: int
    _since: int
    _last_rx: int
    _ping_at: int
    _progress: int

    def __init__(self, owner, client_id, keepalive_s, user=None, password=None, will=None,
                 tls=None, tls_name=None, bufs=None):
        import link_setup  # dropped by the owner once built, or by close()

        link_setup.setup_conn(self, owner, client_id, keepalive_s, user, password, will, tls,
                              tls_name, bufs, _Pipe, DOWN)

    # -- opening ---------------------------------------------------------------------------------

    def open(self, addr, now_ms):
        """Starts the TCP connect to addr (a getaddrinfo address); OSError if it cannot."""
        sock = socket.socket()
        self._sock = self._raw = sock
        sock.setblocking(False)
        try:
            sock.connect(addr)
        except OSError as e:
            if e.args[0] != errno.EINPROGRESS:
                raise
        self._poller = select.poll()
        self._poller.register(sock, select.POLLOUT)
        self.state = TCP
        self._since = now_ms

    def start_tls(self, now_ms):
        """In WRAP: wraps the TCP socket, the handshake to run in the steps that follow. Only
        with the contactor open (the owner's to see): it loads link_tls.py."""
        _tls_code().start_tls(self, now_ms, select, TLS)

    def close(self):
        for sock in (self._sock, self._raw):  # a failed handshake leaves the TCP socket open
            if sock is not None:
                try:
                    sock.close()
                except OSError:
                    pass
        self._sock = self._raw = self._poller = None
        self.state = DOWN
        self._pipe.reset()
        self._in_len = self._skip = self._repeat = 0
        drop_setup()  # a handshake's, if one was under way

    # -- the step --------------------------------------------------------------------------------

    def step(self, now_ms):
        """One bounded, non-blocking step; OSError(why) when the connection has ended (close()
        it then)."""
        try:
            why = self._step(now_ms)
        except OSError as e:
            why = "connection lost (%s)" % e
        if why is not None:
            raise OSError(why)

    def _step(self, now_ms):
        state = self.state
        if state == TCP:
            return self._tcp_step(now_ms)
        if state == TLS:
            why = _tls_code().tls_step(self, now_ms, _CONNACK, _CONNECT_MS)  # loaded by start_tls
            if why is None and self.state != TLS:
                drop_setup()  # the handshake is done
            return why
        if state == WRAP:
            return None
        self.flush(now_ms)
        self._receive(now_ms)
        if self._refused:
            return "broker refused the connection (return code %d)" % self._refused
        if self.state == _CONNACK and time.ticks_diff(now_ms, self._since) > _CONNECT_MS:
            return "no CONNACK within %d s" % (_CONNECT_MS // 1000)
        if self.state == UP:
            keepalive_s = self._client.keepalive
            if time.ticks_diff(now_ms, self._last_rx) > keepalive_s * 1500:
                raise OSError("broker silent for 1.5 x keep-alive")
            if time.ticks_diff(now_ms, self._ping_at) >= keepalive_s * 500:
                self._ping_at = now_ms
                self._client.ping()
        return None

    def _tcp_step(self, now_ms):
        events = self._poller.poll(0)
        if not events:
            if time.ticks_diff(now_ms, self._since) > _CONNECT_MS:
                return "no TCP connection within %d s" % (_CONNECT_MS // 1000)
            return None
        if events[0][1] & (select.POLLERR | select.POLLHUP):
            return "connection refused"
        self._pipe.reset()
        self._in_len = self._skip = self._repeat = 0
        self._refused = 0
        self._connect_packet()
        self._last_rx = self._progress = now_ms
        if self.tls is not None:
            self.state = WRAP
            return None
        self._poller.modify(self._sock, select.POLLIN)
        self.state = _CONNACK
        self.flush(now_ms)
        return None

    def _connect_packet(self):
        """CONNECT (MQTT 3.1.1 section 3.1), clean session: a stale command must not run later.
        The bytes umqtt.simple's connect(True) writes, of the fields its client keeps (user, pswd,
        keepalive; lw_topic, lw_msg: the will)."""
        c = self._client
        flags = 0x02
        size = 12 + len(c.client_id)
        if c.user is not None:
            flags |= 0xC0
            size += 4 + len(c.user) + len(c.pswd)
        will = () if c.lw_topic is None else (c.lw_topic, c.lw_msg)
        if will:
            flags |= 0x2C  # will, QoS 1, retained
            size += 4 + len(will[0]) + len(will[1])
        head = bytearray(5)
        head[0] = 0x10
        i = 1
        while size > 0x7F:  # section 2.2.3: remaining length
            head[i] = (size & 0x7F) | 0x80
            size >>= 7
            i += 1
        head[i] = size
        pipe = self._pipe
        pipe.write(head, i + 1)
        ka = c.keepalive
        pipe.write(bytes((0, 4, 0x4D, 0x51, 0x54, 0x54, 4, flags, ka >> 8, ka & 0xFF)))
        for field in (c.client_id,) + will + (() if c.user is None else (c.user, c.pswd)):
            pipe.write(bytes((len(field) >> 8, len(field) & 0xFF)))  # section 1.5.3: a string
            pipe.write(field)

    # -- out -------------------------------------------------------------------------------------

    def room(self):
        """Free bytes in the out-buffer."""
        return self._pipe.free()

    def idle(self):
        """Nothing waits to be sent."""
        return not self._pipe.pending()

    def publish(self, topic, payload, retain=False, qos=1):
        """Writes the packet into the out-buffer; returns its packet id (QoS 1)."""
        try:
            self._client.publish(topic, payload, retain, qos)
        except OSError as e:  # umqtt now waits for the PUBACK: the owner does that
            if not _would_block(e):
                raise
        return self._client.pid

    def subscribe(self, topic):
        """QoS 1; a SUBACK that refuses it is reported (conn_report)."""
        try:
            self._client.subscribe(topic, 1)
        except OSError as e:
            if not _would_block(e):
                raise

    def unsubscribe(self, topic):
        """UNSUBSCRIBE (MQTT 3.1.1 section 3.10): umqtt.simple has none. Its UNSUBACK is only a
        sign of life here."""
        c = self._client
        c.pid = c.pid % 0xFFFF + 1
        size = 4 + len(topic)
        self._pipe.write(bytes((0xA2, size, c.pid >> 8, c.pid & 0xFF, len(topic) >> 8, len(topic) & 0xFF)))
        self._pipe.write(topic)

    def flush(self, now_ms):
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

    # -- in --------------------------------------------------------------------------------------

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
        while handled < _MAX_PACKETS and self.state != DOWN and not self._refused:
            n = self._in_len
            if self._skip:
                k = min(self._skip, n)
                self._consume(k)
                self._skip -= k
                if self._skip:
                    return
                continue
            header = fixed_header(buf, n)
            if header is None:
                return
            i, length = header
            total = i + length
            if total > _IN_SIZE:
                if not self._oversized(now_ms, buf[0], i, total):
                    return
                continue
            op = buf[0]
            if total > n or not self._packet(now_ms, op, total):
                return
            self._consume(total)
            handled += 1
            if op & 0xF0 == 0x30:
                return  # one PUBLISH per step

    def _oversized(self, now_ms, op, i, total):
        """A packet that cannot fit: only a PUBLISH may be that large. Its PUBACK goes out, the
        rest is skipped unread."""
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
        self._owner.conn_too_large(now_ms, total)
        self._skip = total
        return True

    def _packet(self, now_ms, op, total):
        """Handle one complete packet; False: not now (leave it in the buffer)."""
        kind = op & 0xF0
        buf = self._in
        if kind == 0x30:
            return self._publish_in(now_ms, op, total)
        self._last_rx = now_ms
        if kind == 0x20 and total == 4:  # CONNACK
            if self.state == _CONNACK:
                if buf[3]:
                    self._refused = buf[3]
                    return False
                self.state = UP
                self._ping_at = now_ms
                self._owner.conn_up(now_ms)
        elif kind == 0x40 and total == 4:  # PUBACK
            self._owner.conn_puback(now_ms, buf[2] << 8 | buf[3])
        elif kind == 0x90 and total >= 5 and buf[4] == 0x80:  # SUBACK: refused
            self._owner.conn_report(now_ms, "broker refused a subscription")
        return True  # PINGRESP and anything else: only the sign of life

    def _publish_in(self, now_ms, op, total):
        if op & 6 not in (0, 2):
            raise OSError("QoS 2 publish")  # we subscribe with QoS 1
        if not self._owner.conn_may_take() or self._pipe.free() < 4:
            return False
        self._last_rx = now_ms
        if self.state != UP:
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
        if message is not None:
            self._owner.conn_publish(now_ms, message[0], message[1])
        return True

    def _on_message(self, topic, msg):
        self._message = (topic, msg)
