#!/usr/bin/env bash
# TSBS cpu-only queries, Damselfly (SQL over its HTTP API) vs DuckDB (in-process, on the very same Parquet files),
# side by side in one run (issue 8, "Speed").
#
# 1. a private venv target/bench-venv with PyPI `duckdb` (created and installed only if missing);
# 2. a `damselfly collector` on a temp data dir (ports picked by the kernel, 127.0.0.1 only) with retention
#    "forever" (the TSBS data is from 2016-01-01: the default 30 d retention would drop it at the first
#    maintenance pass), loaded by `damselfly-tsbs push` (HOSTS × HOURS at INTERVAL s), then
#    POST /api/v1/admin/flush and /api/v1/admin/maintenance (hour partitions compacted to one file each, rollups
#    built); the files the compaction replaced are deleted after the deletion grace (query timeout + 1 s = 61 s),
#    so the script runs maintenance again until each partition holds one file (DuckDB would otherwise read them
#    twice), and checks SELECT count(*) FROM cpu = rows sent;
# 3. benches/query_vs_duckdb.py: the six TSBS query types with seeded hosts and time windows, both engines'
#    results compared, warm-up, then RUNS runs per query per engine alternating engines; medians and ratios.
#
# Usage: benches/query-vs-duckdb.sh
# Environment (defaults in brackets):
#   HOSTS [100]  HOURS [24]  INTERVAL [10]  RUNS [21]  WARMUP [3]  SEED [1]  FORMAT [json] (or arrow: needs pyarrow)
#   DUCKDB_THREADS [0 = DuckDB's default, all cores]  EXPLAIN=1  print Damselfly's EXPLAIN ANALYZE of each query
#   DAMSELFLY_BIN, TSBS_BIN  the binaries [target/release/damselfly, target/release/damselfly-tsbs; copied to the
#   temp dir first, so a build running meanwhile cannot replace them]   KEEP_DATA=1  keep the temp dir
# It never builds: build the release binaries first (cargo build --release -p damselfly -p damselfly-benches).
# Exit status: 0 ok, 1 setup failed or the engines' results differ (the table is printed anyway).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
die() { echo "query-vs-duckdb: $*" >&2; exit 1; }
command -v curl >/dev/null || die "curl is required"
command -v python3 >/dev/null || die "python3 is required"

HOSTS="${HOSTS:-100}"
HOURS="${HOURS:-24}"
INTERVAL="${INTERVAL:-10}"
RUNS="${RUNS:-21}"
WARMUP="${WARMUP:-3}"
SEED="${SEED:-1}"
FORMAT="${FORMAT:-json}"
DUCKDB_THREADS="${DUCKDB_THREADS:-0}"
DAMSELFLY_BIN="${DAMSELFLY_BIN:-$ROOT/target/release/damselfly}"
TSBS_BIN="${TSBS_BIN:-$ROOT/target/release/damselfly-tsbs}"
[ -x "$DAMSELFLY_BIN" ] || die "$DAMSELFLY_BIN is missing (cargo build --release -p damselfly)"
[ -x "$TSBS_BIN" ] || die "$TSBS_BIN is missing (cargo build --release -p damselfly-benches)"

# --- DuckDB in a private venv ----------------------------------------------------------------------------------
VENV="$ROOT/target/bench-venv"
PY="$VENV/bin/python"
if ! { [ -x "$PY" ] && "$PY" -c 'import duckdb' 2>/dev/null; }; then
    echo "query-vs-duckdb: installing duckdb into $VENV" >&2
    [ -x "$PY" ] || python3 -m venv "$VENV"
    "$PY" -m pip install -q duckdb
fi
if [ "$FORMAT" = arrow ] && ! "$PY" -c 'import pyarrow' 2>/dev/null; then
    "$PY" -m pip install -q pyarrow
fi

