#!/usr/bin/env bash
# Storage size: bytes per stored value, Damselfly (Parquet) vs VictoriaMetrics, on the same data, in one run.
#
#  1. TSBS cpu-only data (damselfly-tsbs: 10 tags, 10 f64 fields of random walks with two decimals; default 100
#     hosts x 24 h at 10 s = 8.64 M values, seed 1) goes into a release collector over gRPC (unary Ingest.Write)
#     and, as InfluxDB line protocol, into VictoriaMetrics (/write). The collector is stopped with SIGTERM (its
#     final flush writes one Parquet file per hour: the layout compaction converges to); VictoriaMetrics gets
#     /internal/force_flush and /internal/force_merge, and we wait until its merges settle, then stop it.
#  2. Real agent data: AGENTS damselfly-agent processes (distinct identities, this machine's real probes, every
#     second) push to a fresh collector for AGENT_SECS seconds; the same rows, exported as line protocol, go to a
#     fresh VictoriaMetrics.
#  3. Optionally (VARIANTS=1) the collector's files are re-encoded with other layouts (zstd levels, f64 floats,
#     the previous layout) by `cargo run --example storage_variants`, to show what each choice buys.
#
# Usage: benches/storage-size.sh [--hosts N] [--hours H] [--interval-secs S] [--seed S]
# Environment:
#   SKIP_BUILD=1     use the binaries already in target/release
#   KEEP_DATA=1      keep the temp dir and print its path
#   AGENT_SECS=N     seconds of real agent data (default 180; 0 skips part 2); AGENTS=N agents (default 4)
#   VARIANTS=1       also run the re-encoding comparison (part 3)
#
# Everything listens on and connects to 127.0.0.1 only.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
die() { echo "storage-size: $*" >&2; exit 1; }
log() { echo "storage-size: $*" >&2; }
command -v curl >/dev/null || die "curl is required"
command -v python3 >/dev/null || die "python3 is required"
if ! command -v victoria-metrics >/dev/null; then
    log "installing victoria-metrics (Debian package)"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq victoria-metrics >/dev/null
fi
AGENT_SECS="${AGENT_SECS:-180}"
AGENTS="${AGENTS:-4}"

if [ "${SKIP_BUILD:-0}" != 1 ]; then
    log "building release binaries"
    cargo build --release -p damselfly -p damselfly-agent -p damselfly-benches
fi
DAMSELFLY="$ROOT/target/release/damselfly"
AGENT="$ROOT/target/release/damselfly-agent"
TSBS="$ROOT/target/release/damselfly-tsbs"
for b in "$DAMSELFLY" "$AGENT" "$TSBS"; do [ -x "$b" ] || die "$b not found"; done

TMP="$(mktemp -d "${TMPDIR:-/tmp}/damselfly-storage.XXXXXX")"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
    done
    if [ "${KEEP_DATA:-0}" = 1 ]; then log "kept $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
bytes_of() { du -sb "$1" 2>/dev/null | cut -f1; }
parquet_bytes() { find "$1" -name '*.parquet' -printf '%s\n' | awk '{s+=$1} END {print s+0}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.3f", a / b; else print "n/a" }'; }

