#!/usr/bin/env bash
# End-to-end ingest benchmark: a release collector on a throw-away data dir, damselfly-loadgen against it, then a
# check that the rows the collector can query match what the load generator saw acknowledged.
#
# Usage: benches/run-ingest.sh [loadgen flags...]        (default: --agents 100 --duration 30)
# Environment:
#   COLLECTOR_ARGS   extra flags for `damselfly collector`, e.g. "--wal-sync none" (default: none, i.e. fsync WAL)
#   SKIP_BUILD=1     use the binaries already in target/release
#   KEEP_DATA=1      keep the temp dir (data dir, collector log, loadgen JSON) and print its path
#
# Everything listens on and connects to 127.0.0.1 only; ports are picked by the collector (port 0).
# Exit status: 0 if the loadgen succeeded and the stored counts match, non-zero otherwise.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

die() { echo "run-ingest: $*" >&2; exit 1; }
command -v curl >/dev/null || die "curl is required"
command -v jq >/dev/null || die "jq is required (to read the loadgen's JSON summary)"

if [ $# -eq 0 ]; then
    set -- --agents 100 --duration 30
fi

if [ "${SKIP_BUILD:-0}" != 1 ]; then
    echo "run-ingest: building release binaries" >&2
    cargo build --release -p damselfly -p damselfly-benches
fi
DAMSELFLY="$ROOT/target/release/damselfly"
LOADGEN="$ROOT/target/release/damselfly-loadgen"
[ -x "$DAMSELFLY" ] || die "$DAMSELFLY not found"
[ -x "$LOADGEN" ] || die "$LOADGEN not found"

TMP="$(mktemp -d "${TMPDIR:-/tmp}/damselfly-ingest.XXXXXX")"
COLLECTOR_PID=""
cleanup() {
    if [ -n "$COLLECTOR_PID" ] && kill -0 "$COLLECTOR_PID" 2>/dev/null; then
        kill -TERM "$COLLECTOR_PID" 2>/dev/null || true
        wait "$COLLECTOR_PID" 2>/dev/null || true
    fi
    if [ "${KEEP_DATA:-0}" = 1 ]; then
        echo "run-ingest: kept $TMP" >&2
    else
        rm -rf "$TMP"
    fi
}
trap cleanup EXIT

# --- start the collector ---------------------------------------------------------------------------------------
# shellcheck disable=SC2086 # COLLECTOR_ARGS is a list of flags
"$DAMSELFLY" collector --data-dir "$TMP/data" --grpc 127.0.0.1:0 --http 127.0.0.1:0 ${COLLECTOR_ARGS:-} \
    >"$TMP/collector.out" 2>"$TMP/collector.log" &
COLLECTOR_PID=$!

# It prints "  grpc: http://ADDR" and "  http: http://ADDR" once it listens.
GRPC_URL="" HTTP_URL=""
for _ in $(seq 1 300); do
    kill -0 "$COLLECTOR_PID" 2>/dev/null || { cat "$TMP/collector.log" >&2; die "the collector exited during start-up"; }
    GRPC_URL="$(sed -n 's/^ *grpc: *//p' "$TMP/collector.out" | head -n1)"
    HTTP_URL="$(sed -n 's/^ *http: *//p' "$TMP/collector.out" | head -n1)"
    [ -n "$GRPC_URL" ] && [ -n "$HTTP_URL" ] && break
    sleep 0.1
done
[ -n "$GRPC_URL" ] && [ -n "$HTTP_URL" ] || die "the collector did not report its addresses (see $TMP/collector.log)"
case "$GRPC_URL$HTTP_URL" in
    http://127.0.0.1:*http://127.0.0.1:*) ;;
    *) die "unexpected collector addresses: $GRPC_URL $HTTP_URL" ;;
esac
for _ in $(seq 1 100); do
    curl -fsS --noproxy '*' "$HTTP_URL/health" >/dev/null 2>&1 && break
    sleep 0.1
done
curl -fsS --noproxy '*' "$HTTP_URL/health" >/dev/null || die "$HTTP_URL/health does not answer"
echo "run-ingest: collector pid $COLLECTOR_PID, grpc $GRPC_URL, http $HTTP_URL, data $TMP/data ${COLLECTOR_ARGS:+($COLLECTOR_ARGS)}" >&2

