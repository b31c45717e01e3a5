"""One MQTT 3.1.1 connection over a non-blocking TCP or TLS socket, a bounded step at a time:
packets in and out, OSError(why) when it ends. Knows nothing of piles (docs/network.md, "The
MQTT connection": the pipe, the TLS steps)."""
import errno
import select
import socket
import time

from micropython import const

from umqtt import simple as umqtt

_OUT_SIZE = const(2048)  # unsent bytes; more than that and the connection is dropped
_IN_SIZE = const(1024)  # a command is at most 512 bytes (docs/commands.md) plus its topic
_CONNECT_MS = const(5000)  # TCP connect plus CONNACK; with TLS, the handshake, then the CONNACK
_STALL_MS = const(10000)  # out-buffer not draining
_MAX_PACKETS = const(4)  # broker packets handled per step (one PUBLISH at most)

DOWN = const(0)  # no connection
TCP = const(1)  # TCP connect under way
CONNACK = const(2)  # CONNECT sent
UP = const(3)
TLS = const(4)  # TLS handshake under way, CONNECT waiting in the pipe
WRAP = const(5)  # TCP connected, CONNECT in the pipe: start_tls() next (the owner decides when)

_EAGAIN = errno.EAGAIN


class _Pipe:
    """What umqtt takes for its socket: write() appends to the out-buffer, read() gives bytes
    only from the one complete packet in `feed`, else EAGAIN. Buffers allocated once."""

    def __init__(self, size):
        self.buf = bytearray(size)
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


def _would_block(e):
    return e.args and e.args[0] == _EAGAIN


def _one_line(e):
    """mbedTLS's verification reasons come one per line."""
    return "; ".join(line for line in str(e).split("\n") if line)


class MqttConn:
    """client_id, user, password, will topic and message: bytes (will: QoS 1, retained).
    owner: told what arrives, by conn_up(now_ms), conn_puback(now_ms, packet id),
    conn_publish(now_ms, topic, msg) (only while conn_may_take()), conn_too_large(now_ms, size),
    conn_suback(now_ms, return code), and conn_report(now_ms, text). tls: an SSLContext or None."""

    def __init__(self, owner, client_id, keepalive_s, user=None, password=None, will=None,
                 tls=None, tls_name=None):
        self._owner = owner
        self._keepalive_ms = keepalive_s * 1000
        self.tls = tls
        self._tls_name = tls_name
        self._raw = None  # the TCP socket under the TLS one
        self._sock = None
        self._poller = None
        self._repeat = 0  # bytes of a write that would block: offered again, no more, no fewer
        self._step_us = 0  # longest handshake step of this attempt
        self._pipe = _Pipe(_OUT_SIZE)
        self._in = bytearray(_IN_SIZE)
        self._in_mv = memoryview(self._in)
        self._in_len = 0
        self._skip = 0  # bytes still to discard of a packet larger than the in-buffer
        self._user = user
        self._password = password
        self._will = will  # (topic, message)
        # umqtt builds PUBLISH, SUBSCRIBE, PINGREQ and parses PUBLISH, into and from the pipe;
        # CONNECT is built here (connect() would open a socket of its own).
        c = self._client = umqtt.MQTTClient(client_id, None, 1883, keepalive=keepalive_s)
        c.sock = self._pipe
        c.set_callback(self._on_message)
        self._message = None
        self._refused = 0  # CONNACK's return code, when not 0
        self.state = DOWN
        self._since = 0
        self._last_rx = 0
        self._ping_at = 0
        self._progress = 0

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
        """In WRAP: wraps the TCP socket, the handshake to run in the steps that follow."""
        try:
            sock = self.tls.wrap_socket(self._raw, server_hostname=self._tls_name,
                                        do_handshake_on_connect=False)
        except OSError as e:  # no memory for mbedTLS's buffers
            raise OSError("TLS setup failed (%s)" % e) from None
        self._sock = sock
        self._poller = select.poll()
        self._poller.register(sock, select.POLLIN)
        self.state = TLS
        self._since = now_ms
        self._step_us = 0

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
            return self._tls_step(now_ms)
        if state == WRAP:
            return None
        self.flush(now_ms)
        self._receive(now_ms)
        if self._refused:
            return "broker refused the connection (return code %d)" % self._refused
        if self.state == CONNACK and time.ticks_diff(now_ms, self._since) > _CONNECT_MS:
            return "no CONNACK within %d s" % (_CONNECT_MS // 1000)
        if self.state == UP:
            if time.ticks_diff(now_ms, self._last_rx) > self._keepalive_ms * 3 // 2:
                raise OSError("broker silent for 1.5 x keep-alive")
            if time.ticks_diff(now_ms, self._ping_at) >= self._keepalive_ms // 2:
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
        self.state = CONNACK
        self.flush(now_ms)
        return None

    def _tls_step(self, now_ms):
        """One handshake step: offer the CONNECT; taking it means the handshake is over."""
        pipe = self._pipe
        waiting = pipe.pending()
        t0 = time.ticks_us()
        try:
            self.flush(now_ms)
        except ValueError as e:  # mbedTLS: the certificate check failed, its reasons as text
            return "TLS: broker certificate refused (%s)" % _one_line(e)
        except OSError as e:
            return "TLS handshake failed (%s)" % e
        finally:
            self._step_us = max(self._step_us, time.ticks_diff(time.ticks_us(), t0))
        if pipe.pending() < waiting:
            self._owner.conn_report(now_ms, "TLS handshake done in %d ms, longest step %d.%d ms" % (
                time.ticks_diff(now_ms, self._since), self._step_us // 1000, self._step_us % 1000 // 100))
            self.state = CONNACK
            self._since = self._last_rx = now_ms
        elif time.ticks_diff(now_ms, self._since) > _CONNECT_MS:
            return "TLS handshake not finished within %d s" % (_CONNECT_MS // 1000)
        return None

    def _connect_packet(self):
        """CONNECT (MQTT 3.1.1 section 3.1), clean session: a stale command must not run later.
        The bytes umqtt.simple's connect(True) writes."""
        c = self._client
        flags = 0x02
        size = 12 + len(c.client_id)
        if self._user is not None:
            flags |= 0xC0
            size += 4 + len(self._user) + len(self._password)
        if self._will is not None:
            flags |= 0x2C  # will, QoS 1, retained
            size += 4 + len(self._will[0]) + len(self._will[1])
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
        ka = self._keepalive_ms // 1000
        pipe.write(bytes((0, 4, 0x4D, 0x51, 0x54, 0x54, 4, flags, ka >> 8, ka & 0xFF)))
        for field in (c.client_id,) + (self._will or ()) + (
                () if self._user is None else (self._user, self._password)):
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
        """QoS 1; the SUBACK comes to conn_suback."""
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
            if self.state == CONNACK:
                if buf[3]:
                    self._refused = buf[3]
                    return False
                self.state = UP
                self._ping_at = now_ms
                self._owner.conn_up(now_ms)
        elif kind == 0x40 and total == 4:  # PUBACK
            self._owner.conn_puback(now_ms, buf[2] << 8 | buf[3])
        elif kind == 0x90 and total >= 5:  # SUBACK
            self._owner.conn_suback(now_ms, buf[4])
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
