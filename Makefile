# cache-proxy: the two set-up commands on a fresh Debian machine.
#   make run    install what is missing, build (release), start with config.yaml
#   make test   install what is missing, build, run every test
SHELL := /bin/bash
export PATH := /opt/swift/usr/bin:$(PATH)

# Debian packages: liburing for the build; the rest are the real parts the
# tests drive (the distribution registry, skopeo, containerd's ctr, promtool,
# curl; htpasswd and openssl make the users and certificates of the security tests).
BUILD_PACKAGES := liburing-dev pkg-config
TEST_PACKAGES  := docker-registry skopeo containerd prometheus curl apache2-utils openssl haproxy systemd
CONFIG ?= config.yaml

.PHONY: run test build release deps-build deps-test bench fuzz clean install

run: deps-build release
	.build/release/cache-proxy --config $(CONFIG)

# The whole suite runs three times (scripts/test-all-backends): on io_uring,
# on the thread pool, and under a seccomp filter that denies io_uring (as
# Docker's default profile does), where `auto` must fall back.
# IOBackendTests checks each run got the backend it asked for.
test: deps-build deps-test
	swift build --build-tests
	scripts/test-all-backends

build: deps-build
	swift build

# The release binary carries the Swift runtime and Foundation inside it
# (--static-swift-stdlib): it runs on a host without a Swift toolchain (what
# `make install` copies is all there is), and only the pages of those
# libraries it touches are resident (3.4 MB less RSS at rest than linked
# dynamically; benchmarks/RESULTS.md).
#
# The dependencies are built without Swift's run-time exclusivity checks
# (the project's own modules keep them: Package.swift, `ownCode`). Most of
# the checks on a cache hit and a pull by tag were SwiftNIO's own channel
# bookkeeping, ~10% of the proxy's instructions per request
# (benchmarks/RESULTS.md); test builds check everything.
release: deps-build
	swift build -c release --static-swift-stdlib -Xswiftc -enforce-exclusivity=unchecked

bench: deps-build release
	benchmarks/run.sh

# The parsers that read client, upstream and operator input, under libFuzzer
# for FUZZ_SECONDS each (default 60): see scripts/fuzz and docs/testing.md.
fuzz: deps-build
	scripts/fuzz

deps-build:
	@./scripts/apt-install.sh $(BUILD_PACKAGES)

deps-test:
	@./scripts/apt-install.sh $(TEST_PACKAGES)

# The binary, the systemd unit and a configuration in their FHS places
# (an existing /etc/cache-proxy/config.yaml is kept). DESTDIR for packaging;
# BINARY to install another build than the release one.
PREFIX  ?= /usr/local
BINARY  ?= .build/release/cache-proxy
install:
	@if [ "$(BINARY)" = .build/release/cache-proxy ]; then $(MAKE) release; fi
	install -D -m 0755 $(BINARY) $(DESTDIR)$(PREFIX)/bin/cache-proxy
	install -D -m 0644 deploy/systemd/cache-proxy.service $(DESTDIR)/etc/systemd/system/cache-proxy.service
	sed -i 's|/usr/local/bin/cache-proxy|$(PREFIX)/bin/cache-proxy|' $(DESTDIR)/etc/systemd/system/cache-proxy.service
	@if [ ! -e $(DESTDIR)/etc/cache-proxy/config.yaml ]; then \
	  install -D -m 0644 deploy/systemd/config.yaml $(DESTDIR)/etc/cache-proxy/config.yaml; fi
	install -D -m 0644 -t $(DESTDIR)$(PREFIX)/share/doc/cache-proxy docs/*.md README.md

clean:
	rm -rf .build
