"""A remote command from the link -> verified (command_auth.py) -> its action on the pile ->
(result, reason) for cmd/ack, queued on the link (docs/commands.md). Loaded only on a pile that
takes commands (a command secret): the link's command handling lives here (issue 12 item 3)."""
import time

from micropython import const

import charger as ch
import telemetry

# What the link does besides answering (the third value of apply()).
_THEN_NOTHING = const(0)
_THEN_STATUS = const(1)  # publish a status next, before anything else (request_status)
_THEN_STATUS_DUE = const(2)  # a status is due: what it says may have changed
_THEN_REBOOT = const(3)  # reboot once the answers are out

# cmd/ack result of a refused command by CommandError.code; any other code: invalid.
_REFUSED = {"unknown_command": "unknown_command", "storage_error": "failed"}


def refused_result(code):
    return _REFUSED.get(code, "invalid")


def unix_ms():
    """The verifier's wall clock (wiring_link.build_verifier): unix ms once the clock is set, else
    None. A clock never set (before 2024: sntp._MIN_UNIX, in the port's own epoch) needs no
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
                return "accepted", None, _THEN_NOTHING
            if charger.availability_wanted != ch.AVAILABLE:
                return "rejected", "out of service", _THEN_NOTHING
            s = charger.session
            if s is None:
                return "rejected", "no car plugged in", _THEN_NOTHING
            if s.authorized:
                return "rejected", "already authorised", _THEN_NOTHING
            return "rejected", "not in this state", _THEN_NOTHING
        if name == "remote_stop":
            if charger.remote_stop(now_ms):
                return "accepted", None, _THEN_NOTHING
            return "rejected", "no session", _THEN_NOTHING
        if name == "set_current_limit":
            amps = args["amps"]
            note = charger.set_remote_limit(None if amps is None else int(amps * 1000), now_ms,
                                            args.get("ttl_s") or charger.limit_ttl_s)
            return "accepted", note, _THEN_STATUS_DUE  # note: None, or why it was not saved to flash
        if name == "clear_fault":
            text = self._ctl.clear_fault(now_ms, args["fault"])
            if text.startswith("cleared"):  # "cleared, but not saved to flash ...": say so
                return "accepted", None if text == "cleared" else text[len("cleared, but "):], _THEN_NOTHING
            return "rejected", text, _THEN_NOTHING
        if name == "request_status":
            return "accepted", None, _THEN_STATUS
        if name == "reboot":
            return "accepted", None, _THEN_REBOOT
        if name == "set_availability":
            # OCPP 1.6 "Scheduled" has no result of its own: accepted, the reason says so.
            return "accepted", charger.set_availability(now_ms, args["state"]), _THEN_NOTHING
        if name == "update":  # docs/ota.md; result None: answered when the download has ended
            if self._ota is None:
                return "rejected", "no release key in config.json: updates off", _THEN_NOTHING
            result, reason = self._ota.start(now_ms, cmd.id, args["release"])
            return result, reason, _THEN_NOTHING
        return "unknown_command", None, _THEN_NOTHING

    def received(self, link, now_ms, raw):
        """A command's payload off mqtt_link.MqttLink (`link`), once its receiving step is over:
        verified, applied, its answer queued on the link's acks, and what the link does next."""
        import command_auth  # loaded by now: the verifier is its (wiring_link.build_verifier)

        try:
            cmd = link._verifier.verify(raw)
        except command_auth.CommandError as e:  # str(e): fixed texts, never the payload or key
            link._emit(now_ms, "command refused: %s" % e)
            if e.command_id is not None and e.cmd is not None:
                ack(link, e.command_id, e.cmd, refused_result(e.code), str(e))
            return
        except MemoryError:  # a fragmented heap: refuse this one (nothing changed), keep running
            link._emit(now_ms, "command refused: out of memory")
            return
        pile = link._pile
        pile.guard()  # the verification (HMAC, counter write) was a slice of its own
        result, reason, then = self.apply(now_ms, cmd)
        pile.guard()
        if then == _THEN_STATUS:
            link._todo_status = True
        elif then == _THEN_STATUS_DUE:
            link._status_due = True
        elif then == _THEN_REBOOT:
            link._reboot = True
        if result is None:  # an update: answered when its download has ended (ota.py)
            return
        link._emit(now_ms, "command %s %s: %s%s" % (cmd.cmd, cmd.id, result,
                                                    "" if reason is None else ", " + reason))
        ack(link, cmd.id, cmd.cmd, result, reason)
        pile.guard()  # then the link's work (a status it asked for) is a slice of its own


def ack(link, cmd_id, cmd, result, reason):
    """The cmd/ack message of a command, queued on the link (sent by its _work)."""
    link._acks.append(telemetry.cmd_ack(link._wall(), cmd_id, cmd, result, reason))
