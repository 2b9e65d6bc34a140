PY ?= .venv/bin/python
CHAOS_RESULTS ?= runs/chaos/results.jsonl

.PHONY: test chaos

# The quick suite (slow drills excluded), as CI runs it; it includes the reduced reliability drill.
test:
	$(PY) -m pytest -q

# The full reliability drill (tests/chaos, slow parts included; see docs/reliability.md).
chaos:
	mkdir -p $(dir $(CHAOS_RESULTS)) && rm -f $(CHAOS_RESULTS)
	ALIVE_CHAOS_RESULTS=$(abspath $(CHAOS_RESULTS)) $(PY) -m pytest -q -m chaos tests/chaos --durations=12; \
		status=$$?; $(PY) tests/chaos/summarize.py $(CHAOS_RESULTS); exit $$status
