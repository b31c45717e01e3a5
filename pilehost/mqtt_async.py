"""A small asyncio MQTT 3.1.1 client for the fleet generator (pilehost/fleet.py): thousands of
connections in one process, each one a pile's.

Why our own (about 150 lines) and not a library: paho (and aiomqtt, which wraps it) keeps a
client object with its own buffers, locks and timers per connection and is driven through
callbacks; gmqtt is little kept. The fleet needs the opposite: many cheap connections, the pile's
exact packets (clean session, the last will, QoS 1 with the packet id the outbox waits for) and
nothing else (no QoS 2, no MQTT 5, no automatic reconnect: the pile's backoff decides). The wire
format is MQTT 3.1.1 (OASIS, 2014) sections 2 and 3; `mqtt_wire.mqtt_packets` splits the same way.
"""
import asyncio
import struct

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = (
    1, 2, 3, 4, 8, 9, 12, 13, 14)
_PINGREQ = bytes((PINGREQ << 4, 0))
_DISCONNECT = bytes((DISCONNECT << 4, 0))


class MqttError(OSError):
    """The connection failed or was refused: the caller drops it and backs off."""


def remaining_length(n):
    """Section 2.2.3: 7 bits a byte, the high bit says more follow."""
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf8(data):
    if isinstance(data, str):
        data = data.encode("utf-8")
    return struct.pack("!H", len(data)) + data


def packet(kind_flags, body):
    return bytes((kind_flags,)) + remaining_length(len(body)) + body


def connect_packet(client_id, keepalive, will=None, clean=True, username=None, password=None):
    """will: (topic, payload bytes, qos, retain). Section 3.1."""
    flags = 0x02 if clean else 0
    payload = _utf8(client_id)
    if will is not None:
        topic, message, qos, retain = will
        flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
        payload += _utf8(topic) + _utf8(message)
    if username is not None:
        flags |= 0x80
        payload += _utf8(username)
        if password is not None:
            flags |= 0x40
            payload += _utf8(password)
    body = _utf8(b"MQTT") + bytes((4, flags)) + struct.pack("!H", keepalive) + payload
    return packet(CONNECT << 4, body)


def publish_packet(topic, payload, qos=0, retain=False, pid=0, dup=False):
    """Section 3.3; a packet id only with QoS > 0."""
    flags = (PUBLISH << 4) | (qos << 1) | (0x01 if retain else 0) | (0x08 if dup else 0)
    body = _utf8(topic) + (struct.pack("!H", pid) if qos else b"") + payload
    return packet(flags, body)


def subscribe_packet(pid, topics):
    """topics: [(filter, qos)]. Section 3.8 (the fixed header's flags are 0010)."""
    body = struct.pack("!H", pid) + b"".join(_utf8(t) + bytes((q,)) for t, q in topics)
    return packet((SUBSCRIBE << 4) | 0x02, body)


def puback_packet(pid):
    return bytes((PUBACK << 4, 2)) + struct.pack("!H", pid)


