"""main.run()'s boot in two phases (issue 12, docs/architecture.md): wiring.py builds the pile's
core and is dropped, then wiring_link.py builds the link's parts. Boot-only code: main.run()
imports this module for its boot and drops it before it makes the link, so that its bytecode is
on the heap neither at the boot's peak nor for the run. A pile held unavailable stays here.
"""
import gc
import sys
import time

from micropython import const

import console

_HOLD_POLL_MS = const(100)


def hold_unavailable(board, reason):
    """Config unusable: no charging until a technician fixes it. Rebooting would not help."""
    console.unavailable = reason
    console.report(time.ticks_ms(), "config", reason)
    console.report(time.ticks_ms(), "main", "pile unavailable until the configuration is fixed")
    import wiring  # dropped after the boot's first phase: imported again

    keep_open = wiring.hold_outputs(board)
    idle = wiring.idle
    while True:
        if keep_open is not None:
            keep_open()
        idle()
        time.sleep_ms(_HOLD_POLL_MS)


def build_core():
    """The boot's first phase, wiring.py: (board, conf, controller, wiring.handover). A function
    of its own: a call's frame can hold stale references to the module it used (the collector
    scans the stack conservatively), and this one is gone when main.run() drops wiring.py."""
    import wiring  # main.py holds none: imported again when run() is run again (a bench)

    board, conf, problem = wiring.load_settings()
    if problem:
        hold_unavailable(board, problem)
    try:
        ctl = wiring.build(board, conf)
    except wiring.Unavailable as e:
        hold_unavailable(board, str(e))
    return board, conf, ctl, wiring.handover  # the link's room, OTA's survey: for the link phase


def drop_wiring():
    """wiring.py builds the pile's core once: its ~5 KiB of bytecode need not stay on the heap
    beside the link's modules, nor for the run (issue 12). Nothing built keeps one of its
    functions (test_heap_lazy.py); service mode and a held pile import it again."""
    sys.modules.pop("wiring", None)
    gc.collect()


def build_link(board, conf, ctl, handover):
    """The boot's second phase, after wiring.py is dropped (wiring_link.py): (the link's class and
    keyword arguments, Wi-Fi station, clock, watchdog); main.run() drops wiring_link.py when this
    frame is gone, then makes the link."""
    import wiring_link

    try:
        make, args = wiring_link.link_parts(board, conf, ctl, handover)
    except wiring_link.Unavailable as e:
        hold_unavailable(board, str(e))
    station = wiring_link.build_wifi(conf)
    clock = wiring_link.build_clock(conf, ctl)
    return make, args, station, clock, wiring_link.watchdog(conf.wdt_timeout_ms)
