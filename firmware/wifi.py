"""Wi-Fi station (docs/network.md): bring-up, watch, reconnect; one bounded step per control loop.

Given the `network.WLAN(network.STA_IF)` object: only wiring_link.py imports `network`. Of its calls
only `active(True)` waits (for the driver to start), and `start()` makes it before the control
loop; connect(), disconnect(), isconnected() and status() return at once on the ESP32.

Once connect() is called, the ESP32 driver retries a failed or lost connection by itself, with
no pause, for as long as it is asked to (ports/esp32/network_wlan.c: `reconnects` defaults to
"for ever"). This module bounds that: an attempt that has no address after _ATTEMPT_MS is called
off with disconnect(), and the next one starts after a pause that doubles from 2 s to 5 min,
with jitter so that a fleet does not crowd its access point after a power cut.

status() only says why: on the ESP32 it keeps the last failure's reason until an address is
obtained, even while a new attempt runs, so it cannot tell a running attempt from a failed one.
The password is never printed.
"""
import time

from micropython import const

from backoff import Backoff

# Scan, association, WPA2 handshake and DHCP normally take a few seconds.
_ATTEMPT_MS = const(20000)
_BACKOFF_MIN_MS = const(2000)
_BACKOFF_MAX_MS = const(300000)

_OFF = const(0)  # not started, or the interface would not start
_PAUSE = const(1)  # waiting for the next attempt
_JOINING = const(2)  # connect() asked; the driver is trying
_UP = const(3)  # an address

# WLAN.status() on the ESP32 (ports/esp32/modnetwork.h; ESP-IDF wifi_err_reason_t).
_STAT_IDLE = const(1000)
_STAT_CONNECTING = const(1001)
_REASONS = {
    200: "beacon timeout", 201: "no AP found", 202: "wrong password", 203: "association failed",
    204: "handshake timeout",
}


class Station:
    """wlan: a network.WLAN(STA_IF); report(now_ms, "wifi", text) gets every change."""

    def __init__(self, wlan, ssid, password, report=None):
        self._wlan = wlan
        self._ssid = ssid
        self._password = password
        self._report = report
        self._state = _OFF
        self._since = 0  # when the attempt or the outage began
        self._down_since = None  # when the link was last lost (None: never up yet)
        self._retry_at = 0
        self._backoff = Backoff(_BACKOFF_MIN_MS, _BACKOFF_MAX_MS)
        self.attempts = 0
        self.losses = 0
        self.restarts = 0

    def _emit(self, now_ms, text):
        if self._report is not None:
            self._report(now_ms, "wifi", text)

    @property
    def connected(self):
        return self._state == _UP

    def start(self, now_ms):
        """Switches the interface on; waits for the driver, so call it before the control loop.
        A board whose Wi-Fi will not start charges on without a network."""
        try:
            self._wlan.active(True)
        except OSError as e:
            self._emit(now_ms, "interface would not start (%s): no network until reboot" % e)
            return False
        self._state = _PAUSE
        self._retry_at = now_ms
        return True

    def poll(self, now_ms):
        """One bounded, non-blocking step; call it every control loop."""
        state = self._state
        if state == _UP:
            if not self._wlan.isconnected():
                self._lost(now_ms)
        elif state == _JOINING:
            if self._wlan.isconnected():
                self._up(now_ms)
            elif time.ticks_diff(now_ms, self._since) >= _ATTEMPT_MS:
                self._call_off(now_ms)
        elif state == _PAUSE:
            if time.ticks_diff(now_ms, self._retry_at) >= 0:
                self._connect(now_ms)

    def _connect(self, now_ms):
        self.attempts += 1
        try:
            self._wlan.connect(self._ssid, self._password)
        except OSError as e:  # e.g. "Wifi Internal Error"; never the arguments
            self._pause(now_ms, "connect() failed (%s)" % e)
            return
        if self.attempts == 1:
            self._emit(now_ms, "connecting to '%s'" % self._ssid)
        self._state = _JOINING
        self._since = now_ms

    def _up(self, now_ms):
        self._state = _UP
        self._backoff.reset()
        after = ""
        if self._down_since is not None:
            gone = time.ticks_diff(now_ms, self._down_since)
            after = " after %d.%d s without" % (gone // 1000, gone % 1000 // 100)
        self._emit(now_ms, "connected to '%s' as %s%s" % (self._ssid, self._address(), after))

    def _lost(self, now_ms):
        """The driver reconnects by itself (connect() still stands): give it one attempt's time."""
        self.losses += 1
        self._state = _JOINING
        self._since = self._down_since = now_ms
        self._emit(now_ms, "lost '%s'%s, reconnecting" % (self._ssid, self._reason()))

    def _call_off(self, now_ms):
        why = self._reason()
        try:
            self._wlan.disconnect()  # stops the driver's own retries until the next attempt
        except OSError:
            pass
        if self._down_since is None:
            self._down_since = self._since
        self._pause(now_ms, "no connection to '%s' within %d s%s" % (
            self._ssid, _ATTEMPT_MS // 1000, why))

    def _pause(self, now_ms, why):
        delay = self._backoff.next_ms()
        self._retry_at = time.ticks_add(now_ms, delay)
        self._state = _PAUSE
        self._emit(now_ms, "%s; next try in %d.%d s" % (why, delay // 1000, delay % 1000 // 100))

    def restart(self, now_ms, why):
        """The link's ladder (link_heal.py): associated but nothing gets through. Called off
        (disconnect()) and joined again at once; neither call waits."""
        self.restarts += 1
        try:
            self._wlan.disconnect()
        except OSError:
            pass
        if self._down_since is None or self._state == _UP:
            self._down_since = now_ms
        self._emit(now_ms, "restarting the connection to '%s' (%s)" % (self._ssid, why))
        self._connect(now_ms)

    def rssi(self):
        """The signal in dBm while connected (the ESP32's status("rssi")), else None."""
        if self._state != _UP:
            return None
        try:
            return self._wlan.status("rssi")
        except (OSError, ValueError, TypeError):
            return None

    def _reason(self):
        """' (why)', or '' when status() only says it is still trying."""
        try:
            code = self._wlan.status()
        except OSError:
            return ""
        if code in (_STAT_IDLE, _STAT_CONNECTING):
            return ""
        return " (%s)" % _REASONS.get(code, "status %s" % code)

    def _address(self):
        try:
            return self._wlan.ifconfig()[0]
        except (OSError, AttributeError, IndexError):
            return "?"