# --- collector -------------------------------------------------------------------------------------------------
# One flush at shutdown (large buffer, long interval): each hour becomes one file, as after compaction.
cat >"$TMP/collector.toml" <<'EOF'
flush_interval_secs = 86400
flush_buffer_bytes = 4294967296
max_buffer_bytes = 8589934592
EOF
COLLECTOR_PID="" GRPC_URL="" HTTP_URL=""
start_collector() { # $1 = data dir, $2 = log name
    "$DAMSELFLY" collector --config "$TMP/collector.toml" --data-dir "$1" --grpc 127.0.0.1:0 --http 127.0.0.1:0 \
        >"$TMP/$2.out" 2>"$TMP/$2.log" &
    COLLECTOR_PID=$!
    PIDS+=("$COLLECTOR_PID")
    GRPC_URL="" HTTP_URL=""
    for _ in $(seq 1 300); do
        kill -0 "$COLLECTOR_PID" 2>/dev/null || { cat "$TMP/$2.log" >&2; die "the collector exited during start-up"; }
        GRPC_URL="$(sed -n 's/^ *grpc: *//p' "$TMP/$2.out" | head -n1)"
        HTTP_URL="$(sed -n 's/^ *http: *//p' "$TMP/$2.out" | head -n1)"
        [ -n "$GRPC_URL" ] && [ -n "$HTTP_URL" ] && break
        sleep 0.1
    done
    case "$GRPC_URL$HTTP_URL" in
        http://127.0.0.1:*http://127.0.0.1:*) ;;
        *) die "unexpected collector addresses: '$GRPC_URL' '$HTTP_URL'" ;;
    esac
}
stop_collector() {
    kill -TERM "$COLLECTOR_PID"
    wait "$COLLECTOR_PID" || die "the collector exited with status $? (see $TMP)"
}
sql() { "$DAMSELFLY" sql --url "$HTTP_URL" --format csv "$1" | tail -n1 | tr -d '\r"'; }

# --- VictoriaMetrics --------------------------------------------------------------------------------------------
VM_PID="" VM_URL=""
start_vm() { # $1 = storage dir
    local port; port="$(free_port)"
    VM_URL="http://127.0.0.1:$port"
    victoria-metrics -storageDataPath="$1" -httpListenAddr="127.0.0.1:$port" -retentionPeriod=100y \
        -loggerLevel=WARN >"$1.log" 2>&1 &
    VM_PID=$!
    PIDS+=("$VM_PID")
    for _ in $(seq 1 100); do
        curl -fsS --noproxy '*' "$VM_URL/health" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "VictoriaMetrics did not start (see $1.log)"
}
vm_metric() { # sum of a /metrics series matching a regex
    curl -fsS --noproxy '*' "$VM_URL/metrics" | awk -v re="$1" '$0 ~ re { s += $NF } END { printf "%d\n", s }'
}
settle_vm() { # flush, merge, wait until no merge runs and the storage size stops changing
    local dir="$1" last=-1 now stable=0
    curl -fsS --noproxy '*' "$VM_URL/internal/force_flush" >/dev/null
    curl -fsS --noproxy '*' "$VM_URL/internal/force_merge" >/dev/null
    for _ in $(seq 1 600); do
        sleep 1
        now="$(bytes_of "$dir")"
        if [ "$(vm_metric '^vm_active_merges')" = 0 ] && [ "$now" = "$last" ]; then
            stable=$((stable + 1)); [ "$stable" -ge 5 ] && return 0
        else
            stable=0
        fi
        last="$now"
    done
    log "VictoriaMetrics merges did not settle in 10 minutes; measuring anyway"
}
stop_vm() { kill -INT "$VM_PID"; wait "$VM_PID" || true; }