TMP="$(mktemp -d "${TMPDIR:-/tmp}/damselfly-qvd.XXXXXX")"
DF_PID=""
LOAD_PID=""
cleanup() {
    [ -n "$LOAD_PID" ] && kill "$LOAD_PID" 2>/dev/null || true
    if [ -n "$DF_PID" ]; then
        kill -TERM "$DF_PID" 2>/dev/null || true
        wait "$DF_PID" 2>/dev/null || true
    fi
    if [ "${KEEP_DATA:-0}" = 1 ]; then echo "query-vs-duckdb: kept $TMP" >&2; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
cp -p "$DAMSELFLY_BIN" "$TMP/damselfly"
cp -p "$TSBS_BIN" "$TMP/damselfly-tsbs"
echo "query-vs-duckdb: damselfly binary $(sha256sum "$TMP/damselfly" | cut -c1-16) built $(date -u -r "$DAMSELFLY_BIN" '+%F %T') UTC; HEAD $(git rev-parse --short HEAD 2>/dev/null || echo '?')" >&2

# --- collector and data ----------------------------------------------------------------------------------------
cat >"$TMP/collector.toml" <<'EOF'
retention_default = "forever"
retention_rollup_1m_default = "forever"
retention_rollup_1h_default = "forever"
EOF
: >"$TMP/df.out"  # exists before the background process opens it (the loop below reads it at once)
"$TMP/damselfly" collector --config "$TMP/collector.toml" --data-dir "$TMP/df" --grpc 127.0.0.1:0 \
    --http 127.0.0.1:0 >"$TMP/df.out" 2>"$TMP/df.log" &
DF_PID=$!
HTTP="" GRPC=""
for _ in $(seq 1 300); do
    HTTP="$(sed -n 's/^ *http: *//p' "$TMP/df.out" | head -n1)"
    GRPC="$(sed -n 's/^ *grpc: *//p' "$TMP/df.out" | head -n1)"
    [ -n "$HTTP" ] && [ -n "$GRPC" ] && curl -fsS "$HTTP/health" >/dev/null 2>&1 && break
    kill -0 "$DF_PID" 2>/dev/null || die "the collector exited: $(tail -5 "$TMP/df.log")"
    sleep 0.1
done
[ -n "$HTTP" ] || die "the collector did not start: $(tail -5 "$TMP/df.log")"
echo "query-vs-duckdb: collector grpc $GRPC http $HTTP" >&2

sql() { curl -fsS -X POST --data "$1" "$HTTP/api/v1/sql?format=csv" | tail -n +2; }
echo "query-vs-duckdb: pushing TSBS cpu-only, $HOSTS hosts x $HOURS h at $INTERVAL s" >&2
PUSH="$("$TMP/damselfly-tsbs" push --collector "$GRPC" --hosts "$HOSTS" --hours "$HOURS" --interval-secs "$INTERVAL")"
echo "query-vs-duckdb: $PUSH" >&2
SENT=$(echo "$PUSH" | python3 -c 'import json,sys; print(json.load(sys.stdin)["points_stored"])')
EXPECTED=$((HOSTS * HOURS * 3600 / INTERVAL))
[ "$SENT" = "$EXPECTED" ] || die "damselfly-tsbs stored $SENT points, expected $EXPECTED"
echo "query-vs-duckdb: flush $(curl -fsS -X POST "$HTTP/api/v1/admin/flush")" >&2
echo "query-vs-duckdb: maintenance $(curl -fsS -X POST "$HTTP/api/v1/admin/maintenance")" >&2
CPU_DIR="$TMP/df/data/cpu"
PARTS=$(find "$CPU_DIR" -mindepth 2 -maxdepth 2 -type d | wc -l)
echo "query-vs-duckdb: waiting for the replaced files to be deleted (deletion grace ~61 s)" >&2
for _ in $(seq 1 60); do
    FILES=$(find "$CPU_DIR" -name '*.parquet' | wc -l)
    [ "$FILES" = "$PARTS" ] && break
    sleep 3
    curl -fsS -X POST "$HTTP/api/v1/admin/maintenance" >/dev/null
done
FILES=$(find "$CPU_DIR" -name '*.parquet' | wc -l)
[ "$FILES" = "$PARTS" ] || die "$FILES Parquet files in $PARTS partitions after compaction"
ROWS=""
for _ in $(seq 1 100); do
    ROWS="$(sql 'SELECT count(*) FROM cpu')"
    [ "$ROWS" = "$SENT" ] && break
    sleep 0.2
done
[ "$ROWS" = "$SENT" ] || die "the collector holds $ROWS cpu rows, $SENT were sent"
echo "query-vs-duckdb: $ROWS cpu rows in $FILES Parquet files ($PARTS hour partitions, $(du -sh "$CPU_DIR" | cut -f1))" >&2

# --- queries ---------------------------------------------------------------------------------------------------
# machine load: sampled every 2 s during the query phase (other work on the machine slows both engines)
(while :; do cut -d' ' -f1 /proc/loadavg >>"$TMP/load.txt"; sleep 2; done) &
LOAD_PID=$!
LOAD_BEFORE="$(cut -d' ' -f1-3 /proc/loadavg)"
set +e
EXPLAIN_FLAG=""
[ "${EXPLAIN:-0}" = 1 ] && EXPLAIN_FLAG="--explain"
"$PY" "$ROOT/benches/query_vs_duckdb.py" --url "$HTTP" \
    --parquet "$CPU_DIR/*/*/*.parquet" --runs "$RUNS" --warmup "$WARMUP" --seed "$SEED" \
    --hosts "$HOSTS" --hours "$HOURS" --format "$FORMAT" --duckdb-threads "$DUCKDB_THREADS" \
    --json-out "$TMP/timings.json" $EXPLAIN_FLAG
STATUS=$?
set -e
kill "$LOAD_PID" 2>/dev/null || true
wait "$LOAD_PID" 2>/dev/null || true
LOAD_PID=""
python3 - "$TMP/load.txt" "$LOAD_BEFORE" "$(nproc)" <<'EOF'
import statistics, sys
xs = [float(x) for x in open(sys.argv[1]).read().split()]
print(f"machine: {sys.argv[3]} CPUs; load average before the queries {sys.argv[2]}; 1-min load during them "
      f"min {min(xs):.2f} median {statistics.median(xs):.2f} max {max(xs):.2f} ({len(xs)} samples)")
EOF
echo "collector RSS after the queries: $(awk '/VmRSS/ {print $2/1024 " MiB"}' "/proc/$DF_PID/status")"
exit "$STATUS"
