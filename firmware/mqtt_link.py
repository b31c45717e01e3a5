"""The pile's MQTT link, its supervisor (docs/telemetry.md, docs/commands.md, docs/network.md):
reconnect with backoff, the birth order, the outbox one record at a time, commands in and
answers out; one bounded step per control loop, never waiting on the network.

The connection is mqtt_conn.py's, the messages telemetry.py's, the commands' actions
commands.py's. Names are looked up and TLS is run only while the contactor is open (issue 10,
item 19; docs/network.md)."""
import socket
import time

from micropython import const

import link_heal
import telemetry
from mqtt_conn import DOWN, TCP, TLS, UP, WRAP, MqttConn, drop_setup

TYPE_CHECKING = const(False)  # mypy takes it as True (tools/typecheck.py); compiled out here
if TYPE_CHECKING:
    from typing import Any

    from backoff import Backoff
    from mqtt_conn import MqttConn

# Free out-buffer needed before building a publish: the largest outbox record (journal's
# DEFAULT_MAX_PAYLOAD, 1024) on the longest topic (88 bytes with a 64-character pile_id), its
# topic length, packet id and fixed header (<= 9): 1121 (host_tests/test_review_records.py).
_ROOM = const(1152)
_BACKOFF_MIN_MS = const(1000)  # link_setup.py's too
_STATUS_MIN_GAP_MS = const(500)  # a flapping pilot does not flood the broker
_MAX_ACKS = const(4)  # cmd/ack waiting to go out; a full queue holds back the next command


class PileView:
    """All the link reads of the controller (ctl), and its one action on it: safe_off()
    before a remote reboot. Commands act through commands.py. `charger`: the charger
    (charger.Charger), whose state, pilot, faults and remote limit the link reads as they are."""

    def __init__(self, ctl):
        self._ctl = ctl
        self.charger = ctl.charger

    def contactor_closed(self):
        return self._ctl.contactor.closed

    def offer_ma(self):
        ctl = self._ctl
        return ctl.charger.offer_ma if ctl.output.pwm_on else 0

    def session(self):
        """The session record with an id: the open one, else the charger's session's; or None."""
        s = self._ctl.records.current()
        return s if s is not None and s.id is not None else None

    def reading(self):
        meter = self._ctl.records.meter
        return None if meter is None else meter.reading

    def meter_age_ms(self, now_ms):
        meter = self._ctl.records.meter
        return None if meter is None else meter.age_ms(now_ms)

    def fresh_reading(self, now_ms):
        """The meter's reading if it may be shown as now (meter.fresh); None if stale or none."""
        meter = self._ctl.records.meter
        return None if meter is None else meter.fresh(now_ms)

    def limit(self, now_ms):
        """(mA, source, ms left or None) of the remote limit in force, or None."""
        c = self.charger
        if c.remote_limit_ma is None:
            return None
        return c.remote_limit_ma, c.limit_source, c.limit_expires_in_ms(now_ms)

    def session_open(self):
        """A board reset must wait: the contactor closed, a record or a session open."""
        ctl = self._ctl
        return ctl.contactor.closed or ctl.records.record is not None or ctl.charger.session is not None

    def meter_errors(self):
        """{kind: count} of the meter's errors that happened (meter.KINDS), or None."""
        meter = self._ctl.records.meter
        if meter is None:
            return None
        return {k: n for k, n in meter.errors.items() if n}

    def safe_off(self):
        self._ctl.safe_off()

    def flash_spent(self):
        """A flash write ran in this iteration (flash_gate.FlashGate.spent)."""
        gate = getattr(self._ctl.records, "gate", None)  # no records: no gate
        return gate is not None and gate.spent

    def guard(self):
        """The controller's safety check between slices of the link's work (main.py)."""
        self._ctl.guard(time.ticks_ms())


