"""main.run(): the collector's threshold is on during the boot only (issue 12's heap), off before
the control loop's first iteration, where collections come at the quiet moment only
(docs/architecture.md). An automatic collection inside the loop could land between a pilot read
and the contactor's opening."""
import ast
import os

from pilehost import ROOT

MAIN = os.path.join(ROOT, "firmware", "main.py")


def _run_body():
    tree = ast.parse(open(MAIN).read())
    run = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "run")
    return next(n for n in run.body if isinstance(n, ast.Try)).body


def _threshold_arg(stmt):
    call = stmt.value if isinstance(stmt, ast.Expr) else None
    if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
            and call.func.attr == "threshold" and getattr(call.func.value, "id", None) == "gc"):
        return ast.unparse(call.args[0])
    return None


def test_the_threshold_is_on_from_the_boots_start_and_off_before_the_loop():
    body = _run_body()
    assert _threshold_arg(body[0]) == "_BOOT_GC_BYTES"  # before anything is built
    loop = next(i for i, s in enumerate(body) if isinstance(s, ast.While))
    sets = [(i, _threshold_arg(s)) for i, s in enumerate(body) if _threshold_arg(s) is not None]
    assert sets[-1][1] == "-1" and sets[-1][0] < loop, sets
    for node in ast.walk(body[loop]):  # nothing in the loop turns it on again
        assert not (isinstance(node, ast.Attribute) and node.attr == "threshold"), ast.unparse(node)


def test_nothing_else_in_the_firmware_sets_the_threshold():
    folder = os.path.join(ROOT, "firmware")
    users = [name for name in sorted(os.listdir(folder)) if name.endswith(".py")
             and "gc.threshold(" in open(os.path.join(folder, name)).read()]
    assert users == ["main.py"], users
