#!/usr/bin/env bash
# Alert evaluation cost: 1,000 rules over 1,000 VMs' hot data, evaluated every 10 s (issue 11).
#
# One release collector. A feeder writes, like 1,000 agents at a 10 s interval, one row per VM and round to each of
# cpu, mem, disk and net (line protocol over HTTP), after back-filling the last 10 minutes so every window is full.
# Phase 1 (baseline): feeder only, no rules, for MEASURE_SECS: the collector's CPU time. Phase 2: RULES rules are
# posted through the API (threshold rules over the four tables with avg/max/min/last_value of their fields, windows
# of 1 and 5 minutes, grouped by vm_id or by mcis_id, plus 10 absence rules), and after the first evaluation the
# same measurement is repeated; GET /api/v1/alerts/status gives the evaluation time per round (last, mean, max) and
# the SQL statements per round (rules that share table, filter, window and group-by share one statement).
# `UNSHARED=1` gives every threshold rule its own window (60 s + i s) so each needs its own statement: the cost
# without that sharing.
#
# Usage: benches/alerts.sh
# Environment (defaults in brackets): VMS [1000]  RULES [1000]  MEASURE_SECS [60]  EVAL_MS [10000]  UNSHARED [0]
#   SKIP_BUILD=1  use the binaries already in target/release;  BIN=DIR  another build (e.g. target/debug)
# Prints one JSON line with the figures.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
die() { echo "alerts-bench: $*" >&2; exit 1; }
command -v curl >/dev/null || die "curl is required"
command -v python3 >/dev/null || die "python3 is required"

VMS="${VMS:-1000}"
RULES="${RULES:-1000}"
MEASURE_SECS="${MEASURE_SECS:-60}"
EVAL_MS="${EVAL_MS:-10000}"
UNSHARED="${UNSHARED:-0}"

if [ "${SKIP_BUILD:-0}" != 1 ] && [ -z "${BIN:-}" ]; then
    echo "alerts-bench: building the release binary" >&2
    cargo build --release -p damselfly
fi
BIN="${BIN:-$ROOT/target/release}"

TMP="$(mktemp -d "${TMPDIR:-/tmp}/damselfly-alerts.XXXXXX")"
DF_PID="" FEED_PID=""
cleanup() {
    for pid in $FEED_PID $DF_PID; do
        kill -TERM "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$TMP"
}
trap cleanup EXIT

cat >"$TMP/collector.toml" <<EOF
[alerts]
eval_interval_ms = $EVAL_MS
EOF
"$BIN/damselfly" collector --data-dir "$TMP/data" --grpc 127.0.0.1:0 --http 127.0.0.1:0 \
    --config "$TMP/collector.toml" >"$TMP/df.out" 2>"$TMP/df.log" &
DF_PID=$!
DF_HTTP=""
for _ in $(seq 1 300); do
    DF_HTTP="$(sed -n 's/^ *http: *//p' "$TMP/df.out" | head -n1)"
    [ -n "$DF_HTTP" ] && curl -fsS "$DF_HTTP/health" >/dev/null 2>&1 && break
    sleep 0.1
done
[ -n "$DF_HTTP" ] || die "the collector did not start: $(cat "$TMP/df.log")"
echo "alerts-bench: collector $DF_HTTP (pid $DF_PID)" >&2

# The feeder: back-fill 10 minutes, then one round every 10 s until killed.
cat >"$TMP/feed.py" <<'EOF'
import random, sys, time, urllib.request
url, vms = sys.argv[1] + "/api/v2/write?bucket=bench&precision=ns", int(sys.argv[2])
rnd = random.Random(1)
def lines(t):
    out = []
    for i in range(vms):
        tags = f"mcis_id=mcis-{i // 10:03d},vm_id=vm-{i:04d}"
        busy = 95.0 if i % 50 == 0 else 20.0
        out.append(f"cpu,{tags},cpu=cpu-total usage_user={busy + rnd.random() * 5:.2f},usage_system={rnd.random() * 5:.2f},usage_idle={70 + rnd.random() * 5:.2f},usage_iowait={rnd.random():.2f} {t}")
        out.append(f"mem,{tags} used_percent={40 + rnd.random() * 20:.2f},available={rnd.randint(1 << 30, 8 << 30)}i {t}")
        out.append(f"disk,{tags},path=/ used_percent={50 + rnd.random() * 10:.2f},free={rnd.randint(1 << 30, 100 << 30)}i {t}")
        out.append(f"net,{tags},interface=eth0 bytes_recv={rnd.randint(0, 1 << 40)}i,bytes_sent={rnd.randint(0, 1 << 40)}i {t}")
    return out
def post(batch):
    req = urllib.request.Request(url, data="\n".join(batch).encode(), method="POST")
    urllib.request.urlopen(req, timeout=60).read()
now = time.time()
for k in range(60, 0, -1):
    post(lines(int((now - 10 * k) * 1e9)))
print("backfilled", flush=True)
while True:
    t0 = time.time()
    post(lines(int(t0 * 1e9)))
    time.sleep(max(0.0, 10 - (time.time() - t0)))
EOF
python3 "$TMP/feed.py" "$DF_HTTP" "$VMS" >"$TMP/feed.out" 2>"$TMP/feed.log" &
FEED_PID=$!
for _ in $(seq 1 600); do
    grep -q backfilled "$TMP/feed.out" 2>/dev/null && break
    kill -0 "$FEED_PID" 2>/dev/null || die "the feeder failed: $(cat "$TMP/feed.log")"
    sleep 0.5
