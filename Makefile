# machined: the two commands a fresh Debian 12 machine needs are `make run` and `make test`.
# Both install what they need (Debian packages as root, a virtualenv with the project).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
RUNDIR := .run

# Debian packages: the reference daemon and its clients, the bus, polkit, libsystemd (tests
# compare errno names with its sd-bus), compilers for wheels without a binary build, and the
# tools the sandbox uses (debootstrap builds
# the Debian forky root of the systemd-262 sandbox).
DEBS := systemd systemd-container systemd-userdbd dbus polkitd libnss-mymachines libglib2.0-bin libsystemd-dev pkg-config \
        gcc python3-dev python3-venv util-linux mount procps iproute2 hostname \
        btrfs-progs fdisk e2fsprogs debootstrap \
        podman docker.io crun runc

.PHONY: run shell stop test unit lint deps clean

deps: $(VENV)/.installed

$(RUNDIR)/debs.stamp:
	@mkdir -p $(RUNDIR)
	@missing=$$(for p in $(DEBS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "Installing Debian packages:" $$missing; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi
	@touch $@

$(VENV)/.installed: $(RUNDIR)/debs.stamp pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	@touch $@

run: deps
	@$(BIN)/machined-sandbox demo --id-file $(RUNDIR)/sandbox-id $(if $(SYSTEMD),--systemd $(SYSTEMD))

shell: deps
	@$(BIN)/machined-sandbox shell $$(cat $(RUNDIR)/sandbox-id 2>/dev/null)

stop: deps
	@if [ -s $(RUNDIR)/sandbox-id ]; then $(BIN)/machined-sandbox stop $$(cat $(RUNDIR)/sandbox-id) && rm -f $(RUNDIR)/sandbox-id; \
	else echo "no sandbox started by 'make run'"; fi

# Everything but the integration tests once, then the integration tests in sandboxes of
# each cgroup layout (hybrid: name=systemd v1 + cgroup2; unified: cgroup2 only), then once
# the tests against systemd 262 (cgroup2 only; their first run on a machine builds the
# Debian forky root, cached in /var/cache/machined-sandbox/). Every run goes ahead even if
# an earlier one failed; the target fails if any did.
CGROUP_LAYOUTS := hybrid unified

test: deps
	@status=0; \
	echo "== lint: ruff check, ruff format --check, mypy --strict"; \
	$(MAKE) --no-print-directory lint || status=1; \
	$(BIN)/python -m pytest -v -p no:cacheprovider --ignore=tests/integration --ignore=tests/integration262 tests || status=1; \
	for layout in $(CGROUP_LAYOUTS); do \
		echo "== integration tests, sandbox cgroup layout: $$layout"; \
		MACHINED_TEST_CGROUP=$$layout $(BIN)/python -m pytest -v -p no:cacheprovider tests/integration || status=1; \
	done; \
	echo "== integration tests against systemd 262 (Debian forky root, cgroup2 only)"; \
	$(BIN)/python -m pytest -v -p no:cacheprovider tests/integration262 || status=1; \
	exit $$status

unit: deps
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/unit

# Style, formatting and types (pyproject.toml: [tool.ruff], [tool.mypy] strict); `make test` runs it first.
lint: deps
	$(BIN)/ruff check machined tests bench && $(BIN)/ruff format --check machined tests bench && $(BIN)/mypy machined

clean:
	rm -rf $(VENV) $(RUNDIR) *.egg-info

# This machine, for real: machined in place of systemd-machined (unit, bus alias and policy,
# systemd-machined masked, switched over live); 'make uninstall' restores exactly what was
# there. The service runs this checkout's .venv: uninstall before 'make clean' or moving it.
.PHONY: install uninstall
install: deps
	$(BIN)/machined install

uninstall: deps
	$(BIN)/machined uninstall

# Benchmarks against systemd-machined 252 (README "Benchmarks"): every row, ours and real each
# in fresh sandboxes, interleaved, medians of BENCH_RUNS runs; one table, JSON in bench/results/.
# bench/inside.py (looks inside booted containers) runs after it when present, then bench/weight.py
# (the whole service: processes and memory over its cgroup at each moment, look latencies).
BENCH_RUNS ?= 3
.PHONY: bench
bench: deps
	$(BIN)/python bench/run.py --runs $(BENCH_RUNS)
	@if [ -f bench/inside.py ]; then $(BIN)/python bench/inside.py --out bench/results/inside-latest.json; fi
	$(BIN)/python bench/weight.py --later 70 --machines 1000 --out bench/results/weight-latest.json
