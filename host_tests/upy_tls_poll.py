"""How long one MqttLink.poll() takes while the link connects over TLS (TCP connect, handshake,
CONNACK), on the MicroPython unix port (a figure, not a test: test_mqtt_tls.py runs it and prints the line).

    MICROPYPATH=<firmware .mpy>:<lib>:.frozen micropython host_tests/upy_tls_poll.py PORT CA_FILE

Connects to 127.0.0.1:PORT trusting CA_FILE, polls every 5 ms (the control period) with the
contactor open, and prints "tls poll: ..." once connected, or "tls poll: FAILED ...".
"""
import sys
import time

import link_tls
import mqtt_conn
import mqtt_link


class Section:
    def __init__(self, **values):
        for key, value in values.items():
            setattr(self, key, value)


class Outbox:
    next_seq = 1
    acked = 0

    def pending(self):
        return iter(())


def main():
    port = int(sys.argv[1])
    with open(sys.argv[2], "rb") as f:
        tls = link_tls.tls_context(f.read())  # as wiring_link.build_tls makes it
    mqtt_conn.drop_setup()
    conf = Section(host="127.0.0.1", port=port, tls_server_name=None, username=None, password=None,
                   keepalive_s=10, status_interval_s=60, meter_interval_s=10, health_interval_s=300,
                   wifi_restart_after_s=300, reset_after_s=1800, reset_min_interval_s=3600,
                   conflict_pause_s=300)
    charger = Section(state="idle", pilot="A", faults=0, offer_ma=0, session=None, remote_limit_ma=None,
                      limit_source=None)
    records = Section(meter=None, record=None, log=None, current=lambda: None)
    ctl = Section(contactor=Section(closed=False), charger=charger, output=Section(pwm_on=False),
                  records=records, guard=lambda now_ms: None)
    log = Section(pile_id="tls-poll-1", boot=1, outbox=Outbox())
    lines = []
    link = mqtt_link.MqttLink(conf, ctl, log, lambda now, what, text: lines.append(text),
                              boot_ms=time.ticks_ms(), tls=tls)
    longest = polls = 0
    start = time.ticks_ms()
    while not link.connected and time.ticks_diff(time.ticks_ms(), start) < 10000:
        t0 = time.ticks_us()
        link.poll(time.ticks_ms())
        longest = max(longest, time.ticks_diff(time.ticks_us(), t0))
        polls += 1
        time.sleep_ms(5)
    if not link.connected:
        print("tls poll: FAILED", "; ".join(lines))
        return
    print("tls poll: %d polls from the first to connected, longest poll() %d.%d ms (%s)" % (
        polls, longest // 1000, longest % 1000 // 100, [t for t in lines if "TLS" in t][0]))


main()
