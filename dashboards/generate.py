#!/usr/bin/env python3
"""Generates Damselfly's Grafana dashboards (the JSON files beside this script) from the one description below.

Every panel reads the collector through Grafana's PostgreSQL data source pointed at the collector's pg port
(`damselfly up --pg ADDR`); the data source is the dashboard variable `datasource`, so the dashboards import into any
Grafana without editing. The SQL is DataFusion's dialect: Grafana expands `$__timeFilter(time)` to
`time BETWEEN '<from>' AND '<to>'` and `$__interval_ms` to a number before sending, and the collector answers those.
tests/dashboards.rs runs every query of every panel and variable against a live collector.

    python3 dashboards/generate.py          # rewrite the JSON files
    python3 dashboards/generate.py --check  # exit 1 if a JSON file differs from what this script generates
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Grafana's id of its PostgreSQL data source plugin (Grafana 10.3 and later; older versions call it "postgres").
PG_PLUGIN = "grafana-postgresql-datasource"
DATASOURCE = {"type": PG_PLUGIN, "uid": "${datasource}"}
# One bucket per Grafana interval: `$__interval_ms` is the interval Grafana picked for the panel's width.
BUCKET = "date_bin(INTERVAL '$__interval_ms milliseconds', time)"


def datasource_variable():
    return {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": PG_PLUGIN,
        "description": "A PostgreSQL data source pointed at the collector's pg port (damselfly up --pg ADDR).",
        "current": {},
        "hide": 0,
        "refresh": 1,
        "regex": "",
        "options": [],
    }


def query_variable(name, label, sql, description):
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "definition": sql,
        "query": sql,
        "description": description,
        "refresh": 2,
        "sort": 1,
        "multi": False,
        "includeAll": False,
        "current": {},
        "hide": 0,
        "options": [],
        "regex": "",
    }


def panel(title, description, sql, kind="timeseries", fmt="time_series", unit=None, width=12, height=8):
    p = {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": [
            {
                "refId": "A",
                "datasource": DATASOURCE,
                "editorMode": "code",
                "format": fmt,
                "rawQuery": True,
                "rawSql": sql,
            }
        ],
        "fieldConfig": {"defaults": {}, "overrides": []},
        "options": {},
        "gridPos": {"w": width, "h": height},
    }
    if unit:
        p["fieldConfig"]["defaults"]["unit"] = unit
    return p


def dashboard(uid, title, description, variables, panels, tags):
    # Lay the panels out left to right, top to bottom, on Grafana's 24-column grid.
    x = y = row_height = 0
    for i, p in enumerate(panels):
        w, h = p["gridPos"]["w"], p["gridPos"]["h"]
        if x + w > 24:
            x, y, row_height = 0, y + row_height, 0
        p["gridPos"] = {"x": x, "y": y, "w": w, "h": h}
        p["id"] = i + 1
        x += w
        row_height = max(row_height, h)
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["damselfly"] + tags,
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "timezone": "",
        "templating": {"list": [datasource_variable()] + variables},
        "annotations": {"list": []},
        "links": [],
        "panels": panels,
    }


def host_overview():
    host = "hostname = '$host'"
    where = f"$__timeFilter(time) AND {host}"
    return dashboard(
        "damselfly-host",
        "Damselfly / Host overview",
        "One VM's CPU, memory, disks, load and network, from the rows its agent sends.",
        [
            query_variable(
                "host", "Host", "SELECT DISTINCT hostname FROM cpu ORDER BY hostname", "The VM, by host name."
            )
        ],
        [
            panel(
                "CPU",
                "Share of CPU time (all cores, cpu-total) in user, system and I/O wait, averaged per interval.",
                f"SELECT {BUCKET} AS time, avg(usage_user) AS \"user\", avg(usage_system) AS \"system\", "
                f"avg(usage_iowait) AS iowait FROM cpu WHERE {where} AND cpu = 'cpu-total' GROUP BY 1 ORDER BY 1",
                unit="percent",
            ),
            panel(
                "Memory used",
                "Memory in use as a percentage of the total (mem.used_percent), averaged per interval.",
                f"SELECT {BUCKET} AS time, avg(used_percent) AS used FROM mem WHERE {where} GROUP BY 1 ORDER BY 1",
                unit="percent",
            ),
            panel(
                "Disk used per mount",
                "Each file system's used space in percent (disk.used_percent), the highest value per interval.",
                f"SELECT {BUCKET} AS time, path AS metric, max(used_percent) AS used FROM disk WHERE {where} "
                "GROUP BY 1, 2 ORDER BY 1",
                unit="percent",
            ),
            panel(
                "Load",
                "Run-queue load averages over 1, 5 and 15 minutes (system.load1/5/15).",
                f"SELECT {BUCKET} AS time, avg(load1) AS load1, avg(load5) AS load5, avg(load15) AS load15 "
                f"FROM system WHERE {where} GROUP BY 1 ORDER BY 1",
            ),
            panel(
                "Network received",
                "Bytes received per second on each interface: the growth of the net.bytes_recv counter within "
                "each interval, divided by the interval.",
                f"SELECT {BUCKET} AS time, interface AS metric, "
                "(max(bytes_recv) - min(bytes_recv)) * 1000.0 / $__interval_ms AS rx "
                f"FROM net WHERE {where} GROUP BY 1, 2 ORDER BY 1",
                unit="Bps",
            ),
            panel(
                "Network sent",
                "Bytes sent per second on each interface: the growth of the net.bytes_sent counter within each "
                "interval, divided by the interval.",
                f"SELECT {BUCKET} AS time, interface AS metric, "
                "(max(bytes_sent) - min(bytes_sent)) * 1000.0 / $__interval_ms AS tx "
                f"FROM net WHERE {where} GROUP BY 1, 2 ORDER BY 1",
                unit="Bps",
            ),
            panel(
                "Latest disk use",
                "Each mount's newest used percentage and device in the time range.",
                "SELECT path, device, last_value(used_percent ORDER BY time) AS used_percent FROM disk "
                f"WHERE {where} GROUP BY path, device ORDER BY path",
                kind="table",
                fmt="table",
                width=24,
                height=6,
            ),
        ],
        ["host"],
    )


def mcis_overview():
    scope = "ns_id = '$ns' AND mcis_id = '$mcis'"
    where = f"$__timeFilter(time) AND {scope}"
    return dashboard(
        "damselfly-mcis",
        "Damselfly / MCIS overview",
        "Every VM of one MCIS (multi-cloud infrastructure service): where they run and how busy they are.",
        [
            query_variable(
                "ns", "Namespace", "SELECT DISTINCT ns_id FROM cpu ORDER BY ns_id", "The namespace (ns_id)."
            ),
            query_variable(
                "mcis",
                "MCIS",
                "SELECT DISTINCT mcis_id FROM cpu WHERE ns_id = '$ns' ORDER BY mcis_id",
                "The MCIS (mcis_id) within the namespace.",
            ),
        ],
        [
            panel(
                "CPU busy per VM",
                "Each VM's CPU in use (100 - usage_idle of cpu-total), averaged per interval.",
                f"SELECT {BUCKET} AS time, hostname AS metric, avg(100 - usage_idle) AS busy FROM cpu "
                f"WHERE {where} AND cpu = 'cpu-total' GROUP BY 1, 2 ORDER BY 1",
                unit="percent",
            ),
            panel(
                "Memory used per VM",
                "Each VM's memory in use, in percent, averaged per interval.",
                f"SELECT {BUCKET} AS time, hostname AS metric, avg(used_percent) AS used FROM mem "
                f"WHERE {where} GROUP BY 1, 2 ORDER BY 1",
                unit="percent",
            ),
            panel(
                "Mean CPU busy",
                "CPU in use averaged over every VM of the MCIS and the whole time range.",
                f"SELECT avg(100 - usage_idle) AS busy FROM cpu WHERE {where} AND cpu = 'cpu-total'",
                kind="stat",
                fmt="table",
                unit="percent",
                width=6,
            ),
            panel(
                "VMs per cloud and region",
                "How many distinct VMs reported from each cloud and region in the time range.",
                f"SELECT csp, region, count(DISTINCT vm_id) AS vms FROM cpu WHERE {where} "
                "GROUP BY csp, region ORDER BY vms DESC, csp, region",
                kind="table",
                fmt="table",
                width=6,
            ),
            panel(
                "VMs",
                "Each VM with its cloud, region and newest CPU reading in the time range.",
                "SELECT vm_id, hostname, csp, region, last_value(100 - usage_idle ORDER BY time) AS cpu_busy, "
                f"max(time) AS last_row FROM cpu WHERE {where} AND cpu = 'cpu-total' "
                "GROUP BY vm_id, hostname, csp, region ORDER BY vm_id",
                kind="table",
                fmt="table",
            ),
        ],
        ["mcis"],
    )


def metric(name, label=None):
    """The current value(s) of one of the collector's own metrics (damselfly.metrics, as on /metrics)."""
    label_col = f"replace(replace(labels, '{label}=\"', ''), '\"', '') AS {label}, " if label else ""
    return f"SELECT {label_col}value FROM damselfly.metrics WHERE metric = '{name}' ORDER BY labels"


