# lvs-dp: every target installs what it needs on a fresh Debian machine (run as root).
#   make demo   the seed lab: client, balancer, two nginx real servers, curl through the VIP
#   make test   the whole test suite (unit, property, namespace end-to-end, benchmarks once)
#   make bench  the benchmarks, measured, with bench/RESULTS.md

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
APT_PKGS := libnetfilter-queue-dev libnfnetlink-dev gcc iptables iproute2 conntrack nftables \
            nginx-light curl keepalived wrk hping3 netsniff-ng tcpdump procps psmisc

.PHONY: setup apt venv demo test bench clean-lab

setup: apt venv

apt:
	@missing=""; for p in $(APT_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@# Debian starts nginx on install; the lab runs its own nginx in namespaces only.
	@if command -v systemctl >/dev/null && systemctl is-active -q nginx 2>/dev/null; then systemctl stop nginx; fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

demo: setup
	$(PY) -m control.demo examples/seed-nat.conf

test: setup
	$(PY) -m pytest -q -p no:cacheprovider tests bench --benchmark-disable

bench: setup
	@# The report is written even when a benchmark fails, so RESULTS.md never goes stale.
	$(PY) -m pytest -q -p no:cacheprovider bench --benchmark-only --benchmark-json=bench/out/bench.json; \
	rc=$$?; $(PY) -m bench.report bench/out/bench.json bench/RESULTS.md; exit $$rc

# Remove the namespaces, processes and files a crashed lab run left (make clean-lab PREFIX=demo).
clean-lab:
	$(PY) -m control.lab cleanup $(or $(PREFIX),demo)
