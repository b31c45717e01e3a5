"""The control loop under the watchdog (docs/architecture.md): tick, then the console's queue,
then the records, then the network, then the link, then the watchdog. Any unhandled error opens
the contactor, drives the pilot to F and stops feeding the watchdog, which resets the board.
Ctrl-C hands the pile to diag.py's service mode.
"""
import console  # first: its import is the console's time 0
import gc
import sys
import time

import wiring
from version import VERSION

# Without a running watchdog (an error before it started), reboot after this long in the safe state.
_FAILSAFE_REBOOT_MS = 5000
_HOLD_POLL_MS = 100  # fail_safe's
# Collections at the loop's quiet moment, right after the tick, then a pilot read (issue 12,
# docs/architecture.md): often enough that the heap never fills up, so the automatic collection
# (on exhaustion only: gc.threshold is off in the loop) does not land inside slow work. By time, not by
# gc.mem_free(): that scans the whole heap (~5 ms on an ESP32 with 110 KiB).
_GC_PERIOD_MS = 250
# During the boot (contactor open, no loop yet) the collector also runs after every this many
# bytes allocated: the imports' garbage goes before the long-lived objects are laid out, so
# these sit packed rather than scattered among its holes, and the loop's 300-450 B messages
# find room (issue 12: 105 KiB whole heap completed 4 of 6 runs with it, 1 of 6 without).
# Off again before the loop: there, collections come at the quiet moment only.
_BOOT_GC_BYTES = 4096
_gc_at = [None]
# machine's own idle and reset (wiring.py hands the builtins): kept when wiring.py is dropped.
_idle = wiring.idle
_reset = wiring.reset
# Not held here: main.py's globals live for the whole run (as __main__, and after a hand-over to
# a release's main.run()), and run()'s boot (startup.py) drops wiring.py after its first phase.
del wiring


def collect(now_ms):
    """gc.collect() once every _GC_PERIOD_MS; True if it ran."""
    last = _gc_at[0]
    if last is not None and time.ticks_diff(now_ms, last) < _GC_PERIOD_MS:
        return False
    gc.collect()
    _gc_at[0] = now_ms
    return True


def fail_safe(ctl, exc):
    """Last resort: contactor open and pilot F first, then say why, then let the board reset."""
    if ctl is not None:
        try:
            ctl.safe_off()
        except Exception as e:  # noqa: BLE001 - pins failing too; the watchdog still resets us
            print("fail-safe: could not drive outputs:", repr(e))
    try:
        console.report(time.ticks_ms(), "main", "internal error, contactor open, pilot F, resetting")
        sys.print_exception(exc)
    except Exception:  # noqa: BLE001 - no heap left even to say why: the reset matters more
        pass
    start = time.ticks_ms()
    while time.ticks_diff(time.ticks_ms(), start) < _FAILSAFE_REBOOT_MS:
        if ctl is not None:
            ctl.contactor.open()  # keep asserting it; the watchdog is no longer fed
        _idle()
        time.sleep_ms(_HOLD_POLL_MS)
    _reset()


def service(board, conf, ctl, link, wdt):
    """Ctrl-C: diag.py's service mode, with wiring.py imported again."""
    import diag
    import wiring

    diag.service_mode(board, conf, ctl, link, wdt, wiring.service_timer, wiring.reset)


def run():
    ctl = link = wdt = board = conf = None
    try:
        gc.threshold(_BOOT_GC_BYTES)
        import startup  # the boot's code: dropped with wiring_link.py, before the link is made

        board, conf, ctl, handover = startup.build_core()
        startup.drop_wiring()  # before the link's modules load: the boot's peak is not both (issue 12)
        make, args, station, clock, wdt = startup.build_link(board, conf, ctl, handover)
        del handover, startup
        sys.modules.pop("startup", None)
        sys.modules.pop("wiring_link", None)  # nothing built keeps one of its functions either
        if conf.ota is None:  # files.py names the files for the boot; an update (ota.py) reads it
            sys.modules.pop("files", None)  # later: kept with OTA, not loaded again at run time
        gc.collect()
        if make is not None:  # the link made now: wiring_link.py is not beside link_setup.py at
            link = make(**args)  # the boot's peak (issue 12); the watchdog runs, far from its 1 s
            link.station = station  # the link's ladder restarts the Wi-Fi (link_heal.py)
        del make, args
        gc.threshold(-1)  # the loop's collections: collect() at the quiet moment only
        console.report(time.ticks_ms(), "main", "firmware %s, board %s, %s, max %s A%s" % (
            VERSION, board.name, conf.standard, conf.max_current_a,
            ", free vend" if conf.free_vend else ""))
        period = conf.control_period_ms
        while True:
            start = time.ticks_ms()
            was_closed = ctl.contactor.closed
            ctl.tick(start)
            guard = ctl.guard  # between slices of slow work while closed (docs/architecture.md)
            if collect(start) or ctl.contactor.closed and not was_closed:
                guard(time.ticks_ms())  # a collection, or a close, was this iteration's slice
            console.step(time.ticks_ms())  # the console's queue: within the UART's FIFO now, closed
            ctl.records.poll(start, guard)  # the records step: after the tick's power-off decision
            if station is not None:
                station.poll(start)
            if clock is not None:
                clock.poll(start, station is None or station.connected)
            if link is not None:
                link.poll(start)  # one non-blocking step; a hung link would starve the watchdog
            wdt.feed()  # only a loop that completed a tick feeds the watchdog
            spent = time.ticks_diff(time.ticks_ms(), start)
            if spent < period:
                time.sleep_ms(period - spent)
    except KeyboardInterrupt:  # Ctrl-C: mpremote, a technician at the REPL
        if ctl is not None:
            ctl.safe_off()  # first
        service(board, conf, ctl, link, wdt)
    except Exception as e:  # noqa: BLE001 - any error at all must end in the safe state
        fail_safe(ctl, e)
    finally:
        # Also on SystemExit, and after service mode's own safe_off: never leave power on.
        if ctl is not None:
            ctl.safe_off()


if __name__ == "__main__":
    import release_boot  # the release boot.py selected, or this one (docs/ota.md)

    if release_boot.selected():
        release_boot.run_main(run, _reset)
    else:  # this one: release_boot's ~4 KB would stay on the heap for the whole run
        del release_boot, sys.modules["release_boot"]
        run()
