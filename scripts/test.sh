#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it (.ci/run calls this). Works on a fresh clone: it installs what the
# tests need (pyarrow, the independent Parquet reader; prometheus-client, the independent parser of the agent's
# /metrics page; moto's server, a real S3-protocol server for the shared store; aiosmtpd, a real SMTP server that
# receives alert emails) into a private virtualenv under target/.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=target/test-venv
if ! "$VENV/bin/python" -c 'import pyarrow.parquet, pyarrow.fs, prometheus_client.parser, moto.server, aiosmtpd.controller' 2>/dev/null; then
  echo "==> installing pyarrow, prometheus-client, moto[server] and aiosmtpd into $VENV (independent Parquet and Prometheus text readers, an S3 server, an SMTP server)"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check 'pyarrow>=17' 'prometheus-client>=0.20' 'moto[server]>=5' 'aiosmtpd>=1.4'
fi
export DAMSELFLY_TEST_PYTHON="$PWD/$VENV/bin/python"
# Real servers and clients the black-box tests start: VictoriaMetrics (a forwarding destination) and vmagent
# (an independent Prometheus scraper and remote-write sender), both from the victoria-metrics package;
# node_exporter (a real exporter to scrape); OpenSSH (sshd on a 127.0.0.1 high port for `damselfly agent install
# --ssh`); psql (the PostgreSQL client, tests/pgwire.rs); chromium (the headless browser of tests/ui_browser.rs);
# ip (network namespaces and veth pairs of tests/faults.rs).
MISSING=()
command -v victoria-metrics >/dev/null 2>&1 || MISSING+=(victoria-metrics)
command -v prometheus-node-exporter >/dev/null 2>&1 || MISSING+=(prometheus-node-exporter)
[ -x /usr/sbin/sshd ] || MISSING+=(openssh-server)
command -v ssh >/dev/null 2>&1 && command -v ssh-keygen >/dev/null 2>&1 || MISSING+=(openssh-client)
command -v psql >/dev/null 2>&1 || MISSING+=(postgresql-client)
command -v chromium >/dev/null 2>&1 || MISSING+=(chromium)
command -v ip >/dev/null 2>&1 || MISSING+=(iproute2)
if [ ${#MISSING[@]} -gt 0 ]; then
  echo "==> installing ${MISSING[*]} (Debian packages the tests need)"
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${MISSING[@]}" >/dev/null
fi

# A clean checkout gains nothing from incremental compilation, and its caches took half of a 60 GB target dir here
# (a CI run once died with "No space left on device"): build without them.
export CARGO_INCREMENTAL=0
echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
echo "==> cargo build --workspace --bins (the black-box tests run the binaries)"
cargo build --workspace --bins
echo "==> cargo test --workspace"
cargo test --workspace
