"""What the operations page shows (docs/ops-page.md), read from the store the reference consumer
writes (pilehost/consumer.py; SQLite or PostgreSQL), over a connection that cannot write.

`open_reader(url)` gives the read-only connection; `OpsQueries` the fleet, one pile and the
sessions, as plain dicts ready for JSON. No web here: pilehost/ops_web.py serves them.
"""
import datetime
import json
import re
import sqlite3
import threading
import urllib.parse

from .consumer import redact

DATE_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
MAX_ROWS = 1000  # one answer's rows at most (the fleet list, a sessions page)
CURVE_POINTS = 2000  # samples of one session's curve at most (a 10 h session at 18 s intervals)
RECENT_SESSIONS = 15
COUNT_CAP = 100_000  # sessions counted (and their energy summed) at most for one filter
MAX_OFFSET = 10 ** 12  # far beyond any store; beyond a database's integer is a driver error
RECENT_FAULTS = 30
STOP_REASONS = ("ev_disconnected", "remote", "power_loss", "meter_failure", "pilot_short", "pilot_invalid",
                "diode", "rcd_trip", "rcd_self_test", "contactor_failed_to_close", "welded", "rcd_lockout",
                "pilot_stuck", "latch_state_lost", "config", "internal_error")  # session_ended.v1
STATES = ("idle", "waiting_for_auth", "charging", "suspended_ev", "suspended_evse", "finishing", "fault",
          "unavailable")  # status.v1


class BadQuery(ValueError):
    """A filter the page (or a hand-typed URL) got wrong: the message says which."""


class StoreUnavailable(Exception):
    """The database cannot be read right now (down, restarting, file gone)."""


class Reader:
    """One read-only connection, shared by the web server's threads (a lock, as consumer.Storage)."""

    def __init__(self, connect, placeholder, errors, text):
        self._connect = connect
        self.placeholder = placeholder
        self.errors = errors  # the driver's errors: the store is unusable
        self.text = text  # the URL without its password, for messages
        self._lock = threading.Lock()
        self._conn = None
        self.tables = set()

    def rows(self, sql, params=()):
        if self.placeholder != "?":
            sql = sql.replace("?", self.placeholder)
        with self._lock:
            try:
                if self._conn is None:
                    self._conn = self._connect()
                cur = self._conn.cursor()
                cur.execute(sql, params)
                names = [d[0] for d in cur.description]
                return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
            except self.errors as e:
                self._drop()  # reconnect on the next call (PostgreSQL restarted, say)
                raise StoreUnavailable("%s: %s" % (type(e).__name__, str(e).strip())) from e

    def _drop(self):
        if self._conn is not None:
            try:
                self._conn.close()
            except self.errors:
                pass
            self._conn = None

    def close(self):
        with self._lock:
            self._drop()


