"""The simulated hardware around the board: the pilot circuit with a car on it, the contactor
with its auxiliary contact, the residual-current module, the watchdog and (through uart
channels) the meter. Shared by the simulator and the tests; runs on MicroPython and CPython.

Nothing runs on its own: time advances whenever the firmware touches a pin, an ADC, a PWM or
the watchdog (`advance()`), which is also when scripted scenario steps fall due. The pilot
voltage is computed from the circuit at the microsecond of each ADC read, so the firmware's
real sampling strategy is exercised against the real PWM waveform.
"""
import time

# Pilot circuit, IEC 61851-1 Annex A (evse-facts section 1).
R1 = 1000  # pile's source resistor
R2 = 2740  # car: always on (B)
R3 = 1300  # car: S2 closed (C)
R3_VENT = 270  # car: S2 closed, ventilation (D)
DIODE_MV = 700
CONTACTS_CLOSE_US = 15000  # coil on -> main contacts and mirror contact closed
CONTACTS_OPEN_US = 8000
RCD_TEST_RESPONSE_US = 30000  # a healthy module answers TEST within tens of ms
NOISE_UV = 3000  # ADC noise, +-
# After the scenario's end the firmware's `finally` (main.run: safe_off) still drives its outputs
# as the end's SimEnd passes; a firmware still running this long after it lost the SimEnd (a
# MemoryError in a `finally` on the way replaces it, and it handles that as its own) is ended
# again at its next touch.
END_GRACE_US = 100000


def _parallel(a, b):
    return a * b // (a + b)


_host_time = time.time  # the real clock; rom.py gives the firmware a `time` that reads the RTC
UNIX_2000 = 946684800  # what an ESP32's RTC reads after power-on: its epoch, 2000-01-01


def _days_from_civil(y, m, d):
    """Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's days_from_civil)."""
    y -= m <= 2
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    return era * 146097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719468


