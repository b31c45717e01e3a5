"""A verified remote command -> its action on the pile -> (result, reason) for cmd/ack
(docs/commands.md). Verification is command_auth.py's; publishing the answer is the link's."""
import time

from micropython import const

import charger as ch

# What the link does besides answering (the third value of apply()).
THEN_NOTHING = const(0)
THEN_STATUS = const(1)  # publish a status next, before anything else (request_status)
THEN_STATUS_DUE = const(2)  # a status is due: what it says may have changed
THEN_REBOOT = const(3)  # reboot once the answers are out

# cmd/ack result of a refused command by CommandError.code; any other code: invalid.
_REFUSED = {"unknown_command": "unknown_command", "storage_error": "failed"}


def refused_result(code):
    return _REFUSED.get(code, "invalid")


def unix_ms():
    """The verifier's wall clock (wiring.build_verifier): unix ms once the clock is set, else
    None. A clock never set (before 2024: sntp.MIN_UNIX, in the port's own epoch) needs no
    sntp.py: a pile with commands and no ntp section does not load it (issue 12)."""
    if time.gmtime(int(time.time()))[0] < 2024:
        return None
    import sntp

    return sntp.unix_ms()


class Commands:
    """ctl: the Controller; its charger and clear_fault() are what commands act on."""

    def __init__(self, ctl, ota=None):
        self._ctl = ctl
        self._ota = ota  # ota.Updater, or None: updates off

    def apply(self, now_ms, cmd):
        """(result, reason, then) of an authentic command, per the cmd_ack schema."""
        name = cmd.cmd
        args = cmd.args
        charger = self._ctl.charger
        if name == "remote_start":
            if charger.authorize(now_ms, "remote", args["auth_id"]):
                return "accepted", None, THEN_NOTHING
            if charger.availability_wanted != ch.AVAILABLE:
                return "rejected", "out of service", THEN_NOTHING
            s = charger.session
            if s is None:
                return "rejected", "no car plugged in", THEN_NOTHING
            if s.authorized:
                return "rejected", "already authorised", THEN_NOTHING
            return "rejected", "not in this state", THEN_NOTHING
        if name == "remote_stop":
            if charger.remote_stop(now_ms):
                return "accepted", None, THEN_NOTHING
            return "rejected", "no session", THEN_NOTHING
        if name == "set_current_limit":
            amps = args["amps"]
            note = charger.set_remote_limit(None if amps is None else int(amps * 1000), now_ms,
                                            args.get("ttl_s") or charger.limit_ttl_s)
            return "accepted", note, THEN_STATUS_DUE  # note: None, or why it was not saved to flash
        if name == "clear_fault":
            text = self._ctl.clear_fault(now_ms, args["fault"])
            if text.startswith("cleared"):  # "cleared, but not saved to flash ...": say so
                return "accepted", None if text == "cleared" else text[len("cleared, but "):], THEN_NOTHING
            return "rejected", text, THEN_NOTHING
        if name == "request_status":
            return "accepted", None, THEN_STATUS
        if name == "reboot":
            return "accepted", None, THEN_REBOOT
        if name == "set_availability":
            # OCPP 1.6 "Scheduled" has no result of its own: accepted, the reason says so.
            return "accepted", charger.set_availability(now_ms, args["state"]), THEN_NOTHING
        if name == "update":  # docs/ota.md; result None: answered when the download has ended
            if self._ota is None:
                return "rejected", "no release key in config.json: updates off", THEN_NOTHING
            result, reason = self._ota.start(now_ms, cmd.id, args["release"])
            return result, reason, THEN_NOTHING
        return "unknown_command", None, THEN_NOTHING
