"""The board at its REPL before mpremote talks to it (pilehost/technician.py; docs/technician.md).

mpremote sends one Ctrl-C, then Ctrl-A, and waits 10 s for the raw REPL's banner. That holds for
a pile whose main.run() is in its control loop: the Ctrl-C lands in run()'s try, the pile goes to
service mode and the REPL reads the Ctrl-A. A Ctrl-C that lands while the board boots does not:
in the ROM it is lost; in boot.py, boot.py ends and main.py runs on, never reading the Ctrl-A; in
main.py's imports the pile stops at the REPL without service mode; on the virtual board before
the unix port installs its handler it ends the process (a reset). Right after `make reboot` or a
power-on (docs/technician.md) that is the first second or so.

So before mpremote, interrupt() waits for the boot it hears to reach main.run()'s try (the line
run() prints there: READY), sends Ctrl-C and reads until the REPL prompt. A Ctrl-C service mode
saw is answered within a second: its line (SERVICE), then the prompt. One the boot lost is sent
again once the boot has reached run()'s try: at READY if a boot began after that Ctrl-C, QUIET_S
after READY without SERVICE, or after QUIET_S of silence (a board in its ROM). Never sooner: a
second Ctrl-C inside service mode's entry would end it before its timer feeds the watchdog.
Bounded: ATTEMPTS Ctrl-C within DEADLINE_S, then NoRepl, saying what the board said last.
"""
import time

import serial

# firmware/main.py run(): printed once run() is in its try, where Ctrl-C means service mode.
READY = b"main: firmware "
# firmware/diag.py service_mode(): the Ctrl-C was seen; the REPL follows.
SERVICE = b"main: service mode"
# The friendly REPL's prompt: main.py has ended (service mode) or was not running.
PROMPT = b">>> "
# The raw REPL's Ctrl-C clears its line and prints nothing; Ctrl-B after it leaves the raw REPL
# (a session cut off inside it) for the friendly one, which prints its banner and PROMPT. Read
# only at a REPL: a board in main.py keeps it in its input until then, and the REPL's banner again.
INTERRUPT = b"\r\x03\x02"
# The first line of a boot: the virtual board's (sim/vboard_rom.py), an ESP32 ROM's reset cause.
BOOTS = (b"sim board: power-on", b"rst:0x")
ATTEMPTS = 3
# Before the first Ctrl-C: long enough to hear a boot that is under way (the ROM's or the virtual
# board's first line comes within ms of the reset), short beside a technician's command.
LISTEN_S = 0.5
# A board that said nothing for this long after a Ctrl-C did not see it; service mode's entry
# prints its line well within it (~0.2 s on the virtual board, ~1 s with the CPUs shared by a
# test run).
QUIET_S = 3.0
DEADLINE_S = 30.0  # a boot to main.run() (~1 s on an ESP32) three times over, and the quiet
_READ_S = 0.05


class NoRepl(Exception):
    pass


def _last_boot(said):
    return max(said.rfind(b) for b in BOOTS)


def _ready_after(said, pos):
    """READY's whole line after `pos` in what was said (the boot that began there is in run())."""
    i = said.rfind(READY)
    return i > pos and said.find(b"\n", i) > 0


def _listen(line, deadline, clock):
    """Before the first Ctrl-C: if a boot is heard within LISTEN_S, until it reaches READY (or
    QUIET_S of silence: a boot that stopped short of main.run(), whose REPL takes a Ctrl-C)."""
    said = b""
    now = clock()
    until = now + LISTEN_S
    while now < until and now < deadline:
        data = line.read(256)
        now = clock()
        if data:
            said += data
            boot = _last_boot(said)
            if boot >= 0 and (_ready_after(said, boot) or PROMPT in said[boot:]):
                break  # the boot reached run()'s try, or its REPL
            if boot >= 0:
                until = now + QUIET_S  # a boot under way: wait for it to reach run()
    return said


def _wait(line, deadline, clock):
    """After a Ctrl-C: read until PROMPT ('prompt'), or until the Ctrl-C is seen lost ('lost'),
    or the deadline ('deadline'); and what was read."""
    said = b""
    heard = clock()  # the Ctrl-C's write, then the board's last output
    ready = None  # when READY came
    while True:
        data = line.read(256)
        now = clock()
        if data:
            said += data
            heard = now
            if PROMPT in said:
                return "prompt", said
            if ready is None and READY in said:
                ready = now
            boot = _last_boot(said)
            if boot >= 0 and _ready_after(said, boot):
                return "lost", said  # a boot began after the Ctrl-C and is now in run()'s try
        if now > deadline:
            return "deadline", said
        if SERVICE in said:
            continue  # service mode began: its prompt follows
        if now > heard + QUIET_S or ready is not None and now > ready + QUIET_S:
            return "lost", said  # (a boot that stopped short of READY: a held pile, in run())


def interrupt(line, attempts=ATTEMPTS, deadline_s=DEADLINE_S, clock=time.monotonic):
    """Ctrl-C on `line` (an open pyserial port) until the board shows its REPL prompt; at most
    `attempts` of them within deadline_s. Returns what the board said after the last Ctrl-C;
    NoRepl, with the last lines it said, if no prompt came."""
    deadline = clock() + deadline_s
    heard = _listen(line, deadline, clock)
    sent = 0
    while sent < attempts and clock() < deadline:
        line.reset_input_buffer()  # what the board said before this Ctrl-C
        line.write(INTERRUPT)
        sent += 1
        how, said = _wait(line, deadline, clock)
        if how == "prompt":
            return said
        heard += said
    tail = heard.decode("utf-8", "replace").strip().splitlines()[-3:]
    raise NoRepl("no REPL prompt after %d Ctrl-C in %.0f s (the board %s)" % (
        sent, deadline_s - max(0.0, deadline - clock()),
        "said nothing" if not heard.strip() else "said last: " + " | ".join(tail)))


def open_line(port):
    """The port as mpremote opens it (115200 baud, exclusive), reads returning after _READ_S."""
    return serial.Serial(port, 115200, timeout=_READ_S, exclusive=True)


def to_repl(port, **kwargs):
    """interrupt() on `port`, opened and closed again: mpremote opens it next."""
    with open_line(port) as line:
        return interrupt(line, **kwargs)