def open_reader(url):
    """A Reader on the consumer's --db URL: sqlite:///path.db (opened read-only, never created) or
    postgresql://... (every transaction read-only)."""
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        uri = "file:%s?mode=ro" % urllib.parse.quote(path)

        def connect():
            conn = sqlite3.connect(uri, uri=True, timeout=10, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA query_only = ON")
            return conn

        reader = Reader(connect, "?", (sqlite3.Error,), url)
    elif url.startswith(("postgresql://", "postgres://")):
        import psycopg

        def connect():
            conn = psycopg.connect(url, autocommit=True, connect_timeout=10)
            conn.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
            return conn

        reader = Reader(connect, "%s", (psycopg.Error,), redact(url))
    else:
        raise ValueError("--db: sqlite:///path.db or postgresql://user:pass@host/dbname, not %r"
                         % redact(url))
    return reader


def _flag(value):
    return None if value is None else bool(value)  # SQLite keeps booleans as 0/1


def _faults(text):
    try:
        value = json.loads(text) if text else []
    except ValueError:
        return ["(unreadable)"]
    return [str(f) for f in value] if isinstance(value, list) else ["(unreadable)"]


def _like(text):
    """`text` inside a LIKE pattern, wildcards taken literally (pile ids may hold '_')."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _limit(value, default, top=MAX_ROWS):
    if value in (None, ""):
        return default
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise BadQuery("limit: a whole number, not %r" % (value,)) from None
    if n < 1:
        raise BadQuery("limit: at least 1")
    return min(n, top)


def _offset(value):
    if value in (None, ""):
        return 0
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise BadQuery("offset: a whole number, not %r" % (value,)) from None
    if not 0 <= n <= MAX_OFFSET:
        raise BadQuery("offset: 0 to %d" % MAX_OFFSET)
    return n


def _date(name, value):
    if value in (None, ""):
        return None
    if not DATE_RE.fullmatch(value):
        raise BadQuery("%s: a date YYYY-MM-DD, not %r" % (name, value))
    try:
        return datetime.date.fromisoformat(value)
    except ValueError:
        raise BadQuery("%s: no such date %r" % (name, value)) from None


def utc_text(moment):
    return moment.isoformat(timespec="milliseconds")[:-6] + "Z"


class OpsQueries:
    """The page's questions, each one answer of plain values. `clock` gives the server's UTC now
    (a datetime), so that ages are computed against one clock, the consumer's."""

    def __init__(self, reader, clock=None):
        self.reader = reader
        self.clock = clock or (lambda: datetime.datetime.now(datetime.timezone.utc))

    def _rows(self, sql, params=()):
        return self.reader.rows(sql, params)

    def _now(self):
        return utc_text(self.clock())

    # -- the fleet -------------------------------------------------------------------------------------

    def fleet(self, search="", state="", limit=None):
        """Every pile's latest state (up to `limit`, by id), and the counts of the whole fleet."""
        limit = _limit(limit, 500)
        where, params = [], []
        if "\x00" in search:  # PostgreSQL's text cannot hold it; no pile id does
            raise BadQuery("q: no NUL character")
        if search:
            where.append("pile_id LIKE ? ESCAPE '\\'")
            params.append("%" + _like(search) + "%")
        if state == "offline":
            where.append("online = ?")
            params.append(False)
        elif state == "faulted":
            where.append("faults IS NOT NULL AND faults <> '[]'")
        elif state:
            if state not in STATES:
                raise BadQuery("state: one of %s, offline or faulted" % ", ".join(STATES))
            where.append("state = ?")
            params.append(state)
        clause = " WHERE " + " AND ".join(where) if where else ""
        piles = [self._pile_row(r) for r in self._rows(
            "SELECT pile_id, online, online_at, state, pilot, offer_a, power_w, session_id,"
            " session_energy_wh, faults, fw, board, boot, uptime_s, clock_synced, status_at, last_seen_at"
            " FROM piles%s"
            " ORDER BY pile_id LIMIT %d" % (clause, limit), params)]
        matching = self._rows("SELECT COUNT(*) AS n FROM piles" + clause, params)[0]["n"]
        return {"now": self._now(), "summary": self.summary(), "piles": piles, "matching": matching}

    def summary(self):
        """Counts over the whole fleet: what the top of the page shows."""
        row = self._rows(
            "SELECT COUNT(*) AS piles,"
            " SUM(CASE WHEN online = ? THEN 1 ELSE 0 END) AS online,"
            " SUM(CASE WHEN online = ? THEN 1 ELSE 0 END) AS offline,"
            " SUM(CASE WHEN state = 'charging' AND (online IS NULL OR online = ?) THEN 1 ELSE 0 END)"
            " AS charging,"
            " SUM(CASE WHEN faults IS NOT NULL AND faults <> '[]' THEN 1 ELSE 0 END) AS faulted,"
            " SUM(CASE WHEN online IS NULL OR online = ? THEN COALESCE(power_w, 0) ELSE 0 END) AS power_w"
            " FROM piles", (True, False, True, True))[0]
        today = self.clock().date().isoformat()
        energy = self._rows("SELECT COUNT(*) AS n, SUM(energy_wh) AS wh FROM sessions WHERE stop_time >= ?",
                            (today,))[0]
        out = {k: int(row[k] or 0) for k in ("piles", "online", "offline", "charging", "faulted", "power_w")}
        out.update(sessions_today=int(energy["n"] or 0), energy_today_wh=int(energy["wh"] or 0), day=today)
        return out

    def _pile_row(self, r):
        r = dict(r)
        r["online"] = _flag(r["online"])
        r["clock_synced"] = _flag(r["clock_synced"])
        r["faults"] = _faults(r["faults"])
        return r

    # -- one pile --------------------------------------------------------------------------------------

    def pile(self, pile_id):
        """One pile: its status, its running (else last) session with the power curve, recent
        sessions, fault events and health. None if the store has never heard of it."""
        if "\x00" in pile_id:
            return None  # PostgreSQL's text cannot hold it, no pile has it: never sent to the driver
        found = self._rows(
            "SELECT pile_id, online, online_boot, online_at, state, pilot, offer_a, power_w, session_id,"
            " session_energy_wh, faults, fw, board, boot, uptime_s, status_ts, clock_synced, status_at,"
            " last_seen_at FROM piles WHERE pile_id = ?", (pile_id,))
        if not found:
            return None
        pile = self._pile_row(found[0])
        sessions = self.sessions(pile=pile_id, limit=RECENT_SESSIONS)["rows"]
        faults = [dict(f, clock_synced=_flag(f["clock_synced"])) for f in self._rows(
            "SELECT event_id, code, action, ts, clock_synced, session_id, received_at FROM faults"
            " WHERE pile_id = ? ORDER BY received_at DESC, event_id DESC LIMIT %d" % RECENT_FAULTS,
            (pile_id,))]
        return {"now": self._now(), "pile": pile, "session": self._focus_session(pile, sessions),
                "sessions": sessions, "faults": faults, "health": self._health(pile_id),
                "reported": self.reported_health(pile_id)}

    def _focus_session(self, pile, sessions):
        """The running session (from status and session/started), else the last one ended."""
        running = pile["session_id"]
        if running:
            start = self._rows("SELECT session_id, auth_source, auth_id, start_time, meter_start_wh,"
                               " clock_synced FROM session_starts WHERE session_id = ?", (running,))
            focus = dict(start[0]) if start else {"session_id": running, "auth_source": None, "auth_id": None,
                                                   "start_time": None, "meter_start_wh": None,
                                                   "clock_synced": None}
            focus.update(running=True, energy_wh=pile["session_energy_wh"], power_w=pile["power_w"],
                         stop_time=None, stop_reason=None, peak_power_w=None, duration_s=None)
        elif sessions:
            focus = dict(sessions[0], running=False, power_w=None)
        else:
            return None
        focus["clock_synced"] = _flag(focus["clock_synced"])
        focus["curve"] = self.curve(focus["session_id"])
        return focus

    def reported_health(self, pile_id):
        """The pile's latest `health` message (pilehost/health_store.py), its fields flat, the
        meter errors by kind; None when none was stored (or the store predates the table)."""
        if "pile_health" not in self._tables("pile_health"):
            return None
        rows = self._rows(
            "SELECT boot, uptime_s, ts, clock_synced, reset_cause, fw, heap_free, heap_largest_free,"
            " outbox_records, outbox_oldest_s, wifi_rssi, connects, reconnects, wifi_restarts, resets,"
            " last_step, last_reason, client_id_conflict, loop_ms_max, loop_ms_avg, payload, received_at"
            " FROM pile_health WHERE pile_id = ?", (pile_id,))
        if not rows:
            return None
        h = dict(rows[0])
        h["clock_synced"] = _flag(h["clock_synced"])
        h["client_id_conflict"] = _flag(h["client_id_conflict"])
        try:
            errors = json.loads(h.pop("payload")).get("meter_errors")
        except ValueError:
            errors = None
        h["meter_errors"] = errors if isinstance(errors, dict) else None
        return h

    def curve(self, session_id):
        """The session's meter samples in time order: ts, power_w, session_energy_wh."""
        if "meter_samples" not in self._tables():
            return []  # a store written by a consumer older than the power curve
        rows = self._rows("SELECT ts, power_w, session_energy_wh FROM meter_samples WHERE session_id = ?"
                          " ORDER BY ts DESC LIMIT %d" % CURVE_POINTS, (session_id,))
        rows.reverse()
        return rows

    def _tables(self, table="meter_samples"):
        """The tables of a newer consumer found so far (a store may have been written by an older
        one); `table` is looked for until it is there."""
        if table not in self.reader.tables:
            try:
                self._rows("SELECT 1 FROM %s WHERE 1 = 0" % table)
                self.reader.tables.add(table)
            except StoreUnavailable:
                return set()
        return self.reader.tables

    def _health(self, pile_id):
        prefix = "evse/v1/%s/" % _like(pile_id)
        rejected = self._rows(
            "SELECT COUNT(*) AS n, MAX(received_at) AS last_at FROM rejected WHERE topic LIKE ? ESCAPE '\\'",
            (prefix + "%",))[0]
        last = self._rows("SELECT reason, detail, received_at FROM rejected WHERE topic LIKE ? ESCAPE '\\'"
                          " ORDER BY received_at DESC LIMIT 1", (prefix + "%",))
        counts = self._rows("SELECT COUNT(*) AS n, SUM(energy_wh) AS wh, MAX(peak_power_w) AS peak,"
                            " SUM(meter_restarts) AS restarts,"
                            " SUM(CASE WHEN meter_stop_stale = ? THEN 1 ELSE 0 END) AS stale"
                            " FROM sessions WHERE pile_id = ?", (True, pile_id))[0]
        raised = self._rows("SELECT COUNT(*) AS n FROM faults WHERE pile_id = ? AND action = 'raised'",
                            (pile_id,))[0]
        return {"rejected": int(rejected["n"] or 0), "last_rejected": last[0] if last else None,
                "sessions": int(counts["n"] or 0), "energy_wh": int(counts["wh"] or 0),
                "peak_power_w": counts["peak"], "meter_restarts": int(counts["restarts"] or 0),
                "stale_stops": int(counts["stale"] or 0), "faults_raised": int(raised["n"] or 0)}

    # -- sessions --------------------------------------------------------------------------------------

    def sessions(self, pile="", since="", until="", stop_reason="", auth_source="", limit=None, offset=None):
        """Ended sessions, newest start first, filtered; `since`/`until` are days (UTC, inclusive)
        of the start time. Also how many match and their energy."""
        limit = _limit(limit, 100)
        offset = _offset(offset)
        where, params = [], []
        if "\x00" in pile:
            raise BadQuery("pile: no NUL character")
        if pile:
            where.append("pile_id = ?")
            params.append(pile)
        first, last = _date("since", since), _date("until", until)
        if first is not None:
            where.append("start_time >= ?")
            params.append(first.isoformat())
        if last is not None and last < datetime.date.max:  # until the last day there is: no bound
            where.append("start_time < ?")
            params.append((last + datetime.timedelta(days=1)).isoformat())
        if stop_reason:
            if stop_reason not in STOP_REASONS:
                raise BadQuery("stop_reason: one of %s" % ", ".join(STOP_REASONS))
            where.append("stop_reason = ?")
            params.append(stop_reason)
        if auth_source:
            if auth_source not in ("free_vend", "remote"):
                raise BadQuery("auth_source: free_vend or remote")
            where.append("auth_source = ?")
            params.append(auth_source)
        clause = " WHERE " + " AND ".join(where) if where else ""
        rows = self._rows(
            "SELECT session_id, pile_id, connector, auth_source, auth_id, start_time, stop_time,"
            " clock_synced, energy_wh, duration_s, peak_power_w, stop_reason, meter_restarts,"
            " meter_stop_stale, received_at"
            " FROM sessions%s ORDER BY start_time DESC, session_id DESC LIMIT %d OFFSET %d"
            % (clause, limit, offset), params)
        for r in rows:
            r["clock_synced"] = _flag(r["clock_synced"])
            r["meter_stop_stale"] = _flag(r["meter_stop_stale"])
        # counted up to COUNT_CAP: a year of a large fleet is tens of millions of rows
        total = self._rows("SELECT COUNT(*) AS n, SUM(energy_wh) AS wh FROM (SELECT energy_wh FROM sessions%s"
                           " LIMIT %d) AS matching" % (clause, COUNT_CAP + 1), params)[0]
        capped = total["n"] > COUNT_CAP
        return {"now": self._now(), "rows": rows, "matching": min(int(total["n"] or 0), COUNT_CAP),
                "capped": capped, "energy_wh": None if capped else int(total["wh"] or 0), "offset": offset,
                "limit": limit}

    def choices(self):
        """The filters' fixed lists."""
        return {"stop_reasons": list(STOP_REASONS), "states": list(STATES)}
