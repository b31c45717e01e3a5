"""The MQTT link's code that runs only with the contactor open (issue 12 item 3): its set-up at
the boot (the TLS context and handshake: link_tls.py, the escalation reset: link_reset.py,
loaded the same way).

On a stock image the bytecode of every module loaded stays on the heap: this one is imported
when it is needed and dropped after (mqtt_conn.drop_setup: out of sys.modules, freed by main.py's
next collection), as ota_lazy.py does for ota.py. A .mpy import costs chip time that a closed
contactor's iteration does not have (10 ms between pilot reads), so nothing here is ever
reached with the contactor closed: the boot is open; the link starts TLS and steps a
handshake only while open (a TLS connection waits for the open). What runs while closed (a
plain TCP reconnect, commands, status, the Wi-Fi rung) stays in mqtt_link.py, mqtt_conn.py and
link_heal.py (host_tests/test_link_setup.py)."""
import gc
import sys
import time

from micropython import const

from backoff import Backoff

_BACKOFF_MIN_MS = const(1000)  # mqtt_link.py's _BACKOFF_MIN_MS
_BACKOFF_MAX_MS = const(60000)
_OUT_SIZE = const(2048)  # unsent bytes; more than that and the connection is dropped
_IN_SIZE = const(1024)  # mqtt_conn.py's _IN_SIZE


# -- the boot --------------------------------------------------------------------------------------

def setup_link(link, bufs, conf, ctl, log, report, verifier, fw, board, reset, boot_ms, wall, tls,
               ota, heal_store, reset_cause, made, numeric_host):
    """mqtt_link.MqttLink.__init__'s work (its arguments there). made: (PileView, MqttConn, the
    telemetry module, the link_heal module), given by mqtt_link.py: this module imports none of
    the link's modules, which import it (the firmware's imports run one way). numeric_host: found by
    wiring_link.link_parts on the pile, before this peak; None (a link the tests make): here."""
    pile_view, mqtt_conn_class, telemetry, link_heal = made
    gc.collect()  # this module's import garbage: the heap is at its fullest at the boot's end
    # The plain values first: the instance dict grows to its 47 slots (376 B, the set-up's largest
    # block) now, before the objects below take the heap's last holes.
    link._ota = ota  # ota.Updater (docs/ota.md), or None
    link._commands = None  # remote commands: only with a verifier (set by MqttLink), else never loaded
    link._log = log
    link._report = report
    link._verifier = verifier
    link._fw = fw
    link._board = board
    link._reset = reset
    link._wall = wall
    link._conf = conf  # config.json's mqtt section: the broker, the intervals (main.py keeps it)
    link._held = False  # a TLS connection or a name lookup waits for the contactor to open (said once)
    link._addr = None
    link._stale = False  # the kept address failed to connect: look it up again when allowed
    if numeric_host is None:
        had = "netaddr" in sys.modules  # sntp.py's too
        import netaddr

        numeric_host = netaddr.numeric_host(conf.host)
        if not had:
            sys.modules.pop("netaddr", None)
    link._numeric = numeric_host
    link.last_error = None  # why the last connection attempt or connection ended (diag.py)
    link._retry_at = 0 if boot_ms is None else boot_ms
    link._uptime_ms = 0
    link._todo_online = link._todo_status = link._todo_subscribe = False
    link._cmd_in = None  # a command received in this step, verified after it (poll)
    link._inflight = None  # (packet id, outbox seq)
    link._pending = None  # the outbox's pending() iterator
    link._drained_at = None  # outbox.next_seq when the iterator ran dry
    link._reboot = False
    # What the last status said, to publish on a change.
    link._s_state = link._s_pilot = link._s_offer = link._s_faults = link._s_limit = None
    link._s_limit_source = link._s_stale = None
    link._status_at = 0
    link._status_due = True
    link._meter_at = 0
    link.station = None
    link._cause = "unknown" if reset_cause is None else reset_cause
    link._health_at = 0
    link._todo_health = False
    # Then the objects.
    link._pile = pile_view(ctl)
    t = link._topics = setup_topics(telemetry.Topics(), log.pile_id)
    user = None if conf.username is None else conf.username.encode()
    password = None if user is None else (conf.password or "").encode()
    link._conn = mqtt_conn_class(link, log.pile_id.encode(), conf.keepalive_s, user, password,
                          will=(t.online, telemetry.online(False, log.boot)), tls=tls,
                          tls_name=conf.tls_server_name or conf.host, bufs=bufs)
    link._backoff = Backoff(_BACKOFF_MIN_MS, _BACKOFF_MAX_MS)
    link._acks = []
    if ota is not None:
        ota.bind(link._pile, t, log.boot, report, wall)
    gc.collect()  # the connection's making (the instance dicts' old tables, the topics' text)
    # A link that heals itself (link_heal.py, docs/network.md).
    start = time.ticks_ms() if boot_ms is None else boot_ms
    link._heal = link_heal.Ladder(conf, heal_store, start)
    link._loop = link_heal.LoopFigures(boot_ms)
    link._ob_age = link_heal.OutboxAge(log.outbox, start)