def iso_us(unix_us):
    t = time.gmtime(unix_us // 1000000)
    return "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ" % (t[0], t[1], t[2], t[3], t[4], t[5],
                                                     unix_us // 1000 % 1000)


class SimReset(BaseException):
    """The board resets (watchdog or machine.reset()); the ROM boots it again. args[0]: the
    cause machine.reset_cause() gives after it (5 soft, 3 watchdog)."""


class SimEnd(BaseException):
    """The scenario is over."""


# Said instead of a log line the heap has no room for (World.log): a constant, printed without
# allocating.
LOG_LOST = "[   ?.???] sim log: a line lost, the heap is full"


def _raise(kind, spare, arg=None):
    """Raise kind() (kind(arg)), or the spare made up front when the heap has no room for a
    new exception: the scenario's end and the watchdog's reset reach the ROM at any heap, never
    a MemoryError in the firmware instead (which it would take for its own and handle)."""
    try:
        exc = kind() if arg is None else kind(arg)
    except MemoryError:
        exc = spare
    raise exc


class Car:
    def __init__(self):
        self.plugged = False
        self.wants = False  # the driver/car wants to charge (S2 closes once PWM is offered)
        self.s2 = False
        self.ventilation = False
        self.diode = True
        self.short = False  # CP shorted to PE
        self.max_a = 32
        self.obeys_c1 = True  # opens S2 when the PWM goes away under load
        self.c1_response_us = 500000
        self.cable_ohm = 220  # PP resistor: 32 A cable

    def letter(self):
        if not self.plugged:
            return "A"
        if self.short:
            return "E"
        if self.s2:
            return "D" if self.ventilation else "C"
        return "B"


def offered_ma(duty):
    """What the car reads from the duty cycle (the car's own reading of IEC 61851-1 Table A.8)."""
    d = duty * 100000 // 65535  # thousandths of a percent
    if 8000 <= d < 10000:
        return 6000
    if 10000 <= d <= 85000:
        return d * 6 // 10  # 0.6 A per %
    if 85000 < d <= 96000:
        return (d - 64000) * 25 // 10  # (D - 64) * 2.5 A
    if 96000 < d <= 97000:
        return 80000
    return 0  # 5 % digital-communication band, or not allowed


class World:
    def __init__(self, board, steps=(), clock_us=None, echo=True):
        pins = board["pins"]
        levels = board.get("levels", {})
        self.pin_pilot_pwm = pins["pilot_pwm"]
        self.pin_pilot_adc = pins["pilot_adc"]
        self.pin_pp_adc = pins.get("pp_adc")
        self.pin_coil = pins["contactor"]
        self.pin_feedback = pins.get("contactor_feedback")
        self.pin_rcd_fault = pins["rcd_fault"]
        self.pin_rcd_test = pins["rcd_test"]
        self.pin_de = pins.get("meter_de")
        self.meter_uart = pins.get("meter_uart", 2)
        self.pin_s0 = pins.get("s0")
        self.coil_on_level = levels.get("contactor_on", 1)
        self.feedback_closed_level = levels.get("contactor_feedback_closed", 0)
        self.rcd_fault_level = levels.get("rcd_fault_active", 1)
        self.rcd_test_level = levels.get("rcd_test_active", 1)
        self.pilot_inverted = levels.get("pilot_pwm_inverted", False)
        cal = board["pilot_adc"]
        self.uv_m12 = cal["uv_at_minus_12v"]
        self.uv_span = cal["uv_at_plus_12v"] - self.uv_m12
        self._uv_q, self._uv_r = divmod(self.uv_span, 24000)  # adc_uv's scale, in small ints
        pp = board.get("pp_adc") or {}
        self.pp_pullup = pp.get("pullup_ohm", 1000)
        self.pp_supply_uv = pp.get("supply_uv", 3300000)
        self.mains_v = board.get("ratings", {}).get("mains_v", 230)

        self._clock = clock_us or time.ticks_us
        self._last_raw = self._clock()
        self.now = 0  # us since the world began; never wraps
        self.echo = echo
        self.over = None  # when the scenario's "end" came: no step and no watchdog after it
        self._spare_end = SimEnd()  # _raise: made now, while the heap has room
        self._spare_bite = SimReset(3)
        self.latencies_ms = []
        self.boots = 0
        self.reset_cause = 1  # machine.PWRON_RESET

        self.car = Car()
        self.pins = {}  # output levels the firmware drives
        self.pwm_duty = None  # pilot PWM duty_u16 while a PWM drives the pilot pin
        self.pwm_period_us = 1000
        self.coil = False
        self.coil_changed = 0
        self.contacts = False
        self.welded = False
        self.dead_coil = False
        self.rcd_healthy = True
        self.rcd_leak = False
        self.rcd_test_since = None
        self.wdt_timeout_us = None
        self.wdt_fed = 0
        self.inject_error = None
        # Pilot-circuit faults (tests, the stateful test): the ADC frozen at a CP level (mV), and
        # interference, a function (now_us, cp_mv) -> the mV the ADC sees.
        self.pilot_adc_stuck_mv = None
        self.pilot_interference = None
        self._car_letter = "A"
        self._stop_at = None  # when the car stopped drawing with the coil still on
        self._pwm_off_at = None
        self._noise = 12345
        self.uarts = {}  # uart id -> rs485.UartChannel
        self.s0 = None  # object with level(now_us) and changes(now_us)
        self._s0_irq = None  # (handler, trigger, pin) set by machine.Pin.irq() on the S0 input
        self._in_irq = False  # an S0 IRQ handler runs: pin reads give the edge's level
        self._irq_level = 0
        self.meter = None  # the simulated meter (sim/meters.py), for fault injection
        self._energy_mj = 0
        self._energy_at = 0
        self.state_file = None  # rom.py: the meter register and the car, kept across a kill -9
        self.heap_base = 0  # rom.py: the simulator's own live heap, for the "heap" action
        self.ap = None  # the site's access point (ssid, password): sim/network.py joins it
        self.ap_up = True
        self.ap_changed = 0  # when it last went down or came back
        self.rtc_base_us = None  # the RTC read this (us since 1970; None: the host's clock) ...
        self.rtc_at = 0  # ... at this world time
        # Steps due at the same time keep their order (MicroPython's sort is not stable).
        order = sorted(range(len(steps)), key=lambda i: (steps[i][0], i))
        self.steps = [steps[i] for i in order]
        del order
        self._step = 0
        self._next_due = self.steps[0][0] * 1000 if self.steps else None

    # -- time -----------------------------------------------------------------------------------

    def advance(self):
        raw = self._clock()
        self.now += time.ticks_diff(raw, self._last_raw)
        self._last_raw = raw
        now = self.now
        if self.over is not None and now - self.over > END_GRACE_US:
            _raise(SimEnd, self._spare_end)
        while self._next_due is not None and now >= self._next_due and self.over is None:
            step = self.steps[self._step]
            self._step += 1
            due = self._next_due
            self._next_due = self.steps[self._step][0] * 1000 if self._step < len(self.steps) else None
            self.do(step[1], step[2] if len(step) > 2 else None)
            if self._stop_at == now:
                # The car let go at the step's time; the world only noticed at the next pin touch.
                self._stop_at = due
        if self.coil != self.contacts:
            self._move_contacts(now)
        self._update_car(now)
        if now - self._energy_at >= 10000:
            self._integrate(now)
        if self._s0_irq is not None and self.s0 is not None and not self._in_irq:
            self._s0_edges(now)
        if self.wdt_timeout_us is not None and now - self.wdt_fed > self.wdt_timeout_us and self.over is None:
            # (not after the end: its bite in the firmware's `finally` replaced the end's SimEnd,
            # the ROM booted again, the end step spent, and a board that came up ran for ever)
            self.wdt_timeout_us = None
            self.log("wdt", "watchdog timeout: board resets")
            _raise(SimReset, self._spare_bite, 3)
        for uart in self.uarts:  # the keys: .values() would allocate a view at every touch
            ch = self.uarts[uart]
            if ch.pending:
                ch.deliver(now)
        return now

    def ms(self):
        return self.now // 1000

    def log(self, kind, text):
        """Events go to stdout only: a list of them would grow the heap we are measuring. A line
        the heap has no room for is LOG_LOST: the simulator's MemoryError is not the firmware's."""
        if self.echo:
            t = self.now
            try:
                print("[%4d.%03d] sim %s: %s" % (t // 1000000, t // 1000 % 1000, kind, text))
            except MemoryError:
                print(LOG_LOST)

    def fit_meter(self, conf):
        """Install the simulated meter that config.json's "meter" section says is fitted."""
        kind = conf.get("type", "none")
        if kind == "none":
            return
        import meters

        if kind == "s0":
            self.meter = self.s0 = meters.S0MeterSim(
                self, imp_per_kwh=conf.get("imp_per_kwh", 1000), active_low=conf.get("s0_active_low", True))
            return
        import rs485

        if kind == "dlt645":
            digits = conf.get("address")  # nameplate order, A5 first; the wire sends A0 first
            device = meters.Dlt645MeterSim(self) if digits is None else meters.Dlt645MeterSim(
                self, address=bytes(int(digits[10 - 2 * i:12 - 2 * i], 16) for i in range(6)))
            baud = conf.get("baud", 2400)
        else:
            device = meters.ModbusMeterSim(self, model=kind, address=conf.get("address", 1))
            baud = conf.get("baud", 2400 if kind == "sdm120" else 9600)
        self.meter = device
        self.uarts[self.meter_uart] = rs485.UartChannel(self, device, baud)

    def fit_wifi(self, conf):
        """The access point that config.json's "wifi" section names, with its password."""
        if conf:
            self.ap = (conf.get("ssid"), conf.get("password", ""))

    # -- the RTC: time.time() on the board --------------------------------------------------------

    def wall_us(self):
        now = self.advance()
        if self.rtc_base_us is None:
            return int(_host_time() * 1000000)
        return self.rtc_base_us + now - self.rtc_at

    def rtc_set(self, dt):
        """machine.RTC().datetime((year, month, day, weekday, hours, minutes, seconds, us)), in
        UTC; the weekday is ignored, as on the ESP32."""
        self.advance()
        secs = _days_from_civil(dt[0], dt[1], dt[2]) * 86400 + dt[4] * 3600 + dt[5] * 60 + dt[6]
        self.rtc_base_us = secs * 1000000 + dt[7]
        self.rtc_at = self.now
        self.log("rtc", "set to " + iso_us(self.rtc_base_us))

    def rtc_read(self):
        us = self.wall_us()
        t = time.gmtime(us // 1000000)
        return (t[0], t[1], t[2], t[6], t[3], t[4], t[5], us % 1000000)

    # -- scenario actions -------------------------------------------------------------------------

    def do(self, action, arg=None):
        car = self.car
        if action == "plug":
            if not car.plugged:  # the soak's ground truth (tools/soak.py): register in mJ
                self.log("session", "begin %d" % self._energy_mj)
            car.plugged = True
            if arg:
                car.cable_ohm = arg
        elif action == "unplug":
            if car.plugged:
                self._integrate(self.now)
                self.log("session", "end %d" % self._energy_mj)
            car.plugged = car.wants = car.s2 = False
        elif action == "request":
            car.wants = True
        elif action == "stop_request":
            car.wants = car.s2 = False
        elif action == "ventilation":
            car.ventilation = bool(arg)
        elif action == "remove_diode":
            car.diode = False
        elif action == "short_cp":
            car.short = bool(arg)
        elif action == "stubborn_car":
            car.obeys_c1 = False
        elif action == "car_max_a":
            car.max_a = arg
        elif action == "weld":
            self.welded = True
        elif action == "dead_coil":
            self.dead_coil = True
        elif action == "rcd_leak":
            self.rcd_leak = bool(arg)
        elif action == "adc_stuck":  # the pilot ADC reads this CP level (mV) whatever the line; None: healthy
            self.pilot_adc_stuck_mv = arg
        elif action == "rcd_broken":
            self.rcd_healthy = False
        elif action == "meter_fault":
            self.meter.fault = arg  # None: healthy again
        elif action == "wifi_down":  # the access point goes away (sim/network.py)
            self.ap_up = False
            self.ap_changed = self.now
        elif action == "wifi_up":
            self.ap_up = True
            self.ap_changed = self.now
        elif action == "rtc_flat":  # the RTC as an ESP32's after power-on: its epoch, unsynced
            self.rtc_base_us = UNIX_2000 * 1000000
            self.rtc_at = self.now
        elif action == "inject_error":
            self.inject_error = arg or "injected fault in the control loop"
        elif action == "heap":  # the firmware's heap in use, then live after a collection (tools/soak.py)
            import gc

            used = gc.mem_alloc() - self.heap_base
            gc.collect()
            self.log("heap", "in use %d, live %d" % (used, gc.mem_alloc() - self.heap_base))
        elif action == "cue":  # a mark for the driver on the CPython side (tools/soak.py)
            pass
        elif action == "persist":  # keep the register and the car in this file across kill -9
            self.restore(arg)
        elif action == "end":
            self.over = self.now  # first: if what follows fails, a touch after END_GRACE_US ends the run
            self.log("sim", "scenario end")
            _raise(SimEnd, self._spare_end)
        else:
            raise ValueError("unknown scenario action %r" % action)
        self.log("step", action if arg is None else "%s %r" % (action, arg))
        self._update_car(self.now)
        self._save()

    # -- what survives a power cut (tools/soak.py kills the process) --------------------------------

    def restore(self, path):
        """Continue where the world was at the cut: the meter register and the car. From then
        on every change is written to `path` (a temporary file renamed over it: a kill mid-write
        leaves the old one)."""
        import os

        try:
            with open(path) as f:
                energy, plugged, wants = (int(v) for v in f.read().split())
        except OSError:
            energy, plugged, wants = 0, 0, 0
        self._energy_mj = energy
        self.car.plugged = bool(plugged)
        self.car.wants = bool(wants)
        self.state_file = path
        self._rename = os.rename
        self.log("state", "register %d mJ, car %s" % (energy, "plugged" if plugged else "away"))
        if plugged:
            self.log("session", "begin %d" % energy)
        self._update_car(self.now)

    def _save(self):
        if self.state_file is None:
            return
        tmp = self.state_file + ".tmp"
        with open(tmp, "w") as f:
            f.write("%d %d %d" % (self._energy_mj, self.car.plugged, self.car.wants))
        self._rename(tmp, self.state_file)

    # -- the car and the pilot line ---------------------------------------------------------------

    def pwm_present(self):
        duty = self.pwm_duty
        return duty is not None and 0 < duty < 65535

    def _update_car(self, now):
        car = self.car
        if car.plugged and car.wants:
            if self.pwm_present():
                self._pwm_off_at = None
                car.s2 = True
            elif car.s2 and car.obeys_c1:
                if self._pwm_off_at is None:
                    self._pwm_off_at = now
                elif now - self._pwm_off_at >= car.c1_response_us:
                    car.s2 = False
                    self._pwm_off_at = None
        letter = car.letter()
        if letter != self._car_letter:
            if self._car_letter in "CD" and letter not in "CD" and self.coil:
                self._stop_at = now
            self._car_letter = letter
            self.log("car", "pilot state " + letter)

    def _level_mv(self, high):
        """Steady-state CP voltage (mV) while the pile drives +12 V (high) or -12 V. No tuple
        of both: frozen into the stock image (pilehost/chipbuild.py), a constant tuple's ints
        beyond +-8191 are long ints (mpy-tool.py), and each sum with one allocates."""
        car = self.car
        if not car.plugged:
            return 12000 if high else -12000
        if car.short:
            return 0
        load = R2
        if car.s2:
            load = _parallel(R2, R3_VENT if car.ventilation else R3)
        if high:
            return (12000 - DIODE_MV) * load // (R1 + load) + DIODE_MV
        return -12000 if car.diode else -12000 * load // (R1 + load)

    def cp_mv(self, now):
        duty = self.pwm_duty
        if duty is None:
            high = self.pins.get(self.pin_pilot_pwm, 0)
            return self._level_mv((not high) if self.pilot_inverted else high)
        if self.pilot_inverted:
            duty = 65535 - duty
        phase = now % self.pwm_period_us
        return self._level_mv(phase * 65535 < duty * self.pwm_period_us)

    def _noise_uv(self):
        # A 16-bit xorshift (period 65,535): every value a small int on the 32-bit port too,
        # where an LCG's 31-bit state and its products were long ints, ~230 B of garbage and a
        # heap object kept at each pilot read (the chip's ADC read allocates nothing).
        x = self._noise
        x ^= (x << 7) & 0xFFFF
        x ^= x >> 9
        x ^= (x << 8) & 0xFFFF
        self._noise = x
        return x % (2 * NOISE_UV + 1) - NOISE_UV

    def adc_uv(self, pin):
        now = self.advance()
        if self.inject_error is not None and pin == self.pin_pilot_adc:
            text = self.inject_error
            self.inject_error = None
            raise RuntimeError(text)
        if pin == self.pin_pilot_adc:
            mv = self.pilot_adc_stuck_mv
            if mv is None:
                mv = self.cp_mv(now)
                if self.pilot_interference is not None:
                    mv = self.pilot_interference(now, mv)
            # (mv + 12000) * uv_span // 24000 without its product (above 2^30: a long int)
            uv = self.uv_m12 + (mv + 12000) * self._uv_q + (mv + 12000) * self._uv_r // 24000
            return uv + self._noise_uv()
        if pin == self.pin_pp_adc:
            if not self.car.plugged or self.car.cable_ohm is None:
                return self.pp_supply_uv
            r = self.car.cable_ohm
            div = r + self.pp_pullup  # supply * r // div in small ints (no long-int product)
            return r * (self.pp_supply_uv // div) + r * (self.pp_supply_uv % div) // div
        return 0

    # -- pins, PWM, contactor, RCD ------------------------------------------------------------------

    def pin_write(self, pin, value):
        self.advance()
        value = 1 if value else 0
        if self.pins.get(pin) == value:
            return
        self.pins[pin] = value
        if pin == self.pin_coil:
            self._set_coil(value == self.coil_on_level)
        elif pin == self.pin_rcd_test:
            self.rcd_test_since = self.now if value == self.rcd_test_level else None
        elif pin == self.pin_pilot_pwm and self.pwm_duty is None:
            self.log("pilot", "+12 V steady" if value != self.pilot_inverted else "-12 V steady")

    def pin_read(self, pin):
        if self._in_irq and pin == self.pin_s0:
            return self._irq_level
        now = self.advance()
        if pin == self.pin_feedback:
            return self.feedback_closed_level if self.contacts else 1 - self.feedback_closed_level
        if pin == self.pin_rcd_fault:
            return self.rcd_fault_level if self._rcd_fault(now) else 1 - self.rcd_fault_level
        if pin == self.pin_s0 and self.s0 is not None:
            return self.s0.level(now)
        return self.pins.get(pin, 0)

    # -- S0 pulse edges as pin interrupts (machine.Pin.irq) -------------------------------------

    def pin_irq(self, pin, handler, trigger):
        if pin.id != self.pin_s0:
            raise NotImplementedError("sim: only the S0 input has pin interrupts")
        self._s0_irq = None if handler is None else (handler, trigger, pin)
        if self.s0 is not None:
            self.s0.changes(self.now)  # edges from here on

    def _s0_edges(self, now):
        """Run the S0 IRQ handler for each edge of the output since the last touch, with the
        firmware's time.ticks_ms() reading the edge's time (ms before now, as the firmware
        counts them), as a hard IRQ at the edge would see it."""
        changes = self.s0.changes(now)
        if not changes:
            return
        import sys

        handler, trigger, pin = self._s0_irq
        tm = sys.modules.get("time")  # the firmware's time (CPython's, or rom.py's sim_time)
        saved = None if tm is None else getattr(tm, "ticks_ms", None)
        now_ms = saved() if saved is not None else time.ticks_ms()
        self._in_irq = True
        try:
            for t_us, level in changes:
                if not trigger & (1 if level else 2):  # IRQ_RISING 1, IRQ_FALLING 2
                    continue
                edge_ms = time.ticks_add(now_ms, -((now - t_us + 500) // 1000))
                self._irq_level = level
                if saved is not None:
                    try:
                        tm.ticks_ms = lambda e=edge_ms: e
                    except (AttributeError, TypeError):  # a built-in module: the late time
                        saved = None
                handler(pin)
        finally:
            self._in_irq = False
            if saved is not None:
                tm.ticks_ms = saved

    def _rcd_fault(self, now):
        if self.rcd_leak:
            return True
        since = self.rcd_test_since
        return self.rcd_healthy and since is not None and now - since >= RCD_TEST_RESPONSE_US

    def _set_coil(self, on):
        self.coil = on
        self.coil_changed = self.now
        self.log("contactor", "coil ON" if on else "coil off")
        if not on and self._stop_at is not None:
            latency = (self.now - self._stop_at) / 1000
            self.latencies_ms.append(latency)
            self.log("latency", "car stopped drawing -> coil off: %.1f ms" % latency)
        self._stop_at = None

    def _move_contacts(self, now):
        if self.coil and not self.dead_coil and now - self.coil_changed >= CONTACTS_CLOSE_US:
            self.contacts = True
            self.log("contactor", "contacts closed")
        elif not self.coil and not self.welded and now - self.coil_changed >= CONTACTS_OPEN_US:
            self.contacts = False
            self.log("contactor", "contacts open")

    def pwm_set(self, pin, freq=None, duty=None):
        self.advance()
        if pin != self.pin_pilot_pwm:
            return
        if freq:
            self.pwm_period_us = 1000000 // freq
        if duty is not None and duty != self.pwm_duty:
            self.pwm_duty = duty
            shown = 65535 - duty if self.pilot_inverted else duty
            if shown >= 65535:
                text = "+12 V steady"
            elif shown <= 0:
                text = "-12 V steady (F)"
            else:
                text = "PWM %d.%d%% (car reads %d A)" % (
                    shown * 1000 // 65535 // 10, shown * 1000 // 65535 % 10, offered_ma(shown) // 1000)
            self.log("pilot", text)
            self._update_car(self.now)

    def pwm_release(self, pin):
        if pin == self.pin_pilot_pwm:
            self.pwm_duty = None

    def wdt_start(self, timeout_ms):
        self.advance()
        self.wdt_timeout_us = timeout_ms * 1000
        self.wdt_fed = self.now

    def wdt_feed(self):
        self.advance()
        self.wdt_fed = self.now

    def reset(self, cause=5):
        """What a reset does to the hardware: GPIOs float (pull-downs hold the coil off)."""
        self.log("board", "reset")
        self.reset_cause = cause
        self.pins = {}
        self.pwm_duty = None
        if self.coil:
            self._set_coil(False)
        self.rcd_test_since = None
        self.wdt_timeout_us = None

    # -- what the car draws, for the meters ---------------------------------------------------------

    @property
    def current_a(self):
        car = self.car
        if not (self.contacts and car.s2 and self.pwm_present()):
            return 0.0
        return min(car.max_a * 1000, offered_ma(self._car_duty())) / 1000

    def _car_duty(self):
        duty = self.pwm_duty
        return 65535 - duty if self.pilot_inverted else duty

    @property
    def voltage_v(self):
        return float(self.mains_v)

    @property
    def power_w(self):
        return self.voltage_v * self.current_a

    def _integrate(self, now):
        power_mw = int(self.power_w * 1000)
        added = power_mw * (now - self._energy_at) // 1000000
        self._energy_at = now
        if added:
            self._energy_mj += added
            self._save()  # before any meter reply can show it

    @property
    def energy_wh(self):
        return self._energy_mj / 3600000

    @energy_wh.setter
    def energy_wh(self, wh):
        """The meter's register now: a fitted meter has counted for years, not from 0 (a fault
        that lowers it, sim/meters.py "backwards", stops at 0)."""
        self._integrate(self.now)
        self._energy_mj = int(wh * 3600000)
        self._save()

    def result(self):
        self._integrate(self.now)
        return {
            "latencies_ms": self.latencies_ms,
            "energy_wh": self.energy_wh,
            "boots": self.boots,
        }

