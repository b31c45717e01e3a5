"""make test's parts, order and groups (host_tests/conftest.py REALTIME, LONGEST_FIRST, TOGETHER).

They name tests by prefix: one that names no test any more (a file or a test renamed) silently
does nothing, a realtime test then runs in the CPU part, a long one starts last. And the groups
must reach xdist's workers: its own loadgroup (an xdist_group mark appended to the nodeid) did
nothing on pytest 9, so the OTA fleet's tests each built the fleet's release again and
test_ota.py's second cut test always skipped. Here the scheduler conftest gives xdist is driven
with fake workers as xdist's DSession drives it."""
import ast
import os
import types

import conftest
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _top_level_names(path):
    with open(path) as f:
        tree = ast.parse(f.read())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


@pytest.mark.parametrize("table", ["REALTIME", "LONGEST_FIRST", "TOGETHER"])
def test_every_prefix_names_a_test_file_and_a_test_in_it(table):
    for prefix in getattr(conftest, table):
        filename, sep, test = prefix.partition("::")
        path = os.path.join(HERE, filename)
        assert os.path.isfile(path), "%s: %r names no file" % (table, prefix)
        if sep and test:
            assert any(n.startswith(test) for n in _top_level_names(path) if n.startswith("test")), \
                "%s: %r names no test in %s" % (table, prefix, filename)


def test_a_prefix_without_its_separator_is_refused():
    """'test_ota.py' would also take test_ota_fleet.py's tests: every prefix ends its file name."""
    for table in ("REALTIME", "LONGEST_FIRST", "TOGETHER"):
        for prefix in getattr(conftest, table):
            assert ".py::" in prefix, "%s: %r" % (table, prefix)


class FakeWorker:
    """What the scheduler calls on a worker (xdist's WorkerController): the tests it is sent, in order."""

    def __init__(self, name):
        self.gateway = types.SimpleNamespace(id=name)
        self.sent = []
        self.shutting_down = False

    def send_runtest_some(self, indices):
        self.sent.extend(indices)

    def shutdown(self):
        self.shutting_down = True


def _config(dist, workers):
    options = {"dist": dist, "tx": ["%d*popen" % workers], "numprocesses": workers}
    return types.SimpleNamespace(getvalue=options.__getitem__,  # as the Makefile runs it:
                                 option=types.SimpleNamespace(loadscopereorder=False))


def _run(scheduler, workers, collection, finish_order):
    """Collection done on every worker, then each test ends as finish_order picks a worker with
    work (the scheduler hands out more as a worker's queue runs low); which worker ran what."""
    for w in workers:
        scheduler.add_node(w)
        scheduler.add_node_collection(w, collection)
    scheduler.schedule()
    done = {w: 0 for w in workers}
    ran = {w.gateway.id: [] for w in workers}
    while True:
        busy = [w for w in workers if done[w] < len(w.sent)]
        if not busy:
            break
        w = busy[finish_order(len(busy))]
        index = w.sent[done[w]]
        done[w] += 1
        ran[w.gateway.id].append(collection[index])
        scheduler.mark_test_complete(w, index)
    return ran


COLLECTION = [
    "host_tests/test_soak.py::test_soak_short[stock]",
    "host_tests/test_ota_fleet.py::test_a_good_release_rolls_out_to_the_fleet",
    "host_tests/test_ota_fleet.py::test_replayed_and_forged_releases_are_refused_with_a_clear_ack",
    "host_tests/test_ota_fleet.py::test_a_power_cut_mid_download_resumes_where_it_stopped",
    "host_tests/test_ota.py::test_power_cut_at_any_byte_of_download_or_switch_boots_a_good_release",
    "host_tests/test_ota.py::test_the_power_cuts_fell_on_the_switch_too",
    "host_tests/test_ota.py::test_power_cut_at_each_byte_of_the_switch[0]",
] + ["host_tests/test_pilot.py::test_%d" % i for i in range(12)]


@pytest.mark.parametrize("workers", [2, 4])
@pytest.mark.parametrize("seed", range(5))
def test_loadgroup_runs_each_group_on_one_worker_in_order_and_every_test_once(workers, seed):
    import random

    pick = random.Random(seed)
    nodes = [FakeWorker("gw%d" % i) for i in range(workers)]
    scheduler = conftest.pytest_xdist_make_scheduler(_config("loadgroup", workers), log=None)
    ran = _run(scheduler, nodes, COLLECTION, pick.randrange)
    assert sorted(t for tests in ran.values() for t in tests) == sorted(COLLECTION)
    for group in ("ota_fleet", "ota_cuts"):
        members = [t for t in COLLECTION if conftest._together(t) == group]
        assert len(members) >= 2
        (holder,) = [w for w, tests in ran.items() if members[0] in tests]
        assert [t for t in ran[holder] if t in members] == members, group  # all there, file order


def test_other_dist_modes_keep_xdist_s_own_scheduler():
    assert conftest.pytest_xdist_make_scheduler(_config("load", 2), log=None) is None
