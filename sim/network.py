"""Simulated `network` module: the ESP32's Wi-Fi station against world.WORLD's access point.

The unix port has no `network`; this one behaves as ports/esp32/network_wlan.c does: connect()
returns at once and the driver keeps trying (scan, association, DHCP) for as long as it is
asked to; an access point that goes away is noticed after a beacon timeout and retried;
status() keeps the last failure's reason until the next address is obtained. Scenario steps
"wifi_down" / "wifi_up" take the access point away and bring it back (sim/world.py).

Built into the ESP32's firmware image, it is loaded as part of the simulator (rom.py), not of
the firmware's heap budget.
"""
import world

STA_IF = 0
AP_IF = 1

# ports/esp32/modnetwork.h and ESP-IDF's wifi_err_reason_t.
STAT_IDLE = 1000
STAT_CONNECTING = 1001
STAT_GOT_IP = 1010
STAT_BEACON_TIMEOUT = 200
STAT_NO_AP_FOUND = 201
STAT_WRONG_PASSWORD = 202
STAT_ASSOC_FAIL = 203
STAT_HANDSHAKE_TIMEOUT = 204
_ASSOC_LEAVE = 8  # after disconnect()

JOIN_US = 700000  # scan, association, WPA2 handshake and DHCP on a quiet channel
SCAN_US = 1500000  # a scan of every channel that finds no such network
BEACON_LOSS_US = 1000000  # beacons missed before the driver gives the AP up (short, for scenarios)

ADDRESS = "192.168.4.23"
RSSI = -61  # dBm, a fair signal


def _w():
    return world.WORLD


class _Station:
    def __init__(self):
        self._active = False
        self._requested = False  # connect() stands: the driver keeps trying
        self._connected = False
        self._reason = 0
        self._since = 0  # the driver's current try began
        self._ssid = None
        self._key = None

    def active(self, flag=None):
        if flag is None:
            return self._active
        w = _w()
        w.advance()
        self._active = bool(flag)
        if not self._active:
            self._requested = self._connected = False
        w.log("wifi", "station " + ("on" if self._active else "off"))
        return self._active

    def connect(self, ssid=None, key=None, *, bssid=None):
        now = self._update()
        if not self._active:
            raise OSError("Wifi Not Started")
        if ssid is not None:  # the ESP32 replaces the whole station config
            self._ssid = ssid
            self._key = key or ""
        self._requested = True
        self._since = now

    def disconnect(self):
        self._update()
        if self._connected:
            _w().log("wifi", "station disconnected")
        self._requested = self._connected = False
        self._reason = _ASSOC_LEAVE

    def isconnected(self):
        self._update()
        return self._connected

    def status(self, param=None):
        """The ESP32's order of answers (network_wlan.c network_wlan_status)."""
        if param == "rssi":  # the ESP32 answers it only while connected
            if not self.isconnected():
                raise OSError("STA is not connected")
            return RSSI
        if param is not None:
            raise ValueError("sim: status(%r) not simulated" % (param,))
        self._update()
        reason = self._reason
        if self._connected:
            return STAT_GOT_IP
        if reason in (STAT_NO_AP_FOUND, STAT_WRONG_PASSWORD):
            return reason
        if reason == _ASSOC_LEAVE:
            return STAT_IDLE
        if self._requested:
            return STAT_CONNECTING
        return STAT_IDLE if reason == 0 else reason

    def ifconfig(self):
        ip = ADDRESS if self.isconnected() else "0.0.0.0"
        return (ip, "255.255.255.0", "192.168.4.1", "192.168.4.1")

    def _update(self):
        w = _w()
        now = w.advance()
        if not self._active:
            return now
        if self._connected:
            if not w.ap_up and now - w.ap_changed >= BEACON_LOSS_US:
                self._connected = False
                self._reason = STAT_BEACON_TIMEOUT
                self._since = now
                w.log("wifi", "station lost the access point (beacon timeout)")
            return now
        if not self._requested:
            return now
        ap = w.ap
        if not w.ap_up or ap is None or ap[0] != self._ssid:
            if now - self._since >= SCAN_US:
                self._reason = STAT_NO_AP_FOUND
            return now
        began = self._since if w.ap_changed < self._since else w.ap_changed
        if now - began < JOIN_US:
            return now
        if ap[1] != self._key:
            self._reason = STAT_WRONG_PASSWORD
            return now
        self._connected = True
        self._reason = 0
        w.log("wifi", "station joined %r, address %s" % (self._ssid, ADDRESS))
        return now


_station = None
_boot = None


def WLAN(interface=STA_IF):
    """The one station interface, as on the ESP32 (WLAN(STA_IF) is a singleton there); a reset
    of the board starts the driver afresh."""
    global _station, _boot
    if interface != STA_IF:
        raise ValueError("sim: only the station interface is simulated")
    if _station is None or _boot != _w().boots:
        _station = _Station()
        _boot = _w().boots
    return _station
