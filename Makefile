# cache-proxy: the two set-up commands on a fresh Debian machine.
#   make run    install what is missing, build (release), start with config.yaml
#   make test   install what is missing, build, run every test
SHELL := /bin/bash
export PATH := /opt/swift/usr/bin:$(PATH)

# Debian packages: liburing for the build; the rest are the real parts the
# tests drive (the distribution registry, skopeo, containerd's ctr, promtool,
# curl; htpasswd and openssl make the users and certificates of the security tests).
BUILD_PACKAGES := liburing-dev pkg-config
TEST_PACKAGES  := docker-registry skopeo containerd prometheus curl apache2-utils openssl
CONFIG ?= config.yaml

.PHONY: run test build release deps-build deps-test bench fuzz clean

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

release: deps-build
	swift build -c release

bench: deps-build release
	benchmarks/run.sh

# The parsers that read client, upstream and operator input, under libFuzzer
# for FUZZ_SECONDS each (default 60): see scripts/fuzz and Fuzz/README.md.
fuzz: deps-build
	scripts/fuzz

deps-build:
	@./scripts/apt-install.sh $(BUILD_PACKAGES)

deps-test:
	@./scripts/apt-install.sh $(TEST_PACKAGES)

clean:
	rm -rf .build