def buffers():
    """(out-buffer, in-buffer): the link's largest allocations. On the pile wiring.py makes them
    at the settings, while the heap is still whole, and hands them over; made here for a link
    built without them (the host tests' boards)."""
    return bytearray(_OUT_SIZE), bytearray(_IN_SIZE)


def setup_conn(conn, owner, client_id, keepalive_s, user, password, will, tls, tls_name, bufs,
               pipe_class, down):
    """mqtt_conn.MqttConn.__init__'s work (its arguments there; pipe_class and down: its _Pipe
    and DOWN, given: this module does not import mqtt_conn, which imports it)."""
    from umqtt import simple as umqtt

    out, conn._in = buffers() if bufs is None else bufs
    conn._pipe = pipe = pipe_class(len(out), out)
    conn._owner = owner
    conn.tls = tls
    conn._tls_name = tls_name
    conn._raw = None  # the TCP socket under the TLS one
    conn._sock = None
    conn._poller = None
    conn._repeat = 0  # bytes of a write that would block: offered again, no more, no fewer
    conn._step_us = 0  # longest handshake step of this attempt
    conn._in_mv = memoryview(conn._in)
    conn._in_len = 0
    conn._skip = 0  # bytes still to discard of a packet larger than the in-buffer
    # umqtt builds PUBLISH, SUBSCRIBE, PINGREQ and parses PUBLISH, into and from the pipe;
    # CONNECT is built by mqtt_conn of the fields umqtt keeps (connect() would open a socket of
    # its own).
    c = conn._client = umqtt.MQTTClient(client_id, None, 1883, user, password, keepalive_s)
    if will is not None:  # (topic, message)
        c.set_last_will(will[0], will[1], True, 1)
    c.sock = pipe
    c.set_callback(conn._on_message)
    conn._message = None
    conn._refused = 0  # CONNACK's return code, when not 0
    conn.state = down
    conn._since = 0
    conn._last_rx = 0
    conn._ping_at = 0
    conn._progress = 0


def setup_topics(topics, pile_id):
    """topics (a telemetry.Topics) filled for this pile id; returned."""
    import journal

    root = "evse/v1/%s/" % pile_id
    topics.online = (root + "online").encode()
    topics.status = (root + "status").encode()
    topics.meter = (root + "meter").encode()
    topics.ack = (root + "cmd/ack").encode()
    topics.health = (root + "health").encode()
    topics.cmd = (root + "cmd").encode()
    topics.ota = (root + "ota").encode()
    fault = (root + "fault").encode()
    topics.outbox = {  # journal kind -> topic; a kind not here is not published
        journal.KIND_SESSION_START: (root + "session/started").encode(),
        journal.KIND_SESSION_END: (root + "session/ended").encode(),
        journal.KIND_FAULT: fault,
        # No schema of its own yet: the cloud keeps it in its `rejected` table.
        journal.KIND_JOURNAL_FAULT: fault,
    }
    return topics


def setup_ladder(ladder, conf, store, now_ms, step_reset):
    """link_heal.Ladder.__init__'s work (its arguments there; step_reset: its STEP_RESET)."""
    ladder._wifi_ms = conf.wifi_restart_after_s * 1000
    ladder._reset_ms = conf.reset_after_s * 1000
    ladder._rate_ms = conf.reset_min_interval_s * 1000
    ladder.conflict_pause_ms = conf.conflict_pause_s * 1000
    ladder._store = store
    ladder.down_since = now_ms  # the watchdog: when the link was last up (or the boot)
    ladder._wifi_at = None  # the last Wi-Fi restart of this outage
    ladder._up_at = None  # CONNACK of the current connection
    ladder.connects = 0
    ladder.reconnects = 0  # connections lost or failed, each retried (step 1)
    ladder.wifi_restarts = 0
    ladder.resets = 0 if store is None else store.resets
    ladder.last_step = None
    ladder.last_reason = None
    if store is not None and store.streak:  # the board came back from an escalation reset
        ladder.last_step = step_reset
        ladder.last_reason = store.reason
    ladder.kicks = 0
    ladder.conflict = False
    ladder._clear_streak = False  # the link came back: streak to 0 once the contactor is open
