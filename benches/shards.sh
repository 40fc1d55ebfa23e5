#!/usr/bin/env bash
# Sharded ingest benchmark: 3 release collector shards (separate processes, one shared store) on this machine,
# damselfly-loadgen simulating shard-aware agents against them, in two runs:
#   steady  the load for DURATION seconds; throughput, ack latency, RSS per shard;
#   kill    the same, with one shard killed (SIGKILL) in the middle of the measured window; the loadgen reports
#           how long until every agent of the killed shard had a batch acknowledged by another shard. The killed
#           shard is restarted after the load (WAL replay; batches its peers stored meanwhile are left out), or
#           RESTART_AFTER seconds after the kill, during the load, to see its agents return home.
# After each run every shard flushes (POST /api/v1/admin/flush) and a SQL count through one shard (spanning all
# shards, ?complete=true) must equal the points acknowledged: 0 lost, 0 duplicated; the cpu table is also checked
# for duplicate (agent_id, cpu, time) rows.
#
# Usage: benches/shards.sh
# Environment (defaults in brackets):
#   AGENTS [10000]  INTERVAL_MS [10000]  POINTS [0 = one collection round per batch, 10-24 points]
#   DURATION [120] measured seconds  WARMUP [10]  KILL_SHARD [s0]  KILL_AT [DURATION/2] seconds into the window
#   RESTART_AFTER [empty: after the load]  SCENARIOS ["steady kill"]  LOADGEN_ARGS (extra loadgen flags)  COLLECTOR_ARGS (extra collector flags)
#   SKIP_BUILD=1  use the binaries already built;  KEEP_DATA=1  keep the temp dir (logs, data, JSON)
#   DAMSELFLY_BIN / LOADGEN_BIN  binaries to use [target/release/damselfly, target/release/damselfly-loadgen]
#
# Everything listens on and connects to 127.0.0.1 only. Exit status: 0 if every run passed its checks.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
die() { echo "shards: $*" >&2; exit 1; }
log() { echo "shards: $*" >&2; }
command -v curl >/dev/null || die "curl is required"
command -v jq >/dev/null || die "jq is required"
command -v python3 >/dev/null || die "python3 is required (free ports)"

AGENTS="${AGENTS:-10000}"
INTERVAL_MS="${INTERVAL_MS:-10000}"
POINTS="${POINTS:-0}"
DURATION="${DURATION:-120}"
WARMUP="${WARMUP:-10}"
KILL_SHARD="${KILL_SHARD:-s0}"
KILL_AT="${KILL_AT:-$((DURATION / 2))}"
SCENARIOS="${SCENARIOS:-steady kill}"
SHARDS=(s0 s1 s2)

if [ "${SKIP_BUILD:-0}" != 1 ]; then
    log "building release binaries"
    cargo build --release -p damselfly -p damselfly-benches
fi
DAMSELFLY="${DAMSELFLY_BIN:-$ROOT/target/release/damselfly}"
LOADGEN="${LOADGEN_BIN:-$ROOT/target/release/damselfly-loadgen}"
[ -x "$DAMSELFLY" ] || die "$DAMSELFLY not found"
[ -x "$LOADGEN" ] || die "$LOADGEN not found"

