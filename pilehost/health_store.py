"""What the consumer keeps of the piles' `health` messages (docs/telemetry.md, health.v1: retained,
one after every connect and every health_interval_s): the latest per pile in `pile_health` (the
operations page's pile view) and every one in `health_history` (what the link and the heap did
over time). pilehost/consumer.py runs TABLES with its own and calls put(); pilehost/ingest.py
writes a batch's rows with the same SQL; the reading side is pilehost/ops_queries.py.

The full message is kept as `payload` (canonical JSON); the columns are what a query filters or
sorts on. A health message sent again (the retained copy at every new subscription, a QoS 1
redelivery) has the same (pile_id, boot, uptime_s): one history row."""

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