def collector_health():
    return dashboard(
        "damselfly-collector",
        "Damselfly / Collector health",
        "The collector's own metrics (damselfly.metrics: the same values as its /metrics page, as of the "
        "query) and how many agents report.",
        [],
        [
            panel(
                "Points stored by protocol",
                "Rows stored since the collector started, per ingest protocol (damselfly_ingest_points_total).",
                metric("damselfly_ingest_points_total", "protocol"),
                kind="bargauge",
                fmt="table",
                width=8,
            ),
            panel(
                "Errors by kind",
                "Errors since the collector started (damselfly_errors_total): rejected or retried batches, WAL, "
                "flush and maintenance failures, failed queries.",
                metric("damselfly_errors_total", "kind"),
                kind="table",
                fmt="table",
                width=8,
            ),
            panel(
                "Buffer",
                "Bytes of rows in memory not yet written to Parquet (damselfly_buffer_bytes).",
                metric("damselfly_buffer_bytes"),
                kind="stat",
                fmt="table",
                unit="bytes",
                width=4,
            ),
            panel(
                "Parquet files",
                "Parquet files of the measurement tables (damselfly_parquet_files).",
                metric("damselfly_parquet_files"),
                kind="stat",
                fmt="table",
                width=4,
            ),
            panel(
                "Mean latencies",
                "Mean duration and count of WAL group commits, flushes, maintenance phases and queries since the "
                "collector started (each histogram's _sum over its _count).",
                "SELECT replace(s.metric, '_sum', '') AS histogram, s.labels, c.value AS count, "
                "CASE WHEN c.value > 0 THEN s.value / c.value END AS mean_seconds "
                "FROM damselfly.metrics s JOIN damselfly.metrics c "
                "ON c.metric = replace(s.metric, '_sum', '_count') AND c.labels = s.labels "
                "WHERE s.metric LIKE '%_seconds_sum' ORDER BY histogram, s.labels",
                kind="table",
                fmt="table",
                width=16,
            ),
            panel(
                "Uptime",
                "Seconds since the collector's store was opened (damselfly_uptime_seconds).",
                metric("damselfly_uptime_seconds"),
                kind="stat",
                fmt="table",
                unit="s",
                width=4,
            ),
            panel(
                "Tables",
                "Measurement tables the collector stores (damselfly_tables).",
                metric("damselfly_tables"),
                kind="stat",
                fmt="table",
                width=4,
            ),
            panel(
                "VMs reporting",
                "Distinct agents whose cpu rows arrived in each interval.",
                f"SELECT {BUCKET} AS time, count(DISTINCT agent_id) AS agents FROM cpu WHERE $__timeFilter(time) "
                "GROUP BY 1 ORDER BY 1",
                width=24,
            ),
        ],
        ["collector"],
    )


DASHBOARDS = {
    "host-overview.json": host_overview,
    "mcis-overview.json": mcis_overview,
    "collector-health.json": collector_health,
}


def main():
    check = "--check" in sys.argv[1:]
    stale = []
    for name, make in DASHBOARDS.items():
        text = json.dumps(make(), indent=2, sort_keys=True) + "\n"
        path = HERE / name
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print("out of date (run python3 dashboards/generate.py): " + ", ".join(stale), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