TMP="$(mktemp -d "${TMPDIR:-/tmp}/damselfly-shards.XXXXXX")"
declare -A PID GRPC HTTP
SAMPLER_PID=""
stop_all() {
    [ -n "$SAMPLER_PID" ] && { kill "$SAMPLER_PID" 2>/dev/null || true; wait "$SAMPLER_PID" 2>/dev/null || true; }
    SAMPLER_PID=""
    for s in "${SHARDS[@]}"; do
        local p="${PID[$s]:-}"
        if [ -n "$p" ] && kill -0 "$p" 2>/dev/null; then
            kill -TERM "$p" 2>/dev/null || true
            wait "$p" 2>/dev/null || true
        fi
        PID[$s]=""
    done
}
cleanup() {
    stop_all
    if [ "${KEEP_DATA:-0}" = 1 ]; then log "kept $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now_ms() { date +%s%3N; }
rss_kb() { sed -n 's/^VmRSS:[[:space:]]*\([0-9]*\) kB/\1/p' "/proc/$1/status" 2>/dev/null || true; }
# CPU seconds (user + system) a process has used so far.
cpu_s() { awk -v tck="$(getconf CLK_TCK)" '{ printf "%.1f", ($14 + $15) / tck }' "/proc/$1/stat" 2>/dev/null || echo "?"; }

# Starts shard $1 of run dir $2 (ports and shards file already chosen) and waits until it answers /health.
start_shard() {
    local s=$1 dir=$2 p
    # shellcheck disable=SC2086 # COLLECTOR_ARGS is a list of flags
    "$DAMSELFLY" collector --shard-id "$s" --shards-file "$dir/shards.toml" --shared-dir "$dir/shared" \
        --data-dir "$dir/$s" --grpc "${GRPC[$s]#http://}" --http "${HTTP[$s]#http://}" ${COLLECTOR_ARGS:-} \
        >>"$dir/$s.out" 2>>"$dir/$s.log" &
    p=$!
    PID[$s]=$p
    for _ in $(seq 1 300); do
        kill -0 "$p" 2>/dev/null || { tail -n 20 "$dir/$s.log" >&2; die "shard $s exited during start-up"; }
        curl -fsS --noproxy '*' "${HTTP[$s]}/health" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "shard $s does not answer ${HTTP[$s]}/health (see $dir/$s.log)"
}

# Every 2 s: "unix_ms shard rss_kb cpu_s" for each running shard, and for the loadgen as shard "loadgen".
sample_rss() {
    local out=$1
    while true; do
        local t
        t=$(now_ms)
        for s in "${SHARDS[@]}"; do
            local p="${PID[$s]:-}"
            [ -n "$p" ] && [ -r "/proc/$p/status" ] && echo "$t $s $(rss_kb "$p") $(cpu_s "$p")" >>"$out"
        done
        local lg
        lg="$(pgrep -n -f "^$LOADGEN " 2>/dev/null || true)"
        [ -n "$lg" ] && echo "$t loadgen $(rss_kb "$lg") $(cpu_s "$lg")" >>"$out"
        sleep 2
    done
}

# SELECT count over all shards (through shard $1): prints the number, or -1 on error.
sql_count() {
    local http=$1 q=$2 out
    out="$(curl -fsS --noproxy '*' -X POST "$http/api/v1/sql?format=csv&complete=true" --data-binary "$q" 2>"$TMP/sql.err")" \
        || { log "query failed: $q: $(cat "$TMP/sql.err")"; echo -1; return; }
    tail -n1 <<<"$out" | tr -d '\r"'
}

FAILED=0
REPORT="$TMP/report.txt"
: >"$REPORT"

run_scenario() {
    local scenario=$1 dir="$TMP/$1"
    mkdir -p "$dir/shared"
    : >"$dir/shards.toml.tmp"
    for s in "${SHARDS[@]}"; do
        GRPC[$s]="http://127.0.0.1:$(free_port)"
        HTTP[$s]="http://127.0.0.1:$(free_port)"
        printf '[[shards]]\nid = "%s"\ngrpc_url = "%s"\nhttp_url = "%s"\n\n' "$s" "${GRPC[$s]}" "${HTTP[$s]}" \
            >>"$dir/shards.toml.tmp"
    done
    mv "$dir/shards.toml.tmp" "$dir/shards.toml"
    for s in "${SHARDS[@]}"; do start_shard "$s" "$dir"; done
    log "$scenario: shards up: $(for s in "${SHARDS[@]}"; do printf '%s pid %s grpc %s http %s; ' "$s" "${PID[$s]}" "${GRPC[$s]}" "${HTTP[$s]}"; done)"
    # Let every shard probe its peers once, so none starts out redirecting.
    sleep 2

    # The seed is a shard that stays up; the loadgen fetches the map once, at start.
    local seed=s1
    [ "$KILL_SHARD" = s1 ] && seed=s2
    sample_rss "$dir/rss.txt" &
    SAMPLER_PID=$!
    local cpu_before=() s
    for s in "${SHARDS[@]}"; do cpu_before+=("$(cpu_s "${PID[$s]}")"); done
    local load_start measure_start measure_end
    load_start=$(now_ms)
    measure_start=$((load_start + WARMUP * 1000))
    measure_end=$((measure_start + DURATION * 1000))
    local cmd=("$LOADGEN" --shards-from "${GRPC[$seed]}" --agents "$AGENTS" --interval-ms "$INTERVAL_MS"
        --points-per-batch "$POINTS" --in-flight 8 --warmup "$WARMUP" --duration "$DURATION" --columnar --json)
    # shellcheck disable=SC2206 # LOADGEN_ARGS is a list of flags
    cmd+=(${LOADGEN_ARGS:-})
    echo "${cmd[*]}" >"$dir/loadgen.cmd"
    "${cmd[@]}" >"$dir/loadgen.json" 2>"$dir/loadgen.log" &
    local lg_pid=$! kill_ms="" killed_cpu=""
    if [ "$scenario" = kill ]; then
        sleep $((WARMUP + KILL_AT))
        killed_cpu="$(cpu_s "${PID[$KILL_SHARD]}")"
        kill_ms=$(now_ms)
        kill -KILL "${PID[$KILL_SHARD]}"
        wait "${PID[$KILL_SHARD]}" 2>/dev/null || true
        PID[$KILL_SHARD]=""
        log "$scenario: killed $KILL_SHARD (SIGKILL) at $kill_ms"
    fi
    local restart_ms="" restart_s=""
    if [ -n "$kill_ms" ] && [ -n "${RESTART_AFTER:-}" ]; then
        sleep "$RESTART_AFTER"
        restart_ms=$(now_ms)
        start_shard "$KILL_SHARD" "$dir"
        restart_s=$(awk -v a="$restart_ms" -v b="$(now_ms)" 'BEGIN { printf "%.1f", (b - a) / 1000 }')
        log "$scenario: restarted $KILL_SHARD during the load, healthy in ${restart_s}s"
    fi
    local lg_status=0
    wait "$lg_pid" || lg_status=$?
    local cpu_after=()
    for s in "${SHARDS[@]}"; do
        if [ "$s" = "$KILL_SHARD" ] && [ -n "$kill_ms" ]; then cpu_after+=("$killed_cpu"); else cpu_after+=("$(cpu_s "${PID[$s]}")"); fi
    done
    kill "$SAMPLER_PID" 2>/dev/null || true
    wait "$SAMPLER_PID" 2>/dev/null || true
    SAMPLER_PID=""
    [ -s "$dir/loadgen.json" ] || { tail -n 20 "$dir/loadgen.log" >&2; die "$scenario: the loadgen printed no summary (exit $lg_status)"; }
    local J
    J="$(tail -n1 "$dir/loadgen.json")"
    jv() { jq -r "$1" <<<"$J"; }

    if [ -n "$kill_ms" ] && [ -z "$restart_ms" ]; then
        local t0
        t0=$(now_ms)
        start_shard "$KILL_SHARD" "$dir"
        restart_s=$(awk -v a="$t0" -v b="$(now_ms)" 'BEGIN { printf "%.1f", (b - a) / 1000 }')
        log "$scenario: restarted $KILL_SHARD in ${restart_s}s"
        sleep 2
    fi

    # Flush every shard, then count through one of them (the query spans all shards).
    local s2
    for s2 in "${SHARDS[@]}"; do
        curl -fsS --noproxy '*' -X POST "${HTTP[$s2]}/api/v1/admin/flush" >/dev/null || log "flush of $s2 failed"
    done
    local q_http="${HTTP[$seed]}" all=0 n t
    for t in cpu mem disk net system; do
        n="$(sql_count "$q_http" "SELECT count(*) AS n FROM $t")"
        if [ "$n" -ge 0 ] 2>/dev/null && [ "$all" -ge 0 ]; then all=$((all + n)); else all=-1; fi
    done
    local cpu_rows cpu_distinct
    cpu_rows="$(sql_count "$q_http" "SELECT count(*) AS n FROM cpu")"
    cpu_distinct="$(sql_count "$q_http" "SELECT count(*) AS n FROM (SELECT DISTINCT agent_id, cpu, time FROM cpu)")"
    local acked=$(($(jv .total.points_stored) + $(jv .total.points_duplicate)))
    local unacked
    unacked=$(jv .total.unacked_points)
    local lost=$((acked - all)) check=ok
    [ "$all" -ge 0 ] || check=QUERY-FAILED
    [ "$lost" -eq 0 ] && [ "$unacked" -eq 0 ] || check=MISMATCH
    [ "$cpu_rows" = "$cpu_distinct" ] || check=DUPLICATES
    [ "$lg_status" -eq 0 ] || check="LOADGEN-EXIT-$lg_status"

    # RSS per shard over the measured window: mean and peak (MiB); a killed shard only until the kill (the sampler
    # does not follow a restart).
    local rss_lines=""
    for s2 in "${SHARDS[@]}" loadgen; do
        rss_lines+="$(awk -v s="$s2" -v a="$measure_start" -v b="$measure_end" '
            $2 == s && $1 >= a && $1 <= b && $3 > 0 {
                n++; sum += $3; if ($3 > max) max = $3
                if (n == 1) { t0 = $1; c0 = $4 }
                t1 = $1; c1 = $4
            }
            END {
                if (!n) { printf "%s -", s; exit }
                cpu = (t1 > t0) ? sprintf("%.0f %%", (c1 - c0) / ((t1 - t0) / 1000) * 100) : "-"
                printf "%-8s RSS mean %4.0f MiB  peak %4.0f MiB   CPU %s of one core (%d samples)", s, sum / n / 1024, max / 1024, cpu, n
            }' "$dir/rss.txt")"$'\n'
    done
    local cpu_line="" i=0
    for s2 in "${SHARDS[@]}"; do
        cpu_line+="$s2 $(awk -v a="${cpu_before[$i]}" -v b="${cpu_after[$i]}" 'BEGIN { printf "%.0f", b - a }') s  "
        i=$((i + 1))
    done
    local failover=""
    if [ -n "$kill_ms" ]; then
        failover="$(jq -r --arg k "$KILL_SHARD" --argjson kill "$kill_ms" '.shards[] | select(.id == $k) |
            "failover       \(.id) killed; its agents: \(.agents_home), saw it fail: \(.lost_home) (first \((.first_failure_unix_ms - $kill) / 1000) s after the SIGKILL), re-homed: \(.rehomed)\n" +
            "re-home time   all \(.agents_home) agents had a batch acknowledged by another shard \(if .last_rehomed_unix_ms then ((.last_rehomed_unix_ms - $kill) / 1000 | tostring) + " s after the SIGKILL" else "NEVER" end) (slowest single agent \(.max_agent_rehome_ms / 1000) s after its own failure)"' <<<"$J")"
        [ "$(jq -r --arg k "$KILL_SHARD" '.shards[] | select(.id == $k) | (.rehomed == .agents_home)' <<<"$J")" = true ] \
            || check="$check/NOT-ALL-REHOMED"
    fi
    local lat_ms
    lat_ms="$(jq -r '.latency_us | "p50 \(.p50 / 1000) ms  p90 \(.p90 / 1000) ms  p99 \(.p99 / 1000) ms  p99.9 \(.p999 / 1000) ms  max \(.max / 1000) ms"' <<<"$J")"
    {
        echo "== shards.sh $scenario: $AGENTS agents every $INTERVAL_MS ms, 3 shards, ${DURATION} s measured after ${WARMUP} s warm-up"
        echo "machine        $(nproc) CPUs, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1), load avg $(cut -d' ' -f1-3 /proc/loadavg)"
        echo "command        ${cmd[*]}"
        echo "throughput     $(jv '.points_per_sec | floor') points/s, $(jv '.batches_per_sec | floor') batches/s acknowledged STORED in the window ($(jv '.values_per_sec | floor') values/s)"
        echo "ack latency    $lat_ms ($(jv .latency_us.count) acks)"
        echo "per shard      $(jq -r '[.shards[] | "\(.id): \(.agents_home) agents, \(.points_stored) points"] | join("; ")' <<<"$J")"
        echo "events         resent $(jv .total.batches_resent)  redirects $(jv .total.redirects)  stream errors $(jv .total.stream_errors)  shard switches $(jv .total.shard_switches)  duplicate $(jv .total.batches_duplicate)  retry $(jv .total.retry_acks)  rejected $(jv .total.rejected)  missed ticks $(jv .total.missed_ticks)"
        [ -n "$failover" ] && echo "$failover"
        if [ -n "$restart_ms" ]; then
            echo "restart        $KILL_SHARD restarted $RESTART_AFTER s after the kill, healthy in ${restart_s} s; $(jq -r --arg k "$KILL_SHARD" --argjson r "$restart_ms" '.shards[] | select(.id == $k) |
                "back home: \(.returned) of \(.rehomed) agents, the last \(if .last_returned_unix_ms then ((.last_returned_unix_ms - $r) / 1000 | tostring) + " s after the restart" else "-" end)"' <<<"$J")"
        elif [ -n "$restart_s" ]; then
            echo "restart        $KILL_SHARD restarted after the load, healthy in ${restart_s} s"
        fi
        echo "processes      (measured window, sampled every 2 s; a killed shard until the kill)"
        printf '%s' "$rss_lines" | sed 's/^/  /'
        echo "collector CPU  $cpu_line(CPU seconds during the load; a killed shard until the kill)"
        echo "stored rows    $all (all tables, through ${seed}, after flush), acknowledged $acked ($(jv .total.points_stored) STORED + $(jv .total.points_duplicate) in DUPLICATE acks), unacknowledged $unacked"
        echo "lost           $lost;  cpu rows $cpu_rows, distinct (agent_id, cpu, time) $cpu_distinct"
        echo "check          $check"
        echo
    } | tee -a "$REPORT"
    [ "$check" = ok ] || FAILED=1
    stop_all
}

for sc in $SCENARIOS; do
    case "$sc" in
        steady | kill) run_scenario "$sc" ;;
        *) die "unknown scenario $sc (steady, kill)" ;;
    esac
done
log "report: $REPORT"
[ "$FAILED" -eq 0 ] || die "a run failed its checks"
