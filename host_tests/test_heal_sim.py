"""`make sim SCENARIO=heal` (pilehost/heal_sim.py) runs as the README says and ends as it states:
the link broken three ways while a car charges (a broker that answers no CONNACK, a Wi-Fi that
routes nothing, a second client with the pile's id and password), healed each time without a
reset and without opening the contactor, each step of the ladder in the health messages the cloud
received and in the consumer's `pile_health`."""
import pytest

from pilehost import heal_sim, unix_port
from pilehost.cloud import schemas

try:
    unix_port.micropython_binary()
except FileNotFoundError:  # pragma: no cover - `make test` installs it
    pytest.skip("MicroPython unix port not installed (make venv)", allow_module_level=True)


def test_the_heal_scenario_heals_three_breaks_while_the_car_charges():
    said = []
    code, r, healths, missed = heal_sim.run(said.append)
    text = "\n".join(said)
    assert (code, missed) == (0, []), text
    assert said[0].startswith("scenario heal: the link breaks three ways")
    for heading in ("---- 1. broker cut", "---- 2. the Wi-Fi associates but routes nothing",
                    "---- 3. a second client connects with the pile's id"):
        assert heading in text
    for h in healths:
        schemas().check("health", h)
    assert {h["boot"] for h in healths} == {1}
    by_connects = {}
    for h in healths:
        by_connects.setdefault(h["link"]["connects"], h)
    assert by_connects[2]["link"]["last_step"] == "reconnect"
    assert by_connects[2]["link"]["wifi_restarts"] == 0
    back = by_connects[3]["link"]
    assert back["last_step"] == "wifi_restart" and back["wifi_restarts"] >= 2 and back["resets"] == 0
    assert any(h["link"]["client_id_conflict"] for h in healths)
    assert not healths[-1]["link"]["client_id_conflict"]
    # charging all along: one close, one open at the car's stop, no reset
    assert r.result["boots"] == 1
    assert sum(1 for line in r.lines if "coil ON" in line) == 1
    assert not any("resetting the board" in line for line in r.lines)
    assert [line for line in said if line.startswith("pile_health:")][0].startswith("pile_health:    1, ")
    assert "---- 1 boot(s), contactor closed 1 time(s) (charging through all three), 0 board reset(s)" in text