# --- part 1: TSBS cpu-only --------------------------------------------------------------------------------------
TSBS_ARGS=("$@")
log "TSBS data: ${TSBS_ARGS[*]:-defaults (100 hosts x 24 h x 10 s, seed 1)}"
start_collector "$TMP/tsbs-damselfly" collector-tsbs
PUSH_JSON="$("$TSBS" push --collector "$GRPC_URL" "${TSBS_ARGS[@]}")"
log "pushed: $PUSH_JSON"
VALUES="$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["values_stored"])' "$PUSH_JSON")"
CHECK_SQL="SELECT count(*) AS n, sum(CAST(round(usage_user * 100) AS BIGINT)) + sum(CAST(round(usage_guest_nice * 100) AS BIGINT)) AS s FROM cpu"
BEFORE="$(sql "$CHECK_SQL")"
FLUSH_START=$(date +%s%N)
stop_collector
FLUSH_SECS=$(awk -v a="$FLUSH_START" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')
D_PARQUET="$(parquet_bytes "$TMP/tsbs-damselfly")"
D_TOTAL="$(bytes_of "$TMP/tsbs-damselfly")"
D_FILES="$(find "$TMP/tsbs-damselfly" -name '*.parquet' | wc -l)"
# The files read back the same rows and values (a restart reads only Parquet: the WAL was deleted by the flush).
start_collector "$TMP/tsbs-damselfly" collector-tsbs-check
AFTER="$(sql "$CHECK_SQL")"
stop_collector
[ "$BEFORE" = "$AFTER" ] || die "rows differ after the flush: before $BEFORE, after $AFTER"
[ "${BEFORE%%,*}" -eq $((VALUES / 10)) ] || die "stored rows ${BEFORE%%,*} != pushed $((VALUES / 10))"

log "VictoriaMetrics: sending the same data as line protocol"
start_vm "$TMP/tsbs-vm"
"$TSBS" line-protocol "${TSBS_ARGS[@]}" |
    split -l 20000 --filter "curl -fsS --noproxy '*' --data-binary @- '$VM_URL/write'"
settle_vm "$TMP/tsbs-vm"
VM_ROWS="$(vm_metric '^vm_rows\{type="storage/(small|big)"\}')"
stop_vm
V_TOTAL="$(bytes_of "$TMP/tsbs-vm")"
V_DATA="$(bytes_of "$TMP/tsbs-vm/data")"
V_INDEX="$(bytes_of "$TMP/tsbs-vm/indexdb")"
[ "$VM_ROWS" -eq "$VALUES" ] || log "warning: VictoriaMetrics reports $VM_ROWS samples, expected $VALUES"

# --- part 2: real agent data ------------------------------------------------------------------------------------
if [ "$AGENT_SECS" -gt 0 ]; then
    log "real agent data: $AGENTS agents, every 1 s, for $AGENT_SECS s"
    start_collector "$TMP/agents-damselfly" collector-agents
    AGENT_PIDS=()
    for i in $(seq 1 "$AGENTS"); do
        "$AGENT" --collector "$GRPC_URL" --interval 1 --ns bench --mcis storage --vm "vm-$i" --hostname "bench-$i" \
            --csp local --region local-1 --zone local-1a --state-dir "$TMP/agent-$i" \
            >"$TMP/agent-$i.log" 2>&1 &
        AGENT_PIDS+=("$!")
        PIDS+=("$!")
    done
    sleep "$AGENT_SECS"
    for pid in "${AGENT_PIDS[@]}"; do kill -TERM "$pid"; done
    for pid in "${AGENT_PIDS[@]}"; do wait "$pid" || true; done
    # Every table's rows as line protocol (for VictoriaMetrics) and the count of non-null field values.
    python3 - "$DAMSELFLY" "$HTTP_URL" "$TMP/agents.lp" >"$TMP/agents.count" <<'PY'
import json, subprocess, sys
damselfly, url, out = sys.argv[1:4]
def sql(q):
    r = subprocess.run([damselfly, "sql", "--url", url, "--format", "json", q], check=True, capture_output=True, text=True)
    return json.loads(r.stdout)
def esc(s):
    return str(s).replace("\\", "\\\\").replace(",", "\\,").replace("=", "\\=").replace(" ", "\\ ")
values = numeric = 0
with open(out, "w") as lp:
    for t in sql("SHOW TABLES"):
        if t["table_schema"] != "public":
            continue
        table = t["table_name"]
        cols = sql(f"SELECT column_name, data_type FROM information_schema.columns WHERE table_name = '{table}' AND table_schema = 'public'")
        tags = [c["column_name"] for c in cols if c["data_type"].startswith("Dictionary")]
        fields = {c["column_name"]: c["data_type"] for c in cols if c["column_name"] != "time" and c["column_name"] not in tags}
        for row in sql(f'SELECT *, CAST(time AS BIGINT) AS t_ns FROM "{table}"'):
            tagtext = "".join(f",{esc(k)}={esc(row[k])}" for k in tags if row.get(k) not in (None, ""))
            parts = []
            for k, ty in fields.items():
                v = row.get(k)
                if v is None:
                    continue
                values += 1
                # VictoriaMetrics keeps numbers only (it drops string fields); count what it can store.
                if ty in ("Float64",):
                    parts.append(f"{esc(k)}={float(v)!r}"); numeric += 1
                elif ty in ("Int64", "UInt64"):
                    parts.append(f"{esc(k)}={int(v)}i"); numeric += 1
                elif ty == "Boolean":
                    parts.append(f"{esc(k)}={'true' if v else 'false'}"); numeric += 1
            if parts:
                lp.write(f"{esc(table)}{tagtext} {','.join(parts)} {row['t_ns']}\n")
print(values, numeric)
PY
    read -r A_VALUES A_NUMERIC <"$TMP/agents.count"
    stop_collector
    A_PARQUET="$(parquet_bytes "$TMP/agents-damselfly")"
    A_TOTAL="$(bytes_of "$TMP/agents-damselfly")"
    A_FILES="$(find "$TMP/agents-damselfly" -name '*.parquet' | wc -l)"
    start_vm "$TMP/agents-vm"
    split -l 20000 --filter "curl -fsS --noproxy '*' --data-binary @- '$VM_URL/write'" "$TMP/agents.lp"
    settle_vm "$TMP/agents-vm"
    AV_ROWS="$(vm_metric '^vm_rows\{type="storage/(small|big)"\}')"
    stop_vm
    AV_TOTAL="$(bytes_of "$TMP/agents-vm")"
    AV_DATA="$(bytes_of "$TMP/agents-vm/data")"
fi

# --- report -----------------------------------------------------------------------------------------------------
cat <<EOF

== storage-size summary ($(date -u +%Y-%m-%d), $(nproc) CPUs, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1))
TSBS cpu-only: ${TSBS_ARGS[*]:-100 hosts x 24 h x 10 s, seed 1}: $VALUES values (VictoriaMetrics counted $VM_ROWS samples)
  Damselfly Parquet        $D_PARQUET bytes in $D_FILES files   $(ratio "$D_PARQUET" "$VALUES") B/value   (final flush took ${FLUSH_SECS}s)
  Damselfly data dir       $D_TOTAL bytes   $(ratio "$D_TOTAL" "$VALUES") B/value
  VictoriaMetrics data/    $V_DATA bytes   $(ratio "$V_DATA" "$VALUES") B/value
  VictoriaMetrics total    $V_TOTAL bytes   $(ratio "$V_TOTAL" "$VALUES") B/value   (indexdb $V_INDEX)
  ratio Damselfly/VM       Parquet/data: $(ratio "$D_PARQUET" "$V_DATA")   total/total: $(ratio "$D_TOTAL" "$V_TOTAL")
  check                    rows and value sums identical before and after the flush ($BEFORE)
