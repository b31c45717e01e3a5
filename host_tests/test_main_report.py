"""main.report: every line the firmware prints goes through `logging` (micropython-logging on the
board), so a technician can add a handler (a file, a socket) without touching the modules."""
import logging
import time

import main


class Catch(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append((record.name, record.levelno, record.msg % record.args))


def test_a_line_is_a_record_on_the_sources_logger_and_printed_with_the_loops_time(capsys):
    now = time.ticks_add(main._boot_ms, 12345)
    main.report(now, "pilot", "B -> C")
    assert capsys.readouterr().out == "[  12.345] pilot: B -> C\n"
    catch = Catch()
    logging.getLogger("meter").addHandler(catch)
    try:
        main.report(now, "meter", "no reply")
        main.report(now, "meter", "100% odd text %s")  # the text is an argument, never a format
    finally:
        logging.getLogger("meter").removeHandler(catch)
    assert catch.records == [("meter", logging.WARNING, "no reply"),
                             ("meter", logging.WARNING, "100% odd text %s")]
    assert capsys.readouterr().out.splitlines() == ["[  12.345] meter: no reply",
                                                    "[  12.345] meter: 100% odd text %s"]


def test_ordinary_transitions_are_info():
    catch = Catch()
    logging.getLogger("charger").addHandler(catch)
    try:
        main.report(main._boot_ms, "charger", "idle -> charging")
    finally:
        logging.getLogger("charger").removeHandler(catch)
    assert catch.records == [("charger", logging.INFO, "idle -> charging")]
