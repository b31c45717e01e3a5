"""What the consumer stores for the operations page (docs/ops-page.md): every `meter` message
(docs/telemetry.md: live data, QoS 0, never billed from) as one row of `meter_samples`, the power
curve of its session; and the indexes the page's queries need. pilehost/consumer.py runs TABLES
with its own and calls put(); the reading side is pilehost/ops_queries.py."""

TABLES = (
    # (session_id, ts): a meter value sent twice (a reconnect) is kept once; ts has whole seconds.
    """CREATE TABLE IF NOT EXISTS meter_samples (
        session_id TEXT NOT NULL, ts TEXT NOT NULL, pile_id TEXT NOT NULL, clock_synced BOOLEAN NOT NULL,
        power_w BIGINT NOT NULL, session_energy_wh BIGINT NOT NULL, meter_wh BIGINT NOT NULL,
        received_at TEXT NOT NULL, PRIMARY KEY (session_id, ts))""",
    # sessions newest first, of the fleet or of one pile; a pile's fault events newest first
    "CREATE INDEX IF NOT EXISTS sessions_by_start ON sessions (start_time)",
    "CREATE INDEX IF NOT EXISTS sessions_by_pile ON sessions (pile_id, start_time)",
    "CREATE INDEX IF NOT EXISTS sessions_by_stop ON sessions (stop_time)",  # the energy of today
    "CREATE INDEX IF NOT EXISTS faults_by_pile ON faults (pile_id, received_at)",
)


# One meter message's row (consumer.Handler one at a time; pilehost.ingest per batch).
METER_SQL = """INSERT INTO meter_samples (session_id, ts, pile_id, clock_synced, power_w, session_energy_wh,
                   meter_wh, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT (session_id, ts) DO NOTHING"""


def meter_params(pile_id, obj, received_at):
    return (obj["session_id"], obj["ts"], pile_id, obj["clock_synced"], obj["power_w"],
            obj["session_energy_wh"], obj["meter_wh"], received_at)


def put(storage, pile_id, obj, received_at):
    """Store one validated meter message (pilehost.consumer.Handler, through Storage.run)."""
    storage.run(METER_SQL, meter_params(pile_id, obj, received_at))
