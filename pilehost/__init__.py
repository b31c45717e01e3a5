"""The CPython side of the project (the host): everything that runs on a PC, never on a pile.

unix_port     the firmware on the MicroPython unix port: binaries, MICROPYPATH, .mpy, scenario runs
broker        one MQTT broker of our own (mosquitto or amqtt; passwords, TLS, per-pile users;
              restart keeping the port) and a black hole; broker_users: the shipped configuration
procs         free ports, ending child processes, waiting for a condition
mqtt_wire     MQTT packets on the wire and the TCP relay between a pile and its broker
consumer      the cloud's reference consumer (library; tools/consumer.py is its command line)
cloud         the reference consumer in-process on SQLite; LocalBroker (`make sim`'s broker)
link_rig      the firmware's MQTT link against a broker: config, signed commands, a watcher
fake_pile, pilecmd   a pile's telemetry played over MQTT; signed commands (docs/commands.md)
group_limit   the reference group-limit controller (a site limit shared by signed set_current_limit
              commands with a time to live) and SteeredPile, a simulated pile that obeys them
vboard        the technician's virtual board: the unix port behind a pty (`make virtual-board`)
virtual_board the wired firmware on the simulated world under a virtual clock, in this process
meter_rig     the meter drivers' bench: fake clock, sim/rs485.py's line behind UART and DE objects
technician, soak, bench, pin_table, typecheck   the code of the tools/ of the same names
chipmodel, chipheap, chipbuild   the chip-time model and the heap on the 32-bit port (`make bench
              WHAT=chip` / `WHAT=heap32`), the 32-bit image with the firmware frozen in

sim/ (the simulated hardware) runs on MicroPython; the package reads its CPython-safe modules
(scenarios) with `sim_module`, never by editing sys.path. tools/ are the command lines.
See docs/architecture.md.
"""
import importlib.util
import os
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIRMWARE = os.path.join(ROOT, "firmware")
SIM = os.path.join(ROOT, "sim")


def sim_module(name):
    """sim/<name>.py as the module `name`, loaded once: the same object the tests get with sim/
    on their path (they monkeypatch scenarios.SCENARIOS)."""
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, os.path.join(SIM, name + ".py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return module


def firmware_module(name):
    """A firmware module on CPython (config, charger), for the tools that check on the host what
    the pile would check. The firmware's modules import each other by bare name, as on the board,
    so firmware/ goes onto sys.path here, the one place the host side does that;
    `micropython.const` is all they need besides (host_tests/shims under pytest)."""
    if "micropython" not in sys.modules:
        try:
            import micropython  # noqa: F401
        except ImportError:
            shim = types.ModuleType("micropython")
            shim.const = lambda value: value
            sys.modules["micropython"] = shim
    if FIRMWARE not in sys.path:
        sys.path.insert(0, FIRMWARE)
    return importlib.import_module(name)
