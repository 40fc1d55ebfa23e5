#!/usr/bin/env bash
# Line-protocol ingest over HTTP, Damselfly vs VictoriaMetrics, side by side in one run.
#
# The same TSBS cpu-only data (damselfly-tsbs: 10 tags, 10 f64 fields per line) is POSTed by the same client
# (damselfly-lpload: same lines per request, same requests in flight) to both servers, each with its default
# settings: Damselfly acknowledges a write only once it is in its fsynced WAL; VictoriaMetrics acknowledges once the
# rows are in its in-memory buffers. Rounds alternate the order (D V, V D, ...) and each round sends new hours of
# data, so neither server sees duplicates. At the end both servers' row counts are checked against what was sent.
#
# Usage: benches/lp-vs-vm.sh
# Environment (defaults in brackets):
#   HOSTS [1000]  HOURS [1] (360 lines per host-hour)  ROUNDS [3]  LINES [5000] per request  CONCURRENCY [4]
#   SKIP_BUILD=1  use the binaries already in target/release;  KEEP_DATA=1  keep the temp dir
# Prints one JSON line per run (label damselfly-N / victoriametrics-N) and a summary with the ratio of medians.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
die() { echo "lp-vs-vm: $*" >&2; exit 1; }
command -v victoria-metrics >/dev/null || die "victoria-metrics is not installed (apt-get install -y victoria-metrics)"
command -v curl >/dev/null || die "curl is required"
command -v jq >/dev/null || die "jq is required"
command -v bc >/dev/null || die "bc is required"

HOSTS="${HOSTS:-1000}"
HOURS="${HOURS:-1}"
ROUNDS="${ROUNDS:-3}"
LINES="${LINES:-5000}"
CONCURRENCY="${CONCURRENCY:-4}"

if [ "${SKIP_BUILD:-0}" != 1 ]; then
    echo "lp-vs-vm: building release binaries" >&2
    cargo build --release -p damselfly -p damselfly-benches
fi
BIN="$ROOT/target/release"

