"""`make sim`: the firmware on the MicroPython unix port against the simulated hardware (sim/).

    python tools/sim.py [SCENARIO] [--board NAME] [--heap 64k] [--meter TYPE]
                        [--broker auto|mosquitto|amqtt | --no-broker]
    python tools/sim.py --list

The firmware's MQTT link talks to a local broker, and the reference consumer's findings are
printed at the end (pilehost.cloud.LocalBroker); the run itself is pilehost.unix_port.
"""
import argparse
import tempfile

from pilehost import cloud, procs, unix_port

scenarios = unix_port.scenarios


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", nargs="?", default=scenarios.DEFAULT)
    parser.add_argument("--board", default="ref-esp32")
    parser.add_argument("--heap", default=unix_port.DEFAULT_HEAP,
                        help="the firmware's heap budget (the simulator's share is added on top)")
    parser.add_argument("--meter", choices=("none", "ddsu666", "sdm120", "sdm630", "dlt645", "s0"),
                        help="the meter fitted (default: the scenario's, else %s)"
                             % scenarios.BASE_CONFIG["meter"]["type"])
    parser.add_argument("--list", action="store_true", help="list the scenarios")
    parser.add_argument("--broker", nargs="?", const="auto", default="auto",
                        choices=("auto", "mosquitto", "amqtt"),
                        help="the local broker the firmware's MQTT link talks to, with the reference "
                             "consumer on it (default auto: mosquitto when installed, else amqtt)")
    parser.add_argument("--no-broker", action="store_true",
                        help="no broker and no MQTT link: the firmware and the simulated hardware alone")
    args = parser.parse_args(argv)
    procs.stop_on_sigterm()
    if args.list:
        for name, spec in scenarios.SCENARIOS.items():
            print("%-26s %s" % (name, spec["doc"]))
        return 0
    if args.scenario not in scenarios.SCENARIOS and not args.scenario.startswith("latency_trials"):
        parser.error("unknown scenario %r (see --list)" % args.scenario)
    if args.scenario == "ota":  # a fleet and its rollouts, not one pile (docs/ota.md)
        from pilehost import ota_sim

        return ota_sim.main()
    if args.scenario == "heal":  # the link broken from the host side while it runs (docs/network.md)
        from pilehost import heal_sim

        return heal_sim.main()
    print("scenario %s: %s" % (args.scenario, scenarios.get(args.scenario)["doc"]))
    config = {"meter": {"type": args.meter}} if args.meter else {}
    broker = None
    heap = args.heap
    with tempfile.TemporaryDirectory(prefix="pile-broker-") as tmp:
        if not args.no_broker:
            pile_id = scenarios.BASE_CONFIG["pile_id"]
            broker = cloud.LocalBroker(tmp, args.broker, piles=(pile_id,))  # its own user (broker/)
            config["mqtt"] = broker.mqtt_config(pile_id)
            heap = unix_port.MQTT_HEAP if heap == unix_port.DEFAULT_HEAP else heap
        try:
            run = unix_port.run_scenario(args.scenario, args.board, config=config or None, heapsize=heap,
                                         echo=True)
            if broker is not None:
                broker.show()
        finally:
            if broker is not None:
                broker.stop()
    if run.result is None:
        print("simulation ended without a result (exit %s)" % run.returncode)
        return 1
    res = run.result
    lat = res["latencies_ms"]
    print("---- %d boot(s), %.1f Wh delivered, heap %d B live at the end (simulator %d B of it)%s" % (
        res["boots"], res["energy_wh"], res["heap_after_collect"], res["heap_simulator"],
        ", car-stop -> contactor-open: " + ", ".join("%.1f ms" % v for v in lat) if lat else ""))
    return 0