class MqttLink:
    """conf: config.json's mqtt section; ctl: the Controller (read through PileView, acted on
    through commands.Commands); log: the SessionLog (pile id, boot, the outbox journal);
    verifier: a CommandVerifier, or None to take no commands; reset: restarts the board
    (machine.reset); tls: link_tls.tls_context()'s SSLContext, or None: plain TCP; heal_store: a
    link_heal.HealStore (None: the ladder never resets the board); reset_cause: the name of
    machine.reset_cause() (wiring_link.reset_cause; None: "unknown"); bufs: the connection's
    (out-buffer, in-buffer), made by wiring.py at the settings (None: made here); numeric_host: whether
    conf.host is an address (netaddr.numeric_host; None: found here). `station`
    (wifi.Station) is set by main.py when there is Wi-Fi."""

    # Set by link_setup.setup_link (annotations only: no code on the board).
    _pile: "PileView"
    _ota: "Any"
    _commands: "Any"
    _log: "Any"
    _report: "Any"
    _verifier: "Any"
    _fw: str
    _board: str
    _reset: "Any"
    _wall: "Any"
    _conf: "Any"
    _held: bool
    _topics: "telemetry.Topics"
    _conn: "MqttConn"
    _addr: "Any"
    _stale: bool
    _numeric: bool
    last_error: "str | None"
    _retry_at: int
    _backoff: "Backoff"
    _uptime_ms: int
    _todo_online: bool
    _todo_status: bool
    _todo_subscribe: bool
    _todo_health: bool
    _acks: list
    _cmd_in: "Any"
    _inflight: "Any"
    _pending: "Any"
    _drained_at: "Any"
    _reboot: bool
    _s_state: "Any"
    _s_pilot: "Any"
    _s_offer: "Any"
    _s_faults: "Any"
    _s_limit: "Any"
    _s_limit_source: "Any"
    _s_stale: "Any"
    _status_at: int
    _status_due: bool
    _meter_at: int
    station: "Any"
    _heal: "link_heal.Ladder"
    _loop: "link_heal.LoopFigures"
    _ob_age: "link_heal.OutboxAge"
    _cause: str
    _health_at: int

    def __init__(self, conf, ctl, log, report=None, verifier=None, fw="0", board="",
                 reset=None, boot_ms=None, wall=time.time, tls=None, ota=None, heal_store=None,
                 reset_cause=None, bufs=None, numeric_host=None):
        import link_setup  # the boot's code, off the heap once the link is built

        try:
            link_setup.setup_link(self, bufs, conf, ctl, log, report, verifier, fw, board, reset,
                                  boot_ms, wall, tls, ota, heal_store, reset_cause,
                                  (PileView, MqttConn, telemetry, link_heal), numeric_host)
        finally:
            drop_setup()
        if verifier is not None:  # remote commands: commands.py only with a verifier
            import commands

            self._commands = commands.Commands(ctl, ota)

    def _emit(self, now_ms, text):
        if self._report is not None:
            self._report(now_ms, "mqtt", text)

    @property
    def connected(self):
        return self._conn.state == UP

    # -- the step --------------------------------------------------------------------------------

    def poll(self, now_ms):
        """One bounded, non-blocking step; call it every control loop."""
        self._uptime_ms += self._loop.note(now_ms)
        self._watch(now_ms)
        if self._ota is not None:
            self._ota.poll(now_ms)
        self._ob_age.note(now_ms)
        conn = self._conn
        state = conn.state
        if state == DOWN:
            self._escalate(now_ms)
            if time.ticks_diff(now_ms, self._retry_at) >= 0:
                self._open(now_ms)
            return
        # A handshake step (certificate check, ECDHE) could outlast the 100 ms C->B limit.
        if state == TLS and self._pile.contactor_closed():
            self._drop(now_ms, "TLS handshake given up: the contactor closed")
            return
        try:
            conn.step(now_ms)
            lost = None
        except OSError as e:  # its text says why
            lost = str(e)
        raw = self._cmd_in
        # Receiving it was a slice; verifying it is the next (_command), in an iteration with no
        # flash write before it (its counter write would stack on that one: flash_gate.spent).
        if raw is not None and not self._pile.flash_spent():
            self._cmd_in = None
            if self._commands is not None:  # else not subscribed: a broker's stray message
                self._pile.guard()
                # Verified, applied and answered by commands.py (docs/commands.md).
                self._commands.received(self, now_ms, raw)
        if lost is not None:
            self._drop(now_ms, lost)
            return
        state = conn.state
        if state == WRAP:
            if self._pile.contactor_closed():
                self._drop(now_ms, "TLS connection given up: the contactor closed")
                return
            try:
                conn.start_tls(now_ms)
            except OSError as e:
                self._drop(now_ms, str(e))
        elif state == UP:
            heal = self._heal
            heal.settle(now_ms)
            try:
                heal.flash_due(self._pile.contactor_closed())
            except OSError as e:
                self._emit(now_ms, "heal.json not written (%s)" % e)
            try:
                self._work(now_ms)
                conn.flush(now_ms)
            except OSError as e:
                self._drop(now_ms, "connection lost (%s)" % e)

    # -- connection ------------------------------------------------------------------------------

    def _open(self, now_ms):
        closed = self._pile.contactor_closed()
        tls = self._conn.tls is not None
        # A TLS connection (its handshake) and getaddrinfo (DNS) block on a board: never with the
        # contactor closed (issue 10, item 19); a TCP connect to a known address may go ahead.
        if closed and (tls or self._addr is None and not self._numeric):
            if not self._held:  # said once per wait
                self._held = True
                self._emit(now_ms, "TLS connection waits for the contactor to open" if tls
                           else "%s: name lookup waits for the contactor to open" % self._conf.host)
            return
        self._held = False
        try:
            if self._addr is None or self._stale and (self._numeric or not closed):
                conf = self._conf
                self._addr = socket.getaddrinfo(conf.host, conf.port)[0][-1]
                self._stale = False
            self._conn.open(self._addr, now_ms)
        except OSError as e:
            self._drop(now_ms, "cannot connect (%s)" % e)

    def _drop(self, now_ms, why):
        if self._conn.state in (DOWN, TCP, WRAP):  # no MQTT over it yet: the address may have changed
            self._stale = True
        self._conn.close()
        self.last_error = why
        self._acks = []  # answers for a dead connection: the sender has given up
        self._inflight = self._pending = self._drained_at = None
        pause = self._heal.down(now_ms, why)
        if pause is None:
            delay = self._backoff.next_ms()  # jitter: a fleet spreads out
        else:  # another client holds our id: stand back instead of kicking it off in turn
            delay = pause
            why = "%s; client_id_conflict: another client connects as '%s'" % (why, self._log.pile_id)
        self._retry_at = time.ticks_add(now_ms, delay)
        self._emit(now_ms, "%s; next try in %d.%d s" % (why, delay // 1000, delay % 1000 // 100))

    def _escalate(self, now_ms):
        """The ladder's steps beyond a reconnect (link_heal.Ladder.due), between attempts."""
        heal = self._heal
        if self._held:  # waiting for the contactor by design, not broken
            heal.down_since = now_ms
            return
        station = self.station
        step = heal.due(now_ms, self._uptime_ms, None if station is None else station.connected,
                        self._pile.session_open())
        if step is None:
            return
        gone = time.ticks_diff(now_ms, heal.down_since) // 1000
        if step == link_heal.STEP_WIFI:
            why = "no broker for %d s with the Wi-Fi up" % gone
            heal.wifi_restarted(now_ms, why)
            self._emit(now_ms, "restarting the Wi-Fi: %s" % why)
            station.restart(now_ms, why)
            self._backoff.reset()  # the next attempts follow the new association closely
            self._retry_at = time.ticks_add(now_ms, _BACKOFF_MIN_MS)
            return
        try:  # the last rung: due only with no session open (the contactor open)
            import link_reset
        except (MemoryError, ImportError, ValueError, SyntaxError, OSError) as e:  # as heal.json unwritten:
            heal.down_since = now_ms  # no uncounted reset (the rate); again after reset_after_s
            self._emit(now_ms, "board reset given up: its code not loaded (%r)" % (e,))
            return
        try:
            link_reset.reset_board(self, now_ms)
        finally:
            drop_setup()

    # -- what the connection tells (mqtt_conn.MqttConn's owner) ---------------------------------

    def conn_up(self, now_ms):
        self._backoff.reset()
        # docs/telemetry.md order: online, status, health, subscribe, the outbox, then live messages.
        self._todo_online = self._todo_status = self._todo_health = True
        self._todo_subscribe = self._verifier is not None
        if self._ota is not None:
            self._ota.conn_up()
        self._heal.up(now_ms)
        self._emit(now_ms, "connected to %s:%d" % (self._conf.host, self._conf.port))

    def conn_puback(self, now_ms, pid):
        inflight = self._inflight
        if inflight is not None and inflight[0] == pid:
            self._inflight = None
            try:
                self._log.outbox.ack(inflight[1])
            except OSError as e:  # it is sent again after the next connect: a duplicate
                self._emit(now_ms, "outbox ack failed (%s)" % e)

    def conn_may_take(self):
        return len(self._acks) < _MAX_ACKS and self._cmd_in is None

    def conn_publish(self, now_ms, topic, msg):
        if topic == self._topics.cmd:
            self._cmd_in = msg  # run by poll() once the step is over, after a pilot read
        elif self._ota is not None:
            self._ota.message(now_ms, topic, msg)  # a release chunk (docs/ota.md)

    def conn_too_large(self, now_ms, size):
        # `too_large` has no id to answer: the command was skipped unread.
        self._emit(now_ms, "command refused: too_large (%d bytes)" % size)

    conn_report = _emit  # the connection's reports (the TLS handshake's time) are the link's

    # -- what goes out ---------------------------------------------------------------------------

    def _work(self, now_ms):
        conn = self._conn
        t = self._topics
        if conn.room() < _ROOM:
            return
        if self._reboot:
            if not self._acks and conn.idle():
                self._reboot = False
                self._emit(now_ms, "rebooting (remote command)")
                self._pile.safe_off()  # contactor open first: never rely on the reset's pin state
                if self._reset is not None:
                    self._reset()
        if self._todo_online:
            self._todo_online = False
            conn.publish(t.online, telemetry.online(True, self._log.boot), retain=True)
        elif self._todo_status:
            self._todo_status = False
            self._publish_status(now_ms)
        elif self._todo_health:
            self._todo_health = False
            self._publish_health(now_ms)
        elif self._todo_subscribe:
            self._todo_subscribe = False
            conn.subscribe(t.cmd)
        elif self._acks:
            conn.publish(t.ack, self._acks.pop(0))
        elif self._inflight is None and self._send_record():
            pass
        elif self._ota is not None and self._ota.work(now_ms, conn):
            pass
        elif self._status_due and time.ticks_diff(now_ms, self._status_at) >= _STATUS_MIN_GAP_MS \
                or time.ticks_diff(now_ms, self._status_at) >= self._conf.status_interval_s * 1000:
            self._publish_status(now_ms)
        elif time.ticks_diff(now_ms, self._health_at) >= self._conf.health_interval_s * 1000:
            self._publish_health(now_ms)
        elif time.ticks_diff(now_ms, self._meter_at) >= self._conf.meter_interval_s * 1000:
            self._meter_at = now_ms
            pile = self._pile
            s = pile.session()
            reading = pile.reading()
            if s is not None and reading is not None and pile.charger.state in telemetry.RUNNING:
                pile.guard()  # building a message is a slice of its own
                conn.publish(t.meter, telemetry.meter(
                    self._wall(), s.id, s.energy_wh, reading, pile.meter_age_ms(now_ms),
                    pile.fresh_reading(now_ms) is not None), qos=0)

    def _send_record(self):
        """The oldest unacknowledged outbox record, one in flight at a time."""
        outbox = self._log.outbox
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
            topic = self._topics.outbox.get(kind)
            if topic is not None:
                self._inflight = (self._conn.publish(topic, payload), seq)
                return True
            outbox.ack(seq)  # a kind the link does not publish (live data): nothing to keep

    # -- status ----------------------------------------------------------------------------------

    def _watch(self, now_ms):
        """A status goes out on every change of state, pilot, offer, faults, the remote limit in
        force, or the meter's reading going stale or fresh (no allocation)."""
        p = self._pile
        c = p.charger
        if c.state != self._s_state or c.pilot != self._s_pilot or c.faults != self._s_faults \
                or p.offer_ma() != self._s_offer or c.remote_limit_ma != self._s_limit \
                or c.limit_source != self._s_limit_source \
                or (p.fresh_reading(now_ms) is None) != self._s_stale:  # power shown, or not
            self._status_due = True

    def _publish_status(self, now_ms):
        p = self._pile
        p.guard()  # building a message is a slice of its own
        c = p.charger
        state = self._s_state = c.state
        pilot = self._s_pilot = c.pilot
        faults = self._s_faults = c.faults
        offer = self._s_offer = p.offer_ma()
        self._s_limit = c.remote_limit_ma
        self._s_limit_source = c.limit_source
        self._status_due = False
        self._status_at = now_ms
        s = p.session()
        reading = p.fresh_reading(now_ms)  # a stale reading's power is not shown as now's
        self._s_stale = reading is None
        self._conn.publish(self._topics.status, telemetry.status(
            self._wall(), self._log.boot, self._uptime_ms // 1000, state, pilot, offer,
            None if reading is None else reading.power_w, None if s is None else s.id,
            0 if s is None else s.energy_wh, faults, self._fw, self._board,
            p.limit(now_ms), p.meter_age_ms(now_ms)), retain=True)

    def _publish_health(self, now_ms):
        """docs/telemetry.md `health`: built only when it is due."""
        self._health_at = now_ms
        self._pile.guard()
        h = self._heal
        free, largest = link_heal.heap()
        depth, age = self._ob_age.figures(now_ms)
        longest, mean, _ = self._loop.take()
        station = self.station
        fig = {
            "reset_cause": self._cause, "board": self._board, "heap_free": free,
            "heap_largest_free": largest,
            "outbox_records": depth, "outbox_oldest_s": age,
            "wifi_rssi": None if station is None else station.rssi(),
            "link": {"connects": h.connects, "reconnects": h.reconnects,
                     "wifi_restarts": h.wifi_restarts, "resets": h.resets,
                     "last_step": h.last_step,
                     "last_reason": None if h.last_reason is None else h.last_reason[:200],
                     "client_id_conflict": h.conflict},
            "meter_errors": self._pile.meter_errors(),
            "loop_ms": {"max": longest, "avg": mean},
        }
        self._conn.publish(self._topics.health, telemetry.health(
            self._wall(), self._log.boot, self._uptime_ms // 1000, self._fw, fig), retain=True)
