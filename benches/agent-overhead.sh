#!/usr/bin/env bash
# Agent cost side by side with Prometheus node_exporter, in one run on this machine: both collect every second
# for DURATION seconds (node_exporter is scraped every second, the way Prometheus would; damselfly-agent collects
# every second in pull mode and its /metrics page is scraped at the same rate). Reports CPU seconds per collection
# (utime+stime from /proc, divided by the number of collections) and peak RSS (VmHWM), plus binary sizes.
#
#   bash benches/agent-overhead.sh            # DURATION=60 by default
#   DURATION=120 bash benches/agent-overhead.sh
#
# Needs: Linux, curl, the Debian package prometheus-node-exporter (installed here if missing). Only 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-60}

if ! command -v prometheus-node-exporter >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" != 0 ] && SUDO=sudo
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus-node-exporter >/dev/null
fi
[ "${SKIP_BUILD:-0}" = 1 ] || cargo build --release -q -p damselfly-agent
AGENT=target/release/damselfly-agent
NODE_EXPORTER=$(command -v prometheus-node-exporter)

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
AGENT_PORT=$(free_port); NE_PORT=$(free_port)
STATE=$(mktemp -d)
trap 'kill $AGENT_PID $NE_PID 2>/dev/null || true; rm -rf "$STATE"' EXIT

"$AGENT" --listen 127.0.0.1:$AGENT_PORT --interval 1 --state-dir "$STATE" 2>"$STATE/agent.log" &
AGENT_PID=$!
"$NODE_EXPORTER" --web.listen-address=127.0.0.1:$NE_PORT 2>"$STATE/ne.log" &
NE_PID=$!
for _ in $(seq 50); do
  curl -fs "http://127.0.0.1:$AGENT_PORT/health" >/dev/null && curl -fs "http://127.0.0.1:$NE_PORT/metrics" >/dev/null && break
  sleep 0.2
done

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
CLK=$(getconf CLK_TCK)
A0=$(ticks $AGENT_PID); N0=$(ticks $NE_PID)
SCRAPES=0
END=$((SECONDS + DURATION))
while [ $SECONDS -lt $END ]; do
  curl -fs -o /dev/null "http://127.0.0.1:$AGENT_PORT/metrics"
  curl -fs -o /dev/null "http://127.0.0.1:$NE_PORT/metrics"
  SCRAPES=$((SCRAPES + 1))
  sleep 1
done
A1=$(ticks $AGENT_PID); N1=$(ticks $NE_PID)
A_HWM=$(awk '/VmHWM/ {print $2}' /proc/$AGENT_PID/status)
N_HWM=$(awk '/VmHWM/ {print $2}' /proc/$NE_PID/status)
A_SIZE=$(stat -c %s "$AGENT"); N_SIZE=$(stat -c %s "$NODE_EXPORTER")

python3 - "$CLK" "$DURATION" "$SCRAPES" "$A0" "$A1" "$N0" "$N1" "$A_HWM" "$N_HWM" "$A_SIZE" "$N_SIZE" <<'EOF'
import sys
clk, dur, scrapes, a0, a1, n0, n1, ahwm, nhwm, asz, nsz = map(float, sys.argv[1:])
# The agent collects once per second whether scraped or not; node_exporter collects once per scrape.
a_per = (a1 - a0) / clk / dur
n_per = (n1 - n0) / clk / scrapes
print(f"duration {dur:.0f} s, {scrapes:.0f} scrapes of each")
print(f"{'':24}{'damselfly-agent':>18}{'node_exporter':>16}{'ratio':>8}")
print(f"{'CPU ms per collection':24}{a_per*1e3:>18.2f}{n_per*1e3:>16.2f}{a_per/n_per if n_per else float('nan'):>8.2f}")
print(f"{'peak RSS (MiB)':24}{ahwm/1024:>18.1f}{nhwm/1024:>16.1f}{ahwm/nhwm:>8.2f}")
print(f"{'binary (MiB)':24}{asz/2**20:>18.1f}{nsz/2**20:>16.1f}{asz/nsz:>8.2f}")
EOF
