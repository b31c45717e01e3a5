"""The operations page (pilehost/ops_web.py) in a real headless browser, Debian's Chromium driven
by selenium through chromedriver (`make browser` installs both), against the reference consumer
in-process on a real mosquitto, fed by tools/fake_pile.py's piles: the page follows a session as
it charges without a reload, shows field data only as text, and never writes. The screenshots
land in build/test-output/ (their paths are printed)."""
import datetime
import os
import urllib.error
import urllib.request

import pytest

from pilehost import ROOT, consumer
from pilehost.cloud import schemas
from pilehost.fake_pile import FakePile, Message, Publisher, connect_pile, encode
from pilehost.ops_web import Server
from pilehost.procs import TIMEOUT, wait_for

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
OUTPUT = os.path.join(ROOT, "build", "test-output")
HOSTILE = "<img src=x onerror=window.__xss=1>"  # a pile id as the field could send it
HOSTILE_TAG = "<img/src=x/onerror=window.__xss=2>"  # a valid auth_id (printable ASCII, no space)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.fail("the operations page tests need Debian's chromium and chromium-driver: make browser",
                    pytrace=False)
    os.environ["SE_OFFLINE"] = "true"  # selenium must never try to download a browser or a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1440,1360", "--no-first-run", "--disable-extensions",
                "--disable-background-networking", "--hide-scrollbars",
                "--user-data-dir=%s" % tmp_path_factory.mktemp("chromium")):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(TIMEOUT)
    yield driver
    driver.quit()


@pytest.fixture
def page(store, tmp_path):
    """The page on a free port over the `store` fixture's SQLite file, refreshing fast."""
    server = Server("sqlite:///" + str(tmp_path / "telemetry.db"), refresh_s=0.3)
    yield server
    server.stop()


@pytest.fixture
def publishers():
    made = []
    yield made
    for p in made:
        p.close()


def wait_page(driver, predicate, what):
    wait_for(lambda: predicate(driver), what)


def on_element(driver, css, action):
    """action(element), or None: the page redraws its parts on every update, so an element found
    a moment ago may be gone (stale) by now; the waits ask again."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    try:
        return action(driver.find_element("css selector", css))
    except (NoSuchElementException, StaleElementReferenceException):
        return None


def text(driver, css):
    return on_element(driver, css, lambda e: e.text)


def read(driver, css):
    """The element's text, once it holds still long enough to be read."""
    found = []
    wait_for(lambda: found.append(text(driver, css)) or found[-1] is not None, "%s on the page" % css)
    return found[-1]


def attr(driver, css, name):
    return on_element(driver, css, lambda e: e.get_attribute(name))


def click(driver, css):
    return on_element(driver, css, lambda e: e.click() or True)


def live_state(driver):
    """The header's dot: "live" while answers come, "lost" when one failed."""
    return attr(driver, "#live", "data-state")


def screenshot(driver, name):
    os.makedirs(OUTPUT, exist_ok=True)
    path = os.path.join(OUTPUT, name)
    driver.save_screenshot(path)
    print("screenshot: %s" % path)
    return path


def minutes_ago(n):
    moment = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=n)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def stored(store, sql, params=()):
    return store.query(sql, params)[0][0]


def some_fleet(broker, store, publishers):
    """Piles with a history: sessions ended today, a fault, one gone offline."""
    fleet = Publisher(broker.url(), "fake-fleet")
    publishers.append(fleet)
    for i in range(6):
        p = FakePile("pile-%04d" % (10 + i), epoch=minutes_ago(300), fw="1.4.%d" % (i % 2))
        msgs = [p.online(True), p.status()]
        msgs += p.normal_session(power_w=3700 + 1100 * i, duration_s=1800 + 600 * i, meter_interval_s=120)
        if i == 2:
            msgs += [p.fault("rcd_trip"), p.status()]
        if i == 4:
            msgs += [p.online(False)]
        fleet.send(msgs)
    wait_for(lambda: stored(store, "SELECT COUNT(*) FROM sessions") == 6, "the fleet's sessions stored")


