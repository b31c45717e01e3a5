"""The link's escalation reset (docs/network.md), code that runs only with the contactor open
and never at the boot's heap peak (issue 12 item 3): heal.json read once at the boot, before the
link's set-up (link_setup.py), and the board reset of the ladder's last rung.

Imported when it is needed and dropped at once after (link_heal.HealStore, mqtt_conn.drop_setup),
as link_setup.py is: its bytecode is not on the heap beside link_setup.py's while the link is
built, nor for the run. The reset is due only with no session open (link_heal.Ladder.due), so it
is never imported with the contactor closed (host_tests/test_link_setup.py)."""
import time

from micropython import const

_STEP_RESET = const("reset")  # link_heal.STEP_RESET (this module does not import link_heal)


def load_heal(store, path):
    """link_heal.HealStore.__init__'s work: files.HEAL_FILE read at the boot. Unreadable: a
    streak of 1, so the rate stays slow."""
    import json

    store.path = path
    store.resets = 0
    store.streak = 0
    store.reason = None
    try:
        with open(path) as f:
            d = json.load(f)
        store.resets = int(d["resets"])
        store.streak = int(d["streak"])
        store.reason = d.get("reason")
    except OSError:
        pass  # never written: no escalation reset yet
    except (ValueError, KeyError, TypeError):
        store.streak = 1


def resetting(heal, why):
    """The ladder's (link_heal.Ladder, heal) count of an escalation reset, before it: on flash
    (the contactor is open: Ladder.due saw to it)."""
    store = heal._store
    store.resets += 1
    store.streak += 1
    store.reason = why
    store.save()
    heal.resets = store.resets
    heal.last_step = _STEP_RESET
    heal.last_reason = why


def reset_board(link, now_ms):
    """mqtt_link.MqttLink._escalate's STEP_RESET: counted on flash first (the rate holds across
    the reset), the contactor opened, the board reset. Due only with no session open."""
    heal = link._heal
    why = "no broker for %d s" % (time.ticks_diff(now_ms, heal.down_since) // 1000)
    try:
        resetting(heal, why)  # on flash first: the rate holds across the reset
    except OSError as e:
        heal.down_since = now_ms  # try again after a whole reset_after_s
        link._emit(now_ms, "board reset given up: heal.json not written (%s)" % e)
        return
    link._emit(now_ms, "resetting the board: %s (escalation reset %d)" % (why, heal.resets))
    link._pile.safe_off()  # contactor open first: never rely on the reset's pin state
    if link._reset is not None:
        link._reset()
    heal.down_since = now_ms  # no reset to make (a bench): not again at once
