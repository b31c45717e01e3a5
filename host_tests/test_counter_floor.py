"""The command counter's floor after a reboot (command_auth.py, docs/commands.md "Replays"): an
adversary drives plug-ins, closes, opens, the clock, signed commands from the operator's tool,
replays, reboots and power cuts at any byte of a counter write.

- no command is accepted twice, whatever comes between (the commands here are those a replay
  could harm: a stop or status accepted above the reservation while closed is the documented
  window, test_command_auth.py);
- after every reboot the operator's tool gets a fresh command accepted: pilecmd signs the Unix
  ms, and after a `replayed` signs above the floor it names (--floor);
- the floor does not drift: once the pile has had no car and no command for 80 s, the flash
  holds the last accepted counter, and a reboot leaves it the floor.
"""
import contextlib
import io

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pilehost import pilecmd

import command_auth as C
import session_store

SECRET = bytes(range(32))
UNIX0 = 1_800_000_000_000
NAMES = (("set_current_limit", {"amps": 10}), ("set_availability", {"state": "available"}),
         ("reboot", {}))


class PowerCut(Exception):
    """The supply gone in the middle of a counter write."""


class CuttingStore(session_store.CounterStore):
    """The counter file; `cut` (byte, renamed) makes the next save stop there: the temp file
    holds that many bytes (and, renamed, the whole new file is in place), then the power goes."""

    cut = None

    def save(self, counter):
        cut = CuttingStore.cut
        if cut is None:
            return super().save(counter)
        CuttingStore.cut = None
        data = session_store._encode(counter)
        at, renamed = cut
        if renamed:
            super().save(counter)
        else:
            with open(self.path + ".tmp", "wb") as f:
                f.write(data[:at % (len(data) + 1)])
        raise PowerCut()


class Gate:
    """flash_gate.FlashGate's interface: held while closed; poll() runs the deferred writes,
    then the open steps, with the contactor open."""

    spent = False  # FlashGate's per-iteration write flag: never set here

    def __init__(self):
        self.held = False
        self.due = []
        self.steps = []

    def spend(self):
        pass

    def defer(self, fn):
        self.due.append(fn)

    def every_open_step(self, fn):
        self.steps.append(fn)

    def poll(self, now_ms):
        if self.held:
            return
        due, self.due = self.due, []
        for fn in due + self.steps:
            assert fn(now_ms) is None


def pilecmd_payload(key, counter, floor=None):
    """What tools/pilecmd.py prints for request_status at `counter` (the Unix ms), --floor."""
    argv = ["--secret-file", key, "--counter", str(counter), "--id", "fresh", "set_availability",
            "state=available"]
    if floor is not None:
        argv[4:4] = ["--floor", str(floor)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert pilecmd.main(argv) == 0
    return out.getvalue().strip().encode()


OPS = st.one_of(
    st.tuples(st.sampled_from(("plug", "unplug", "close", "open", "replay", "reboot"))),
    st.tuples(st.just("step"), st.sampled_from((5, 1000, 20000, 90000))),
    st.tuples(st.just("cmd"), st.integers(0, len(NAMES) - 1),
              st.sampled_from((0, 1, C.RESERVE // 2, C.RESERVE + 1, 3 * C.RESERVE))),
    st.tuples(st.just("cut"), st.integers(0, 40), st.booleans()))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(OPS, max_size=40), clock_set=st.booleans())
def test_no_command_twice_a_fresh_one_after_every_reboot_and_no_drift(tmp_path_factory, ops, clock_set):
    folder = tmp_path_factory.mktemp("c")
    path = str(folder / "cmd_counter.json")
    key = str(folder / "k.hex")
    with open(key, "w") as f:
        f.write(SECRET.hex())
    CuttingStore.cut = None
    world = {"now": 0, "unix": UNIX0, "plugged": False}
    accepted = []  # payloads
    top = [0]  # the highest accepted counter
    idle_from = [0]  # since then: no car, no command (the contactor open)
    exact = [True]  # the flash holds `top` itself (released, or never reserved)

    def boot():
        gate = Gate()
        store = CuttingStore(path)
        v = C.CommandVerifier(SECRET, last_counter=store.load(), counter_store=store, gate=gate,
                              unix_ms=(lambda: world["unix"]) if clock_set else None,
                              may_close=lambda: world["plugged"])
        assert v.reserve_ahead() is None
        return gate, v

    def send(v, payload):
        try:
            cmd = v.verify(payload)
        except C.CommandError as e:
            return e
        assert payload not in accepted, "accepted twice"
        accepted.append(payload)
        top[0] = max(top[0], cmd.counter)
        idle_from[0] = world["now"]
        exact[0] = False
        return cmd

    def reboot():
        CuttingStore.cut = None
        gate, v = boot()
        if exact[0]:
            assert v.last_counter == top[0], "the floor drifted without a car or a command"
        for payload in accepted:  # none of them again
            err = send(v, payload)
            assert isinstance(err, C.CommandError) and err.code == "replayed", err
        # The operator's tool: the Unix ms, and above the floor a `replayed` names.
        world["unix"] += 1
        got = send(v, pilecmd_payload(key, world["unix"]))
        if isinstance(got, C.CommandError):
            assert got.code == "replayed", got
            assert not (exact[0] and world["unix"] > top[0]), "a fresh command refused after a reboot"
            got = send(v, pilecmd_payload(key, world["unix"], pilecmd.floor_of(str(got))))
        assert isinstance(got, C.Command), got
        return gate, v

    gate, v = boot()
    for op in ops:
        try:
            kind = op[0]
            if kind == "plug":
                world["plugged"] = True
                exact[0] = False  # a reservation at the next open step
            elif kind == "unplug":
                world["plugged"] = gate.held = False
                idle_from[0] = world["now"]
            elif kind == "close" and world["plugged"]:
                gate.held = True
            elif kind == "open":
                gate.held = False
            elif kind == "step":
                for _ in range(max(1, op[1] // 1000)):
                    world["now"] += min(op[1], 1000)
                    world["unix"] += min(op[1], 1000)
                    gate.poll(world["now"])
                    if not world["plugged"] and world["now"] - idle_from[0] >= 80000:
                        exact[0] = True
            elif kind == "cmd":
                name, args = NAMES[op[1]]
                world["unix"] += 1
                counter = max(world["unix"], v.last_counter + 1) + op[2]
                if counter < 2 ** 53:
                    send(v, pilecmd.sign(SECRET, pilecmd.make_body(name, args, counter)))
            elif kind == "replay" and accepted:
                err = send(v, accepted[len(accepted) // 2])
                assert isinstance(err, C.CommandError) and err.code == "replayed", err
            elif kind == "cut":
                CuttingStore.cut = (op[1], op[2])
            elif kind == "reboot":
                # the car stays; the contactor boots open
                gate, v = reboot()
        except PowerCut:
            exact[0] = False  # a write cut: the old file or the new, which the model does not know
            gate, v = reboot()
