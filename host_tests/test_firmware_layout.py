"""The firmware's import rules (docs/architecture.md), read from the sources with ast: only
wiring.py, wiring_link.py and boot.py import `machine` or `network`; nothing imports main; the
firmware's modules import each other one way (no cycle, function-level imports included)."""
import ast
import glob
import os

import pytest

from pilehost import ROOT
from pilehost.source_imports import import_time_imports

FIRMWARE = os.path.join(ROOT, "firmware")
HARDWARE = {"machine", "network"}
HARDWARE_OK = {"wiring", "wiring_link", "boot"}  # wiring_link: the boot's second phase
# sim/rom.py is the simulated board itself: it runs main.py as the ESP32 does at power-on.
# firmware/release_boot.py hands the root main.py's run over to the selected release's main
# (docs/ota.md): the same act, for a release installed over the air.
RUNS_MAIN = {os.path.join("sim", "rom.py"), os.path.join("firmware", "release_boot.py")}


def imports(path):
    """Top-level names of every module `path` imports, at any depth of its code."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id == "__import__" and node.args and isinstance(node.args[0], ast.Constant)):
            found.add(str(node.args[0].value).split(".")[0])
    return found


def module_graph(directory):
    """{module: firmware modules it imports} for the .py files of `directory`."""
    paths = {os.path.basename(p)[:-3]: p for p in glob.glob(os.path.join(directory, "*.py"))}
    graph = {name: imports(path) & set(paths) - {name} for name, path in paths.items()}
    for name, path in paths.items():  # a hand-over to a release's main is not an import of ours
        if os.path.relpath(path, ROOT) in RUNS_MAIN:
            graph[name].discard("main")
    return graph


def cycles(graph):
    """Every import cycle, each as the list of modules along it (depth-first search)."""
    found = []
    state = {}  # name -> 1 on the current path, 2 done

    def visit(name, path):
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                found.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    return found


def python_files(*folders):
    for folder in folders:
        for path in sorted(glob.glob(os.path.join(ROOT, folder, "**", "*.py"), recursive=True)):
            yield os.path.relpath(path, ROOT), path


# -- the checker catches what it is for --------------------------------------------------------

def test_the_checker_finds_a_planted_cycle_and_a_hidden_import(tmp_path):
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from c import x\n    return x\n")
    (tmp_path / "c.py").write_text("def g():\n    import a\n    return __import__('machine')\n")
    (tmp_path / "d.py").write_text("import a\n")
    graph = module_graph(str(tmp_path))
    assert cycles(graph) == [["a", "b", "c", "a"]]
    assert "machine" in imports(str(tmp_path / "c.py"))
    (tmp_path / "c.py").write_text("import d\n")  # d -> a -> b -> c -> d
    assert cycles(module_graph(str(tmp_path))) == [["a", "b", "c", "d", "a"]]


# -- the rules -----------------------------------------------------------------------------------

def test_only_wiring_and_boot_touch_machine_or_network():
    offenders = {name: sorted(imports(os.path.join(FIRMWARE, name + ".py")) & HARDWARE)
                 for name in module_graph(FIRMWARE) if name not in HARDWARE_OK}
    assert {name: mods for name, mods in offenders.items() if mods} == {}
    assert "machine" in imports(os.path.join(FIRMWARE, "wiring.py"))


@pytest.mark.parametrize("folder", ["firmware", "sim", "pilehost", "tools", "host_tests"])
def test_nothing_imports_main(folder):
    importers = [rel for rel, path in python_files(folder)
                 if "main" in imports(path) and rel not in RUNS_MAIN]
    assert importers == []


def test_the_firmware_imports_one_way():
    graph = module_graph(FIRMWARE)
    assert {"main", "wiring", "console", "files", "durable", "version"} <= set(graph)
    assert cycles(graph) == []


def test_main_is_the_loop_only():
    """main.py reaches the hardware and the objects through wiring, the console through console."""
    graph = module_graph(FIRMWARE)
    # release_boot: the hand-over to the release boot.py selected (docs/ota.md)
    assert graph["main"] <= {"console", "wiring", "wiring_link", "version", "diag", "release_boot", "startup"}
    for name in ("console", "files", "durable", "version"):  # leaves: they import no firmware
        assert graph[name] == set(), name


def test_the_flash_file_names_are_spelled_in_files_py_only():
    """A name the firmware opens is a constant of files.py; boot.py, which runs before any
    module can be loaded, reads board.json by its own literal."""
    import files

    names = {v for k, v in vars(files).items() if k.endswith("_FILE")}
    assert {"outbox.jrnl", "session.json", "boot_count.json"} <= names
    spelled = {}
    for name in module_graph(FIRMWARE):
        if name in ("files", "boot"):
            continue
        with open(os.path.join(FIRMWARE, name + ".py")) as f:
            tree = ast.parse(f.read())
        found = {node.value for node in ast.walk(tree)
                 if isinstance(node, ast.Constant) and node.value in names}
        if found:
            spelled[name] = sorted(found)
    assert spelled == {}


# -- the heap: what a pile may not need is imported where it is used (issue 12 item 3) -----------

# Loaded as .mpy, every imported module's bytecode stays on the heap. These are needed only with
# a config section, a secret, a meter type, a release or a technician: none of the other modules
# imports them when it is imported itself (a function may, when it needs one). `make bench
# WHAT=heap32` prints their share.
OPTIONAL = {"config", "ota", "ota_lazy", "diag", "command_auth", "commands", "sntp", "wifi", "modbus_meter",
            "dlt645", "s0_meter", "release_boot"}


def test_the_import_time_checker_skips_functions_and_the_main_run(tmp_path):
    (tmp_path / "m.py").write_text(
        "import a\nclass C:\n    import b\ndef f():\n    import c\n"
        "if __name__ == '__main__':\n    import d\nelse:\n    import e\n")
    assert import_time_imports(str(tmp_path / "m.py")) == {"a", "b", "e"}


def test_optional_modules_are_imported_where_they_are_used():
    graph = module_graph(FIRMWARE)
    assert OPTIONAL <= set(graph)
    eager = {name: sorted(import_time_imports(os.path.join(FIRMWARE, name + ".py")) & OPTIONAL)
             for name in graph if name not in OPTIONAL and name != "boot"}
    assert {name: mods for name, mods in eager.items() if mods} == {}
