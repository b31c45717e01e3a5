"""The cloud side in this process: the reference consumer on a SQLite file (Store), and
`make sim`'s local broker with one (LocalBroker)."""
import logging
import os
import time

import paho.mqtt.client as mqtt

from . import consumer
from .broker import Broker, BrokerError, broker_kind, find_mosquitto
from .procs import TIMEOUT

_SCHEMAS = []


def schemas():
    """docs/schemas, read once."""
    if not _SCHEMAS:
        _SCHEMAS.append(consumer.Schemas())
    return _SCHEMAS[0]


class Store:
    """The reference consumer (pilehost/consumer.py), in-process, storing into `db` (a path:
    SQLite; or a storage URL), subscribed when made. `consumer`, `handler`, `storage`."""

    def __init__(self, url, db, quiet=False, **options):
        self.storage = consumer.open_storage(db if "://" in str(db) else "sqlite:///" + str(db))
        self.storage.setup()
        self.handler = consumer.Handler(schemas(), self.storage)
        self.consumer = consumer.Consumer(url, self.handler, **options)
        if quiet:
            logging.getLogger("consumer").setLevel(logging.ERROR)  # its reconnects are the point
        self.consumer.start()
        if not self.consumer.subscribed.wait(TIMEOUT):
            self.stop()
            raise BrokerError("the reference consumer could not subscribe to %s" % consumer.redact(url))

    def count(self, key):
        return self.handler.stats.snapshot()[0].get(key, 0)

    def query(self, sql, params=()):
        return self.storage.query(sql, params)

    def stop(self):
        self.consumer.stop()
        self.storage.close()


class LocalBroker:
    """`make sim`'s broker on a free loopback port (mosquitto, or amqtt: broker_kind), and the
    reference consumer in this process, storing into a temporary SQLite file. amqtt speaks MQTT
    3.1.1 only: the consumer uses that with it (no shared groups).

    piles: with mosquitto, the shipped configuration (broker/, docs/cloud-broker.md): one user
    per pile id given (`passwords`, `pile_url()`), the pile ACL, the client id bound to the user
    on `port`; the consumer on a cloud listener of its own (`cloud_port`). None: one anonymous
    listener (amqtt always: it has no such ACL)."""

    def __init__(self, directory, asked="auto", piles=None):
        kind = broker_kind(asked, find_mosquitto())
        try:
            self.broker = Broker(directory, kind, piles=piles if kind == "mosquitto" else None)
        except BrokerError as e:
            raise SystemExit(str(e)) from None
        b = self.broker
        self.kind, self.port, self.secure, self.passwords = kind, b.port, b.secure, b.passwords
        self.cloud_port = b.cloud_port
        try:
            self.store = Store(b.cloud_url or b.url(), os.path.join(directory, "telemetry.db"),
                               protocol=mqtt.MQTTv5 if kind == "mosquitto" else mqtt.MQTTv311)
        except BrokerError as e:
            b.stop()
            raise SystemExit(str(e)) from None
        self.handler, self.storage = self.store.handler, self.store.storage
        self.consumer = self.store.consumer
        label = kind
        if self.secure:
            label += " (a user per pile, broker/)"
        if kind == "amqtt":
            label += " (pure Python%s)" % ("; mosquitto is not installed" if asked == "auto" else "")
        print("broker: %s on 127.0.0.1:%d, the reference consumer subscribed to evse/v1/#"
              % (label, self.port))

    def pile_url(self, pile_id, password=None):
        return self.broker.pile_url(pile_id, password)

    def mqtt_config(self, pile_id):
        return self.broker.mqtt_config(pile_id)

    def show(self):
        time.sleep(0.5)  # the last messages (the last will among them) on their way
        counts = self.handler.stats.snapshot()[0]
        received = {}
        for key, n in counts.items():
            kind, _, outcome = key.rpartition("_")
            if outcome in ("new", "duplicate", "conflict", "stored"):
                received[kind] = received.get(kind, 0) + n
        print("---- what the consumer received:")
        print("%-15s %s" % ("messages:", ", ".join("%s %d" % (k.replace("session_", "session/"), n)
                                                   for k, n in sorted(received.items())) or "none"))
        for table, columns in (("sessions", "session_id, stop_reason, energy_wh, duration_s"),
                               ("session_starts", "session_id, auth_source"),
                               ("piles", "pile_id, online, state, pilot, offer_a"),
                               ("rejected", "topic, reason")):
            rows = self.storage.query("SELECT %s FROM %s" % (columns, table))
            print("%-15s %s" % (table + ":", "; ".join(", ".join(str(v) for v in r) for r in rows) or "none"))
        print(consumer.summary(self.handler.stats))

    def stop(self):
        self.store.stop()
        self.broker.stop()
