#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it (.ci/run calls this). Works on a fresh clone: it installs what the
# tests need (pyarrow, the independent Parquet reader) into a private virtualenv under target/.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=target/test-venv
if ! "$VENV/bin/python" -c 'import pyarrow.parquet' 2>/dev/null; then
  echo "==> installing pyarrow into $VENV (independent Parquet reader for the tests)"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check 'pyarrow>=17'
fi
export DAMSELFLY_TEST_PYTHON="$PWD/$VENV/bin/python"

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
echo "==> cargo build --workspace --bins (the black-box tests run the binaries)"
cargo build --workspace --bins
echo "==> cargo test --workspace"
cargo test --workspace
