"""Stage one's check of what main.run() imports later in the boot (release_boot.checks(),
docs/ota.md "Stage one"), with the real firmware on the MicroPython unix port (sim/rom.py runs the
real boot.py, then main.run()), a release in rel/2 made of the firmware's bytecode.

wiring_link.py, the safety core's modules, the meter driver and the link's are imported inside
main.run(), after wiring.py is dropped (the boot in two phases, issue 12): a release whose file
is damaged after its trial passed failed there, in fail_safe, and reset at every boot, never
rolled back. Stage one now imports them and drops them again: a damaged one rolls the release
back in the same boot, and a sound release boots with nothing of the check left loaded."""
import os
import shutil

import pytest

from pilehost import FIRMWARE, firmware_module, unix_port

RELEASE = 2
VERSION = "9.9.2-rel2"  # stamped into the release's version.mpy: the console names what runs


def _compile(src, out):
    import subprocess

    subprocess.run([unix_port.mpy_cross_binary(), "-o", out, "-s", os.path.basename(src), src], check=True)


def make_release(flash, tmp_path):
    """rel/2: every firmware module as .mpy, main.mpy and a stamped version.mpy; release.json:
    release 2 good (its trial passed)."""
    rel = os.path.join(flash, "rel", str(RELEASE))
    os.makedirs(rel)
    built = unix_port.compile_for_unix()[0]
    for name in os.listdir(built):
        if name.endswith(".mpy") and name != "release_boot.mpy":  # as release.py ships, bar stage one
            shutil.copy(os.path.join(built, name), os.path.join(rel, name))
    _compile(os.path.join(FIRMWARE, "main.py"), os.path.join(rel, "main.mpy"))
    version = tmp_path / "version.py"
    version.write_text('VERSION = "%s"\n' % VERSION)
    _compile(str(version), os.path.join(rel, "version.mpy"))
    state = firmware_module("release_boot").fresh()
    state.update(good=RELEASE, floor=RELEASE)
    firmware_module("release_boot").StateStore(os.path.join(flash, "release.json")).save(state)
    return rel


def load_state(flash):
    return firmware_module("release_boot").StateStore(os.path.join(flash, "release.json")).load()


def damage(path, how):
    with open(path, "rb") as f:
        data = f.read()
    if how == "incompatible":  # another MicroPython's bytecode (its version byte)
        data = b"M\x02" + data[2:]
    elif how == "empty":  # a flash error: the file's data gone (a file cut short mid-way hangs
        data = b""  # MicroPython's .mpy loader, a C loop: micropython/micropython#13672)
    elif how == "raises":  # a module that raises at import (what a bad flash read does)
        data = None
    with open(path, "wb") as f:
        if data is None:
            f.close()
            os.remove(path)
            with open(path[:-4] + ".py", "w") as g:  # found before nothing: .py is looked up first
                g.write("raise OSError(5)\n")
        else:
            f.write(data)


def _run(flash, config, program=None):
    program = program or unix_port.unix32_binary() or unix_port.micropython_binary()
    return unix_port.run_scenario("normal", config=config, flash_dir=flash, heapsize="400k", exact_heap=True,
                                  program=program)


def _config(**extra):
    conf = {"pile_id": "boot-check-1", "meter": {"type": "ddsu666"}}
    conf.update(extra)
    return conf


def _ok(r):
    return (r.returncode == 0 and r.result is not None and r.result["boots"] == 1
            and any("-> idle" in t for _, t in r.firmware_events("charger")))


def test_a_sound_release_runs_with_nothing_of_the_check_left_loaded(tmp_path):
    """The release runs (its version on the console), its state unchanged; after the session
    neither wiring.py nor wiring_link.py nor config.py is loaded (test_heap_lazy.py's rule)."""
    flash = str(tmp_path / "flash")
    os.makedirs(flash)
    make_release(flash, tmp_path)
    r = _run(flash, _config())
    assert _ok(r), "\n".join(r.lines[-30:])
    assert any("] main: firmware %s" % VERSION in x for x in r.lines), "\n".join(r.lines[:30])
    loaded = set(r.result["modules"])
    assert not {"wiring", "wiring_link", "config", "release_boot"} & loaded, loaded
    state = load_state(flash)
    assert state["good"] == RELEASE and state["rolled"] is None, state


@pytest.mark.parametrize("module,how", [
    ("wiring_link", "incompatible"),
    ("wiring_link", "empty"),
    ("wiring_link", "raises"),
    ("controller", "incompatible"),  # wiring.build's, inside run() too
    ("modbus_meter", "raises"),  # the meter driver config.json names
    ("mqtt_link", "incompatible"),  # the link's (mqtt section)
    ("config", "empty"),
])
def test_a_release_damaged_after_its_trial_is_given_up_at_the_next_boot(tmp_path, module, how):
    """Release 2 passed its trial; then a module main.run() imports after wiring.py is gone is
    damaged. Before: fail_safe and a reset at every boot. Now stage one's check sees it: the
    factory firmware runs in the same boot (the session completes), and release.json says
    why, so no later boot selects release 2 again."""
    flash = str(tmp_path / "flash")
    os.makedirs(flash)
    rel = make_release(flash, tmp_path)
    damage(os.path.join(rel, module + ".mpy"), how)
    config = _config()
    if module == "mqtt_link":
        config["mqtt"] = {"host": "127.0.0.1", "port": 1, "keepalive_s": 10}
    r = _run(flash, config)
    assert _ok(r), "\n".join(r.lines[-30:])
    assert not any("] main: firmware %s" % VERSION in x for x in r.lines)
    assert any("boot: release %d does not start (%s:" % (RELEASE, module) in x for x in r.lines), \
        "\n".join(r.lines[:30])
    state = load_state(flash)
    assert state["good"] == 0 and state["rolled"]["release"] == RELEASE, state
    assert state["rolled"]["why"].startswith("failed to import: %s: " % module), state
    assert not {"wiring", "wiring_link", "config"} & set(r.result["modules"])
    again = _run(flash, config)  # and it stays given up
    assert _ok(again) and not any("does not start" in x for x in again.lines), "\n".join(again.lines[:30])


def test_a_pile_without_the_link_does_not_check_the_links_modules(tmp_path):
    """A damaged mqtt_link.mpy on a pile with no mqtt section is never imported by its boot:
    stage one leaves it alone (importing it would leave its names on the heap for nothing)."""
    flash = str(tmp_path / "flash")
    os.makedirs(flash)
    rel = make_release(flash, tmp_path)
    damage(os.path.join(rel, "mqtt_link.mpy"), "raises")
    r = _run(flash, _config())
    assert _ok(r), "\n".join(r.lines[-30:])
    assert any("] main: firmware %s" % VERSION in x for x in r.lines)
    assert load_state(flash)["good"] == RELEASE