class Connection:
    """One client connection. on_message(topic, payload) for what arrives (QoS 1 acknowledged
    after it returns). `publish()` with QoS 1 returns once the PUBACK is in; every wait ends with
    MqttError when the connection goes."""

    def __init__(self, on_message=None):
        self.on_message = on_message
        self.reader = self.writer = None
        self._next_pid = 0
        self._waiting = {}  # packet id -> future (PUBACK, SUBACK)
        self._connack = None
        self._task = None
        self.closed = asyncio.Event()
        self.last_out = 0.0

    async def open(self, host, port, client_id, keepalive=60, will=None, timeout=10.0, local_addr=None,
                   username=None, password=None):
        loop = asyncio.get_running_loop()
        try:
            self.reader, self.writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, local_addr=local_addr), timeout)
        except (OSError, asyncio.TimeoutError) as e:
            raise MqttError("connect: %s" % (e or type(e).__name__)) from None
        self._connack = loop.create_future()
        self._task = asyncio.create_task(self._read_loop())
        self._send(connect_packet(client_id, keepalive, will, True, username, password))
        try:
            code = await asyncio.wait_for(asyncio.shield(self._connack), timeout)
        except asyncio.TimeoutError:
            self.close()
            raise MqttError("no CONNACK within %.0f s" % timeout) from None
        if code != 0:
            self.close()
            raise MqttError("CONNACK refused: return code %d" % code)

    def _send(self, data):
        if self.writer is None or self.closed.is_set():
            raise MqttError("not connected")
        self.writer.write(data)
        self.last_out = asyncio.get_running_loop().time()

    def _pid(self):
        for _ in range(65535):
            self._next_pid = self._next_pid % 65535 + 1
            if self._next_pid not in self._waiting:
                return self._next_pid
        raise MqttError("no free packet id")

    async def _wait(self, pid, timeout):
        fut = self._waiting[pid]
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise MqttError("no acknowledgement within %.0f s" % timeout) from None
        finally:
            self._waiting.pop(pid, None)

    async def publish(self, topic, payload, qos=0, retain=False, timeout=30.0):
        """QoS 1: until the PUBACK."""
        if qos == 0:
            self.publish_now(topic, payload, retain)
            return
        pid = self._pid()
        self._waiting[pid] = asyncio.get_running_loop().create_future()
        self._send(publish_packet(topic, payload, qos, retain, pid))
        await self._wait(pid, timeout)

    def publish_forget(self, topic, payload, retain=False):
        """QoS 1 without waiting: the PUBACK is taken and forgotten (status, acks: not kept)."""
        pid = self._pid()
        fut = self._waiting[pid] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda _f: self._waiting.pop(pid, None))
        self._send(publish_packet(topic, payload, 1, retain, pid))

    def publish_now(self, topic, payload, retain=False):
        """QoS 0 (meter values): written, nothing waited for."""
        self._send(publish_packet(topic, payload, 0, retain))

    async def subscribe(self, topics, timeout=30.0):
        pid = self._pid()
        self._waiting[pid] = asyncio.get_running_loop().create_future()
        self._send(subscribe_packet(pid, topics))
        codes = await self._wait(pid, timeout)
        if any(c == 0x80 for c in codes):
            raise MqttError("subscription refused")

    def ping(self):
        self._send(_PINGREQ)

    async def disconnect(self):
        try:
            self._send(_DISCONNECT)
            await self.writer.drain()
        except (OSError, MqttError):
            pass
        self.close()

    def close(self):
        if self.closed.is_set():
            return
        self.closed.set()
        if self.writer is not None:
            self.writer.close()
        for fut in list(self._waiting.values()) + [self._connack]:
            if fut is not None and not fut.done():
                fut.set_exception(MqttError("connection closed"))
                fut.exception()  # retrieved: no "never retrieved" warning for the forgotten ones
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()

    async def _read_loop(self):
        r = self.reader
        try:
            while True:
                first = (await r.readexactly(1))[0]
                length = shift = 0
                while True:
                    byte = (await r.readexactly(1))[0]
                    length |= (byte & 0x7F) << shift
                    if not byte & 0x80:
                        break
                    shift += 7
                    if shift > 21:
                        raise MqttError("bad remaining length")
                body = await r.readexactly(length) if length else b""
                self._packet(first >> 4, first & 0x0F, body)
        except (OSError, asyncio.IncompleteReadError, MqttError):
            pass
        finally:
            self.close()

    def _packet(self, kind, flags, body):
        if kind == CONNACK:
            if self._connack is not None and not self._connack.done():
                self._connack.set_result(body[1])
        elif kind in (PUBACK, SUBACK):
            pid = struct.unpack_from("!H", body)[0]
            fut = self._waiting.get(pid)
            if fut is not None and not fut.done():
                fut.set_result(body[2:])
        elif kind == PUBLISH:
            qos = (flags >> 1) & 3
            n = struct.unpack_from("!H", body)[0]
            topic = body[2:2 + n].decode("utf-8")
            at = 2 + n
            pid = None
            if qos:
                pid = struct.unpack_from("!H", body, at)[0]
                at += 2
            if self.on_message is not None:
                self.on_message(topic, body[at:])
            if qos:
                self._send(puback_packet(pid))
        # PINGRESP and the rest: nothing to do
