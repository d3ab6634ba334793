# One command to set up and test, one to run the demo. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: test test-quick demo bench bench-e2e bench-client bench-groups bench-failover bench-resume bench-ended soak chaos proto clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

## Everything CI runs: generated-code drift, lint, types, every test.
test: $(BIN)/.installed
	scripts/ensure_test_tools.sh
	scripts/gen_proto.sh --check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest -q -p no:cacheprovider

## Unit and property tests only (no processes).
test-quick: $(BIN)/.installed
	$(BIN)/pytest -q -m "not cluster"

## A local three-node cluster doing real work, then stopped.
demo: $(BIN)/.installed
	$(BIN)/python -m cluster.testkit.demo

## Saga Log commit rate and latency beside a bare pysyncobj counter (~80 s).
bench: $(BIN)/.installed
	$(BIN)/python bench/log_append.py

## The travel saga end to end beside no-coordinator, DBOS and counter baselines.
bench-e2e: $(BIN)/.installed
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python bench/e2e.py

## The client's view, closed loop: Run, Submit+Watch, direct and DBOS baselines, 1,000
## watchers on a follower, reads (~8 minutes; bench/client.py --quick for a smoke run).
bench-client: $(BIN)/.installed
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python bench/client.py

## Sagas/s with 1, 2 and 3 Raft groups beside the direct baseline (~4 minutes).
bench-groups: $(BIN)/.installed
	$(BIN)/python bench/groups.py

## SIGKILL the leader with 1,000 sagas in flight, 20 times (~8 minutes).
bench-failover: $(BIN)/.installed
	$(BIN)/python bench/failover.py

## A new leader resuming 10,000 and 100,000 in-flight sagas.
bench-resume: $(BIN)/.installed
	$(BIN)/python bench/resume.py

## Start-up time, memory and latency with 1,000,000 ended sagas in the log (~10 minutes).
bench-ended: $(BIN)/.installed
	$(BIN)/python bench/ended.py

proto: $(BIN)/.installed
	scripts/gen_proto.sh

clean:
	rm -rf $(VENV)

## The leader-kill trial 20 times (the issue's acceptance run; ~1 minute).
soak: $(BIN)/.installed
	FAILOVER_TRIALS=20 $(BIN)/pytest -q -s -p no:cacheprovider tests/cluster -k failover

## One 120 s chaos run against a local cluster (SEED=N, NODES=3|5).
SEED ?= 1
NODES ?= 3
chaos: $(BIN)/.installed
	$(BIN)/sagactl chaos --duration 120 --seed $(SEED) --nodes $(NODES)
