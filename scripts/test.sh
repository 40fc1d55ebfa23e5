#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it (.ci/run calls this). Works on a fresh clone: it installs what the
# tests need (pyarrow, the independent Parquet reader; prometheus-client, the independent parser of the agent's
# /metrics page) into a private virtualenv under target/.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=target/test-venv
if ! "$VENV/bin/python" -c 'import pyarrow.parquet, prometheus_client.parser' 2>/dev/null; then
  echo "==> installing pyarrow and prometheus-client into $VENV (independent Parquet and Prometheus text readers)"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check 'pyarrow>=17' 'prometheus-client>=0.20'
fi
export DAMSELFLY_TEST_PYTHON="$PWD/$VENV/bin/python"
if ! command -v victoria-metrics >/dev/null 2>&1; then
  echo "==> installing victoria-metrics (Debian package: an independent Prometheus scraper for the tests)"
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq victoria-metrics >/dev/null
fi

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
echo "==> cargo build --workspace --bins (the black-box tests run the binaries)"
cargo build --workspace --bins
echo "==> cargo test --workspace"
cargo test --workspace