# --- load ------------------------------------------------------------------------------------------------------
LOADGEN_STATUS=0
"$LOADGEN" --collector "$GRPC_URL" --json "$@" >"$TMP/loadgen.json" || LOADGEN_STATUS=$?
[ -s "$TMP/loadgen.json" ] || die "the loadgen printed no summary (exit status $LOADGEN_STATUS)"
J="$(tail -n1 "$TMP/loadgen.json")"
jv() { jq -r "$1" <<<"$J"; }

# --- check what the collector can query -------------------------------------------------------------------------
count() {
    local out
    out="$("$DAMSELFLY" sql --url "$HTTP_URL" --format csv "SELECT count(*) AS n FROM $1" 2>"$TMP/sql.err")" \
        || { echo "run-ingest: count($1) failed: $(cat "$TMP/sql.err")" >&2; echo -1; return; }
    tail -n1 <<<"$out" | tr -d '\r"'
}
CPU_ROWS="$(count cpu)"
ALL_ROWS=0
for t in cpu mem disk net system; do
    n="$(count "$t")"
    [ "$n" -ge 0 ] 2>/dev/null && ALL_ROWS=$((ALL_ROWS + n)) || ALL_ROWS=-1
    [ "$ALL_ROWS" -lt 0 ] && break
done

# Rows the collector must hold: points acknowledged STORED, plus those of batches acknowledged DUPLICATE (stored
# earlier; that ack was lost). Batches never acknowledged may or may not be stored.
CPU_MIN=$(( $(jv .total.cpu_points_stored) + $(jv .total.cpu_points_duplicate) ))
CPU_MAX=$(( CPU_MIN + $(jv .total.unacked_cpu_points) ))
ALL_MIN=$(( $(jv .total.points_stored) + $(jv .total.points_duplicate) ))
ALL_MAX=$(( ALL_MIN + $(jv .total.unacked_points) ))
CHECK=ok
[ "$CPU_ROWS" -ge "$CPU_MIN" ] && [ "$CPU_ROWS" -le "$CPU_MAX" ] || CHECK=MISMATCH
[ "$ALL_ROWS" -ge "$ALL_MIN" ] && [ "$ALL_ROWS" -le "$ALL_MAX" ] || CHECK=MISMATCH

# --- stop the collector (SIGTERM: final flush to Parquet) -------------------------------------------------------
STOP_START=$(date +%s%N)
kill -TERM "$COLLECTOR_PID"
COLLECTOR_STATUS=0
wait "$COLLECTOR_PID" || COLLECTOR_STATUS=$?
COLLECTOR_PID=""
STOP_SECS=$(awk -v a="$STOP_START" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')
DATA_SIZE="$(du -sh "$TMP/data" 2>/dev/null | cut -f1)"
PARQUET_SIZE="$(find "$TMP/data" -name '*.parquet' -printf '%s\n' 2>/dev/null | awk '{s+=$1} END {printf "%.1f MiB", s/1048576}')"

cat <<EOF

== run-ingest summary
machine        $(nproc) CPUs, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)
loadgen        $* (exit $LOADGEN_STATUS)
collector      ${COLLECTOR_ARGS:-default flags (WAL fsync)}; stopped in ${STOP_SECS}s (exit $COLLECTOR_STATUS)
throughput     $(jv '.batches_per_sec | floor') batches/s, $(jv '.points_per_sec | floor') points/s over $(jv .measured_s) s
ack latency us p50 $(jv .latency_us.p50)  p90 $(jv .latency_us.p90)  p99 $(jv .latency_us.p99)  p99.9 $(jv .latency_us.p999)  max $(jv .latency_us.max)
events         retry $(jv .total.retry_acks)  rejected $(jv .total.rejected)  duplicate $(jv .total.batches_duplicate)  stream errors $(jv .total.stream_errors)  unacked $(jv .total.unacked_batches)
cpu rows       $CPU_ROWS queried, expected $CPU_MIN..$CPU_MAX
all rows       $ALL_ROWS queried, expected $ALL_MIN..$ALL_MAX
check          $CHECK
data dir       $DATA_SIZE after shutdown (Parquet $PARQUET_SIZE)
EOF

[ "$LOADGEN_STATUS" -eq 0 ] || die "the loadgen failed (exit status $LOADGEN_STATUS)"
[ "$CHECK" = ok ] || die "stored row counts do not match the acknowledged points"
[ "$COLLECTOR_STATUS" -eq 0 ] || die "the collector exited with status $COLLECTOR_STATUS (see its log)"