TMP="$(mktemp -d "${TMPDIR:-/tmp}/damselfly-lpvm.XXXXXX")"
DF_PID="" VM_PID=""
cleanup() {
    for pid in $DF_PID $VM_PID; do
        kill -TERM "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [ "${KEEP_DATA:-0}" = 1 ]; then echo "lp-vs-vm: kept $TMP" >&2; else rm -rf "$TMP"; fi
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# --- data: one file per round, each a new range of hours ------------------------------------------------------
echo "lp-vs-vm: generating $ROUNDS x $HOSTS hosts x $HOURS h of TSBS cpu-only line protocol" >&2
for r in $(seq 1 "$ROUNDS"); do
    start=$((1451606400 + (r - 1) * HOURS * 3600))
    "$BIN/damselfly-tsbs" line-protocol --hosts "$HOSTS" --hours "$HOURS" --start "$start" >"$TMP/round-$r.lp"
done
LINES_PER_ROUND=$(wc -l <"$TMP/round-1.lp")
echo "lp-vs-vm: $LINES_PER_ROUND lines per round ($(du -h "$TMP/round-1.lp" | cut -f1))" >&2

# --- servers ---------------------------------------------------------------------------------------------------
VM_PORT=$(free_port)
victoria-metrics -storageDataPath="$TMP/vm" -httpListenAddr="127.0.0.1:$VM_PORT" -retentionPeriod=100y \
    >"$TMP/vm.log" 2>&1 &
VM_PID=$!
"$BIN/damselfly" collector --data-dir "$TMP/df" --grpc 127.0.0.1:0 --http 127.0.0.1:0 \
    >"$TMP/df.out" 2>"$TMP/df.log" &
DF_PID=$!
DF_HTTP=""
for _ in $(seq 1 300); do
    DF_HTTP="$(sed -n 's/^ *http: *//p' "$TMP/df.out" | head -n1)"
    [ -n "$DF_HTTP" ] && curl -fsS "$DF_HTTP/health" >/dev/null 2>&1 && \
        curl -fsS "http://127.0.0.1:$VM_PORT/health" >/dev/null 2>&1 && break
    sleep 0.1
done
[ -n "$DF_HTTP" ] || die "the collector did not start: $(cat "$TMP/df.log")"
curl -fsS "http://127.0.0.1:$VM_PORT/health" >/dev/null || die "VictoriaMetrics did not start: $(cat "$TMP/vm.log")"
echo "lp-vs-vm: damselfly $DF_HTTP, victoriametrics http://127.0.0.1:$VM_PORT" >&2

DF_URL="$DF_HTTP/api/v2/write?org=bench&bucket=bench&precision=ns"
VM_URL="http://127.0.0.1:$VM_PORT/api/v2/write?org=bench&bucket=bench&precision=ns"
# After each run the server is made to finish what it deferred, and that time is added to the run's: Damselfly
# writes its buffer to Parquet (POST /api/v1/admin/flush), VictoriaMetrics flushes its in-memory parts
# (/internal/force_flush). So neither run leaves work behind that would slow the other's, and Damselfly's rate
# includes the Parquet encoding that a sustained load would have to keep up with.
load() { # label url file settle-command...
    local label="$1" url="$2" file="$3"
    shift 3
    local json settle_start settle_secs
    json="$("$BIN/damselfly-lpload" --file "$file" --url "$url" --lines-per-request "$LINES" \
        --concurrency "$CONCURRENCY" --label "$label")"
    settle_start=$(date +%s.%N)
    "$@" >/dev/null
    settle_secs=$(echo "$(date +%s.%N) - $settle_start" | bc -l)
    echo "$json" | jq -c --argjson settle "$settle_secs" \
        '. + {settle_seconds: $settle, values_per_sec_settled: (.values / (.seconds + $settle))}' \
        | tee -a "$TMP/results.jsonl"
}
DF_SETTLE=(curl -fsS -X POST "$DF_HTTP/api/v1/admin/flush")
VM_SETTLE=(curl -fsS "http://127.0.0.1:$VM_PORT/internal/force_flush")
for r in $(seq 1 "$ROUNDS"); do
    if [ $((r % 2)) = 1 ]; then
        load "damselfly-$r" "$DF_URL" "$TMP/round-$r.lp" "${DF_SETTLE[@]}"
        load "victoriametrics-$r" "$VM_URL" "$TMP/round-$r.lp" "${VM_SETTLE[@]}"
    else
        load "victoriametrics-$r" "$VM_URL" "$TMP/round-$r.lp" "${VM_SETTLE[@]}"
        load "damselfly-$r" "$DF_URL" "$TMP/round-$r.lp" "${DF_SETTLE[@]}"
    fi
done

# --- both hold everything --------------------------------------------------------------------------------------
SENT=$((LINES_PER_ROUND * ROUNDS))
DF_ROWS=$(curl -fsS -X POST --data 'SELECT count(*) AS n FROM cpu' "$DF_HTTP/api/v1/sql" | jq '.[0].n')
curl -fsS "http://127.0.0.1:$VM_PORT/internal/force_flush" >/dev/null
VM_ROWS=$(curl -fsS "http://127.0.0.1:$VM_PORT/api/v1/export" --data-urlencode 'match[]=cpu_usage_user' \
    | jq -s 'map(.values | length) | add')
echo "lp-vs-vm: rows sent $SENT; damselfly stores $DF_ROWS; victoriametrics stores $VM_ROWS (cpu_usage_user samples)" >&2
[ "$DF_ROWS" = "$SENT" ] || die "damselfly holds $DF_ROWS rows, expected $SENT"
[ "$VM_ROWS" = "$SENT" ] || die "victoriametrics holds $VM_ROWS samples, expected $SENT"

jq -rs --arg lines "$LINES" --arg conc "$CONCURRENCY" '
  def med: sort | if length % 2 == 1 then .[length/2|floor] else (.[length/2-1] + .[length/2]) / 2 end;
  (map(select(.label|startswith("damselfly"))) ) as $d |
  (map(select(.label|startswith("victoria"))) ) as $v |
  def m: ./1e6*100|round/100;
  ($d | map(.values_per_sec_settled) | med) as $dm | ($v | map(.values_per_sec_settled) | med) as $vm |
  ($d | map(.values_per_sec) | med) as $da | ($v | map(.values_per_sec) | med) as $va |
  "summary: \($lines) lines/request, \($conc) in flight; M values/s including the settle step (acknowledged only)\n" +
  "  damselfly       median \($dm|m) (\($da|m))  runs \($d|map(.values_per_sec_settled|m))  p50/p99 ms \($d|map([.latency_ms.p50, .latency_ms.p99]))\n" +
  "  victoriametrics median \($vm|m) (\($va|m))  runs \($v|map(.values_per_sec_settled|m))  p50/p99 ms \($v|map([.latency_ms.p50, .latency_ms.p99]))\n" +
  "  ratio damselfly / victoriametrics: \($dm/$vm*100|round/100) (acknowledged only: \($da/$va*100|round/100))"
' "$TMP/results.jsonl"
