"""The MQTT link's TLS (docs/network.md, "The MQTT connection"): the context made at the boot
from the broker's CA, and the handshake of each connection. Run only with the contactor open
(a TLS connection waits for the open, a handshake is given up when it closes: mqtt_link.py),
so loaded only then and dropped after, as link_setup.py (issue 12 item 3): a pile without TLS
never loads it."""
import time

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


def start_tls(conn, now_ms, select, tls_state):
    """mqtt_conn.MqttConn.start_tls's work: wraps the TCP socket, the handshake to run in the
    steps that follow. select: the module mqtt_conn polls with (the host tests' stand-in);
    tls_state: mqtt_conn.TLS (given: this module does not import mqtt_conn, which imports it)."""
    try:
        sock = conn.tls.wrap_socket(conn._raw, server_hostname=conn._tls_name,
                                    do_handshake_on_connect=False)
    except OSError as e:  # no memory for mbedTLS's buffers
        raise OSError("TLS setup failed (%s)" % e) from None
    conn._sock = sock
    conn._poller = select.poll()
    conn._poller.register(sock, select.POLLIN)
    conn.state = tls_state
    conn._since = now_ms
    conn._step_us = 0


def _one_line(e):
    """mbedTLS's verification reasons come one per line."""
    return "; ".join(line for line in str(e).split("\n") if line)


def tls_step(conn, now_ms, connack_state, connect_ms):
    """One handshake step: offer the CONNECT; taking it means the handshake is over. The text
    of why the connection ends, or None. connack_state, connect_ms: mqtt_conn's _CONNACK and
    _CONNECT_MS (private: passed in)."""
    pipe = conn._pipe
    waiting = pipe.pending()
    t0 = time.ticks_us()
    try:
        conn.flush(now_ms)
    except ValueError as e:  # mbedTLS: the certificate check failed, its reasons as text
        return "TLS: broker certificate refused (%s)" % _one_line(e)
    except OSError as e:
        return "TLS handshake failed (%s)" % e
    finally:
        conn._step_us = max(conn._step_us, time.ticks_diff(time.ticks_us(), t0))
    if pipe.pending() < waiting:
        conn._owner.conn_report(now_ms, "TLS handshake done in %d ms, longest step %d.%d ms" % (
            time.ticks_diff(now_ms, conn._since), conn._step_us // 1000, conn._step_us % 1000 // 100))
        conn.state = connack_state
        conn._since = conn._last_rx = now_ms
    elif time.ticks_diff(now_ms, conn._since) > connect_ms:
        return "TLS handshake not finished within %d s" % (connect_ms // 1000)
    return None