EOF
if [ "$AGENT_SECS" -gt 0 ]; then
cat <<EOF
Real agent data: $AGENTS agents x $AGENT_SECS s at 1 s: $A_VALUES values ($A_NUMERIC numeric, which VictoriaMetrics can store; it counted $AV_ROWS samples)
  Damselfly Parquet        $A_PARQUET bytes in $A_FILES files   $(ratio "$A_PARQUET" "$A_VALUES") B/value
  Damselfly data dir       $A_TOTAL bytes   $(ratio "$A_TOTAL" "$A_VALUES") B/value
  VictoriaMetrics data/    $AV_DATA bytes   $(ratio "$AV_DATA" "$AV_ROWS") B/sample
  VictoriaMetrics total    $AV_TOTAL bytes   $(ratio "$AV_TOTAL" "$AV_ROWS") B/sample
  ratio Damselfly/VM       per value: Parquet/data $(ratio "$(ratio "$A_PARQUET" "$A_VALUES")" "$(ratio "$AV_DATA" "$AV_ROWS")")   total/total $(ratio "$(ratio "$A_TOTAL" "$A_VALUES")" "$(ratio "$AV_TOTAL" "$AV_ROWS")")
EOF
fi
if [ "${VARIANTS:-0}" = 1 ]; then
    echo; echo "== re-encoding variants, TSBS"
    cargo run -q --release -p damselfly-collector --example storage_variants -- "$TMP/tsbs-damselfly" | tail -n 16
    if [ "$AGENT_SECS" -gt 0 ]; then
        echo; echo "== re-encoding variants, real agent data"
        cargo run -q --release -p damselfly-collector --example storage_variants -- "$TMP/agents-damselfly"
    fi
fi
