"""What the consumer keeps of the piles' `health` messages (docs/telemetry.md, health.v1: retained,
one after every connect and every health_interval_s): the latest per pile in `pile_health` (the
operations page's pile view) and every one in `health_history` (what the link and the heap did
over time). pilehost/consumer.py runs TABLES with its own and calls put(); pilehost/ingest.py
writes a batch's rows with the same SQL; the reading side is pilehost/ops_queries.py.

The full message is kept as `payload` (canonical JSON); the columns are what a query filters or
sorts on. A health message sent again (the retained copy at every new subscription, a QoS 1
redelivery) has the same (pile_id, boot, uptime_s): one history row.

Retention: `health_history` grows by ~290 rows a pile a day (a message every 300 s and one at
each connect; ~5.8 million a day at 20,000 piles). Pruner deletes the rows received more than
RETENTION_DAYS ago (the consumer's and ingest's --health-days), a bounded batch at a time, so a
prune never holds the database for long (docs/cloud.md, "The database")."""
import datetime
import time

_COLUMNS = """pile_id TEXT NOT NULL, boot BIGINT NOT NULL, uptime_s BIGINT NOT NULL, ts TEXT NOT NULL,
        clock_synced BOOLEAN NOT NULL, reset_cause TEXT NOT NULL, fw TEXT NOT NULL, board TEXT NOT NULL,
        heap_free BIGINT NOT NULL, heap_largest_free BIGINT, outbox_records BIGINT NOT NULL,
        outbox_oldest_s BIGINT, wifi_rssi BIGINT, connects BIGINT NOT NULL, reconnects BIGINT NOT NULL,
        wifi_restarts BIGINT NOT NULL, resets BIGINT NOT NULL, last_step TEXT, last_reason TEXT,
        client_id_conflict BOOLEAN NOT NULL, loop_ms_max BIGINT NOT NULL,
        loop_ms_avg BIGINT NOT NULL, v BIGINT NOT NULL, payload TEXT NOT NULL,
        received_at TEXT NOT NULL"""
COLUMNS = tuple(" ".join(part.split()).split(" ", 1)[0] for part in _COLUMNS.split(","))

TABLES = (
    "CREATE TABLE IF NOT EXISTS pile_health (%s, PRIMARY KEY (pile_id))" % _COLUMNS,
    "CREATE TABLE IF NOT EXISTS health_history (%s, PRIMARY KEY (pile_id, boot, uptime_s))" % _COLUMNS,
    "CREATE INDEX IF NOT EXISTS health_history_by_received ON health_history (received_at)",  # pruning
)

_VALUES = ", ".join("?" * len(COLUMNS))
# The latest: a message of the same boot with a smaller uptime (a late redelivery) does not
# replace a newer one; another boot always does (the boot counter starts again on a new board).
LATEST_SQL = """INSERT INTO pile_health (%s) VALUES (%s)
               ON CONFLICT (pile_id) DO UPDATE SET %s
               WHERE excluded.boot <> pile_health.boot OR excluded.uptime_s >= pile_health.uptime_s""" % (
    ", ".join(COLUMNS), _VALUES, ", ".join("%s = excluded.%s" % (c, c) for c in COLUMNS[1:]))
HISTORY_SQL = ("INSERT INTO health_history (%s) VALUES (%s)"
               " ON CONFLICT (pile_id, boot, uptime_s) DO NOTHING" % (", ".join(COLUMNS), _VALUES))


def params(pile_id, h, payload, received_at):
    """The parameters of LATEST_SQL and HISTORY_SQL for a validated health message `h`; payload:
    its canonical JSON text (consumer.canonical)."""
    link, loop = h["link"], h["loop_ms"]
    return (pile_id, h["boot"], h["uptime_s"], h["ts"], h["clock_synced"], h["reset_cause"], h["fw"],
            h["board"], h["heap_free"], h["heap_largest_free"], h["outbox_records"], h["outbox_oldest_s"],
            h["wifi_rssi"], link["connects"], link["reconnects"], link["wifi_restarts"], link["resets"],
            link["last_step"], link["last_reason"], link["client_id_conflict"], loop["max"],
            loop["avg"], h["v"], payload, received_at)


def newer(a, b):
    """Whether params `a` replaces `b` as a pile's latest (LATEST_SQL's rule, within a batch)."""
    return a[1] != b[1] or a[2] >= b[2]


def put(storage, pile_id, h, payload, received_at):
    """Store one validated health message (pilehost.consumer.Handler, through Storage.run)."""
    row = params(pile_id, h, payload, received_at)
    storage.run(HISTORY_SQL, row)
    storage.run(LATEST_SQL, row)


# -- retention ------------------------------------------------------------------------------------

RETENTION_DAYS = 30  # health_history kept this long by default; 0: kept for ever
PRUNE_BATCH = 5000  # rows one DELETE removes at most (tens of ms on SQLite or PostgreSQL)
PRUNE_EVERY_S = 60.0  # between two prunes with nothing left to delete
# The oldest rows first, by key: the same statement on SQLite (row values, 3.15+) and PostgreSQL.
PRUNE_SQL = ("DELETE FROM health_history WHERE (pile_id, boot, uptime_s) IN ("
             "SELECT pile_id, boot, uptime_s FROM health_history WHERE received_at < ?"
             " ORDER BY received_at LIMIT ?)")


def received_text(t):
    """Unix time t as the consumer writes received_at (consumer.utc_now): ISO 8601, ms, 'Z'."""
    when = datetime.datetime.fromtimestamp(t, datetime.timezone.utc)
    return when.isoformat(timespec="milliseconds")[:-6] + "Z"


def retention_days(text):
    """--health-days' value: whole days, 0 (keep every row) or more."""
    days = int(text)
    if days < 0:
        raise ValueError("--health-days: 0 (keep every row) or more, not %d" % days)
    return days


class Pruner:
    """health_history's retention: step(storage) deletes at most `batch` rows received more than
    `days` ago, when one is due: at once after a full batch (a backlog, as on a store kept
    before retention), else `every_s` later. Each step is one short statement between the
    messages' own, so storing is never held up for long. days=0: never."""

    def __init__(self, days=RETENTION_DAYS, batch=PRUNE_BATCH, every_s=PRUNE_EVERY_S, clock=time.time):
        self.days = days
        self.batch = batch
        self.every_s = every_s
        self.clock = clock
        self.next_at = clock()
        self.deleted = 0

    def step(self, storage):
        """Rows deleted now (0 when none is due). Raises what storage.run raises; the next step is
        then due after every_s."""
        now = self.clock()
        if self.days <= 0 or now < self.next_at:
            return 0
        self.next_at = now + self.every_s
        n = storage.run(PRUNE_SQL, (received_text(now - self.days * 86400), self.batch)).rowcount
        if n >= self.batch:
            self.next_at = now
        self.deleted += n
        return n
