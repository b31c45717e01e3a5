"""The power curve of each session, for the operations page (docs/ops-page.md): the consumer keeps
every `meter` message (docs/telemetry.md: live data, QoS 0, never billed from) as one row of
`meter_samples`. One table, one insert; the reading side is pilehost/ops_queries.py."""

# (session_id, ts): a meter value sent twice (a reconnect) is kept once; ts has whole seconds.
TABLE = """CREATE TABLE IF NOT EXISTS meter_samples (
    session_id TEXT NOT NULL, ts TEXT NOT NULL, pile_id TEXT NOT NULL, clock_synced BOOLEAN NOT NULL,
    power_w BIGINT NOT NULL, session_energy_wh BIGINT NOT NULL, meter_wh BIGINT NOT NULL,
    received_at TEXT NOT NULL, PRIMARY KEY (session_id, ts))"""


def put(storage, pile_id, obj, received_at):
    """Store one validated meter message (pilehost.consumer.Handler, through Storage.run)."""
    storage.run(
        """INSERT INTO meter_samples (session_id, ts, pile_id, clock_synced, power_w, session_energy_wh,
               meter_wh, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)
           ON CONFLICT (session_id, ts) DO NOTHING""",
        (obj["session_id"], obj["ts"], pile_id, obj["clock_synced"], obj["power_w"],
         obj["session_energy_wh"], obj["meter_wh"], received_at))