done
grep -q backfilled "$TMP/feed.out" || die "the back-fill did not finish"
echo "alerts-bench: $VMS VMs back-filled (10 min at 10 s), feeding every 10 s" >&2

cpu_ticks() { awk '{print $14 + $15}' "/proc/$DF_PID/stat"; }
HZ=$(getconf CLK_TCK)
CORES=$(nproc)
measure() { # seconds -> CPU share of one core, in percent
    local a b
    a=$(cpu_ticks); sleep "$1"; b=$(cpu_ticks)
    python3 -c "print(round(100.0 * ($b - $a) / $HZ / $1, 2))"
}

echo "alerts-bench: baseline (no rules) for ${MEASURE_SECS}s" >&2
BASE=$(measure "$MEASURE_SECS")

# The rules.
python3 - "$DF_HTTP" "$RULES" "$UNSHARED" >"$TMP/rules.log" 2>&1 <<'EOF' || die "posting rules failed: $(cat "$TMP/rules.log")"
import json, sys, urllib.request, urllib.error
url, n, unshared = sys.argv[1] + "/api/v1/alerts/rules", int(sys.argv[2]), sys.argv[3] == "1"
# (table, expression, op, warning, critical): thresholds a real operator might set; only the busy VMs (every 50th
# runs at 95-100 % user CPU) fire.
exprs = [
    ("cpu", "avg(usage_user)", ">", 80, 95), ("cpu", "max(usage_user)", ">", 85, 97),
    ("cpu", "avg(usage_system)", ">", 50, 80), ("cpu", "max(usage_iowait)", ">", 20, 50),
    ("cpu", "min(usage_idle)", "<", 10, 5), ("cpu", "last_value(usage_user ORDER BY time)", ">", 90, 98),
    ("mem", "avg(used_percent)", ">", 85, 95), ("mem", "max(used_percent)", ">", 90, 97),
    ("mem", "min(available)", "<", 256 << 20, 128 << 20), ("disk", "max(used_percent)", ">", 90, 95),
    ("disk", "min(free)", "<", 512 << 20, 256 << 20), ("net", "max(bytes_recv)", ">", 2e12, 4e12),
    ("net", "max(bytes_sent)", ">", 2e12, 4e12),
]
absence = 10
for i in range(n):
    if i < absence:
        rule = {"name": f"absent-{i:02d}", "kind": "absence", "absent_intervals": 3 + i}
    else:
        table, expr, op, warning, critical = exprs[i % len(exprs)]
        rule = {
            "name": f"rule-{i:04d}", "table": table, "expr": expr,
            "group_by": ["vm_id"] if (i // len(exprs)) % 2 == 0 else ["mcis_id"],
            "window": f"{60 + i}s" if unshared else ("1m" if (i // (2 * len(exprs))) % 2 == 0 else "5m"),
            "op": op, "warning": float(warning), "critical": float(critical), "for": "30s",
        }
        if table == "cpu":
            rule["where"] = "cpu = 'cpu-total'"
    req = urllib.request.Request(url, data=json.dumps(rule).encode(), method="POST",
                                 headers={"content-type": "application/json"})
    try:
        urllib.request.urlopen(req, timeout=60).read()
    except urllib.error.HTTPError as e:
        sys.exit(f"rule {rule['name']}: {e.code} {e.read().decode()}")
EOF
echo "alerts-bench: $RULES rules posted; waiting for the first evaluation" >&2
status() { curl -fsS "$DF_HTTP/api/v1/alerts/status"; }
R0=$(status | python3 -c 'import json,sys; print(json.load(sys.stdin)["rounds"])')
for _ in $(seq 1 $((EVAL_MS / 100 * 3))); do
    [ "$(status | python3 -c 'import json,sys; print(json.load(sys.stdin)["rounds"])')" -gt "$R0" ] && break
    sleep 0.1
done
S0=$(status)
echo "alerts-bench: with rules for ${MEASURE_SECS}s" >&2
WITH=$(measure "$MEASURE_SECS")
S1=$(status)
ACTIVE=$(curl -fsS "$DF_HTTP/api/v1/alerts" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')
RSS_KB=$(awk '/VmRSS/ {print $2}' "/proc/$DF_PID/status")

python3 - "$S0" "$S1" "$BASE" "$WITH" "$CORES" "$VMS" "$RULES" "$EVAL_MS" "$ACTIVE" "$RSS_KB" "$UNSHARED" <<'EOF'
import json, sys
s0, s1 = json.loads(sys.argv[1]), json.loads(sys.argv[2])
base, with_rules, cores = float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
rounds = s1["rounds"] - s0["rounds"]
# The mean over the measured rounds only (the status keeps a running mean over all rounds).
mean = (s1["mean_round_ms"] * s1["rounds"] - s0["mean_round_ms"] * s0["rounds"]) / max(rounds, 1)
print(json.dumps({
    "vms": int(sys.argv[6]), "rules": s1["rules"], "eval_interval_ms": int(sys.argv[8]),
    "unshared": sys.argv[11] == "1",
    "queries_per_round": s1["queries_last_round"], "rounds_measured": rounds,
    "round_ms_mean": round(mean, 1), "round_ms_last": round(s1["last_round_ms"], 1),
    "round_ms_max_ever": round(s1["max_round_ms"], 1),
    "cpu_pct_of_one_core_baseline": base, "cpu_pct_of_one_core_with_rules": with_rules,
    "alerting_cpu_pct_of_one_core": round(with_rules - base, 2),
    "alerting_cpu_pct_of_machine": round((with_rules - base) / cores, 2), "cores": cores,
    "active_alerts": int(sys.argv[9]), "rss_mib": round(int(sys.argv[10]) / 1024, 1),
}))
EOF