def test_the_page_follows_a_session_as_it_charges(broker, store, page, browser, publishers):
    some_fleet(broker, store, publishers)
    pile = FakePile("pile-0042", epoch=minutes_ago(90), fw="1.4.1")
    link = connect_pile(broker.url(), pile)
    publishers.append(link)
    link.send(pile.normal_session(power_w=11000, duration_s=2400, meter_interval_s=300))
    pile.advance(240)
    link.send([pile.fault("meter_failure"), pile.status()])  # a history on the page: raised, cleared
    pile.advance(360)
    link.send([pile.fault("meter_failure", "cleared"), pile.status()])
    link.send([pile.start_session(), ])
    pile.draw(10800)
    link.send([pile.status()])
    for i in range(24):  # a taper as the battery fills: a curve worth looking at
        pile.advance(60)
        pile.power_w = 10800 - (0 if i < 14 else 600 * (i - 13)) - (i % 3) * 120
        pile.peak_power_w = max(pile.peak_power_w, pile.power_w)
        link.send([pile.meter(), pile.status()])
    wait_for(lambda: stored(store, "SELECT COUNT(*) FROM meter_samples WHERE session_id = ?",
                            (pile.session_id(),)) == 24, "the meter values stored")

    browser.get_log("browser")  # drop what earlier tests left in the console
    browser.get(page.url + "#/pile/pile-0042")
    energy = "%.2f" % (pile.session_energy_wh() / 1000)
    wait_page(browser, lambda d: (text(d, "#session-energy") or "").startswith(energy), "the energy")
    assert read(browser, "#pile-title") == "pile-0042"
    assert attr(browser, "#power-chart", "data-points") == "24"
    browser.execute_script("window.__sameDocument = 42")

    # the pile charges on: the page shows it without being reloaded
    for _ in range(3):
        pile.advance(60)
        pile.power_w = 4200
        link.send([pile.meter(), pile.status()])
    energy = "%.2f" % (pile.session_energy_wh() / 1000)
    wait_page(browser, lambda d: (text(d, "#session-energy") or "").startswith(energy), "the new energy")
    wait_page(browser, lambda d: attr(d, "#power-chart", "data-points") == "27", "the new samples")
    wait_page(browser, lambda d: (text(d, "#session-power") or "").startswith("4.2"), "the new power")
    assert browser.execute_script("return window.__sameDocument") == 42, "the page was reloaded"
    assert "Charging" in read(browser, ".title-row")
    assert live_state(browser) == "live"
    screenshot(browser, "ops-page.png")

    # the fleet: counts and the row of the charging pile
    browser.get(page.url + "#/fleet")
    wait_page(browser, lambda d: text(d, "#kpi-piles .value") == "7", "the fleet's counts")
    assert read(browser, "#kpi-charging .value") == "1" and read(browser, "#kpi-offline .value") == "1"
    assert read(browser, "#kpi-faulted .value") == "1"
    row = read(browser, 'tr[data-pile="pile-0042"]')
    assert "Charging" in row and "Online" in row and "1.4.1" in row
    screenshot(browser, "ops-fleet.png")

    # sessions, filtered by pile and stop reason
    browser.get(page.url + "#/sessions?pile=pile-0012")
    wait_page(browser, lambda d: len(d.find_elements("css selector", "#session-rows tr[data-session]")) == 1,
              "the filtered sessions")
    assert "pile-0012-1-1" in read(browser, "#session-rows")
    browser.get(page.url + "#/sessions?stop_reason=rcd_trip")
    wait_page(browser, lambda d: "No session." in (text(d, "#session-rows") or ""), "no rcd_trip session")
    browser.get(page.url + "#/sessions")
    wait_page(browser, lambda d: len(d.find_elements("css selector", "#session-rows tr[data-session]")) == 7,
              "every ended session")
    screenshot(browser, "ops-sessions.png")
    assert browser.execute_script("return window.__xss") is None
    # no error in the console: no script error, nothing the Content-Security-Policy refused
    assert [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []


def test_field_data_is_shown_as_text_never_run(broker, store, page, browser, publishers):
    """A pile id the consumer would never accept (written straight into the store: an old row,
    another writer) and an auth id it does accept, both markup: shown as text, never run."""
    p = FakePile("pile-0007", epoch=minutes_ago(30))
    link = connect_pile(broker.url(), p)
    publishers.append(link)
    link.send(p.normal_session(auth_source="remote", auth_id=HOSTILE_TAG, duration_s=600))
    wait_for(lambda: stored(store, "SELECT COUNT(*) FROM sessions") == 1, "the session stored")
    status = dict(FakePile("x").status().payload, fw=HOSTILE)
    store.storage.put_status(HOSTILE, status, "2026-11-23T08:00:00.000Z")

    browser.get(page.url + "#/fleet")
    row = 'tr[data-pile="%s"] td.id a' % HOSTILE  # the attribute holds the id as it is
    wait_page(browser, lambda d: text(d, row) == HOSTILE, "the hostile pile listed, as text")
    wait_page(browser, lambda d: click(d, row), "a click on its link")
    wait_page(browser, lambda d: text(d, "#pile-title") == HOSTILE, "the hostile pile's own page")
    assert HOSTILE in read(browser, "#status-card")  # its fw, as text too
    browser.get(page.url + "#/sessions")
    wait_page(browser, lambda d: HOSTILE_TAG in (text(d, "#session-rows") or ""), "the auth id as text")
    browser.get(page.url + "#/pile/pile-0007")
    wait_page(browser, lambda d: HOSTILE_TAG in (text(d, "#pile-sessions") or ""), "the auth id, pile page")
    assert browser.find_elements("css selector", "#view img") == []
    assert browser.execute_script("return window.__xss") is None


def health_message(pile_id, uptime_s, **link):
    """A health.v1 message (docs/telemetry.md), retained as the pile sends it."""
    h = {"v": 1, "ts": minutes_ago(0), "clock_synced": True, "boot": 3, "uptime_s": uptime_s,
         "reset_cause": "soft", "fw": "1.4.1", "board": "ref-esp32", "heap_free": 58112,
         "heap_largest_free": 21504, "outbox_records": 2, "outbox_oldest_s": 40, "wifi_rssi": -67,
         "link": dict({"connects": 2, "reconnects": 4, "wifi_restarts": 1, "resets": 0,
                       "last_step": "wifi_restart", "last_reason": "no CONNACK within 5 s, with the Wi-Fi up",
                       "client_id_conflict": False}, **link),
         "meter_errors": {"timeout": 3}, "loop_ms": {"max": 31, "avg": 6}}
    schemas().check("health", h)
    return Message("evse/v1/%s/health" % pile_id, h, 1, True)


def test_the_pile_page_shows_its_reported_health_live_and_as_text(broker, store, page, browser, publishers):
    """The pile's own health message, stored by the consumer (pile_health): no message yet, then
    the link's ladder, the heap and the meter errors; a later one (a client id conflict, a reason
    in markup) replaces it without a reload, as text."""
    pile = FakePile("pile-0077", epoch=minutes_ago(30), fw="1.4.1")
    link = connect_pile(broker.url(), pile)
    publishers.append(link)
    wait_for(lambda: stored(store, "SELECT COUNT(*) FROM piles WHERE pile_id = 'pile-0077'") == 1, "the pile")
    browser.get(page.url + "#/pile/pile-0077")
    wait_page(browser, lambda d: text(d, "#reported-none") == "No health message yet.", "no health yet")
    browser.execute_script("window.__sameDocument = 77")
    link.send([health_message("pile-0077", 600)])
    wait_page(browser, lambda d: "4 reconnects" in (text(d, "#reported-link") or ""), "the reported link")
    card = read(browser, "#reported-card")
    assert "1 Wi-Fi restarts" in card and "58,112 B (largest 21,504 B)" in card and "-67 dBm" in card
    assert "Wi-Fi restart: no CONNACK within 5 s, with the Wi-Fi up" in card
    assert "timeout 3" in card and "reset: soft" in card and "6 ms avg · 31 ms max" in card
    link.send([health_message("pile-0077", 660, client_id_conflict=True, last_step="reconnect",
                              last_reason=HOSTILE)])
    wait_page(browser, lambda d: text(d, "#reported-conflict") == "used by another client", "the conflict")
    assert HOSTILE in read(browser, "#reported-step")
    assert browser.execute_script("return window.__sameDocument") == 77, "the page was reloaded"
    assert browser.find_elements("css selector", "#view img") == []
    assert browser.execute_script("return window.__xss") is None
    screenshot(browser, "ops-pile-health.png")


def test_the_page_says_when_the_store_is_gone_and_recovers(tmp_path, browser):
    """No store yet (the consumer not started): the page says so, then shows the fleet by itself
    once the consumer has written, without a reload."""
    url = "sqlite:///" + str(tmp_path / "telemetry.db")
    server = Server(url, refresh_s=0.3)
    try:
        browser.get(server.url + "#/fleet")
        wait_page(browser, lambda d: live_state(d) == "lost", "the page to say it cannot update")
        banner = browser.find_element("css selector", "#banner")
        assert banner.is_displayed() and "cannot be read" in banner.text
        storage = consumer.open_storage(url)
        storage.setup()
        p = FakePile("pile-late")
        for m in (p.online(True), p.status()):
            consumer.Handler(schemas(), storage).handle(m.topic, encode(m.payload))
        storage.close()
        wait_page(browser, lambda d: text(d, 'tr[data-pile="pile-late"] td.id') == "pile-late", "the fleet")
        assert live_state(browser) == "live"
        assert not browser.find_element("css selector", "#banner").is_displayed()
    finally:
        server.stop()


def request(url, method="GET"):
    asked = urllib.request.Request(url, method=method, data=None if method in ("GET", "HEAD") else b"x")
    try:
        with urllib.request.urlopen(asked, timeout=TIMEOUT) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def store_files(directory):
    """The SQLite file and what its write-ahead log holds (a reader may leave an empty one, and
    the -shm index: a reader's scratch space)."""
    files = {f.name: f.read_bytes() for f in directory.glob("telemetry.db*") if not f.name.endswith("-shm")}
    return {name: data for name, data in files.items() if data or not name.endswith("-wal")}


def test_read_only_over_http(tmp_path):
    """Only GET and HEAD, with the security headers; bad filters are a 400; and the store's
    files are the same bytes after every answer (no consumer here: nothing else writes)."""
    url = "sqlite:///" + str(tmp_path / "telemetry.db")
    storage = consumer.open_storage(url)
    storage.setup()
    handler = consumer.Handler(schemas(), storage)
    p = FakePile("pile-http")
    for m in [p.online(True), p.status()] + p.normal_session(duration_s=600):
        handler.handle(m.topic, encode(m.payload))
    storage.run("PRAGMA wal_checkpoint(TRUNCATE)")
    storage.close()
    before = store_files(tmp_path)
    server = Server(url)
    try:
        for path in ("", "api/fleet", "api/pile?id=pile-http", "api/sessions", "api/config", "ops.js"):
            status, headers, _ = request(server.url + path)
            assert status == 200, path
            assert "default-src 'none'" in headers["content-security-policy"]
            assert headers["x-content-type-options"] == "nosniff"
            for method in ("POST", "PUT", "DELETE", "PATCH"):
                assert request(server.url + path, method)[0] == 405, (method, path)
        status, _, body = request(server.url + "api/sessions?since=yesterday")
        assert status == 400 and b"since" in body
        assert request(server.url + "api/fleet?limit=-3")[0] == 400
        assert request(server.url + "nowhere")[0] == 404
        assert b"pile-http-1-1" in request(server.url + "api/sessions")[2]
    finally:
        server.stop()
    assert store_files(tmp_path) == before


def test_the_page_loads_nothing_from_elsewhere():
    """The test machine (and an operations desk) may have no internet: every URL in the page's
    files is its own."""
    static = os.path.join(ROOT, "pilehost", "ops_static")
    for name in os.listdir(static):
        with open(os.path.join(static, name), encoding="utf-8") as f:
            body = f.read()
        for scheme in ("http://", "https://", "//cdn", "@import"):
            allowed = body.count("http://www.w3.org/2000/svg")
            assert body.count(scheme) == (allowed if scheme == "http://" else 0), (name, scheme)
        assert "innerHTML" not in body and "outerHTML" not in body and "insertAdjacentHTML" not in body, name
        assert "document.write" not in body and "eval(" not in body, name


def test_tools_entry_point_refuses_a_missing_store(tmp_path, capsys):
    from pilehost import ops_web

    assert ops_web.main(["--db", "sqlite:///" + str(tmp_path / "none.db")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "none.db").exists()
