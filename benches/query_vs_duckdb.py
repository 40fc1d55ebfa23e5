#!/usr/bin/env python3
"""TSBS cpu-only queries, Damselfly (SQL over HTTP) vs DuckDB (in-process, same Parquet files), side by side.

Used by benches/query-vs-duckdb.sh, which starts the collector, loads the data and calls this with the collector's
HTTP URL and the glob of its Parquet files. Can be run by hand against any collector holding the TSBS data set:

    target/bench-venv/bin/python benches/query_vs_duckdb.py --url http://127.0.0.1:8086 \
        --parquet '/path/data/data/cpu/*/*/*.parquet'

The queries follow TSBS's TimescaleDB generators (cmd/tsbs_generate_queries/databases/timescaledb/devops.go) on a
flat table (the tags are columns of `cpu`, so `tags_id IN (SELECT id FROM tags WHERE hostname IN ...)` becomes
`hostname IN ...` and the join to `tags` disappears). Hosts and time windows come from a seeded RNG, so both engines
get byte-identical SQL (apart from the FROM clause). Results are compared (row count, values rounded to 6 digits);
a mismatch is reported and makes the exit status 1. Each query is warmed up, then run RUNS times per engine,
alternating engines (D, K, K, D, D, K, ...), timing the whole call (Damselfly: HTTP request and the full decode
of the response; DuckDB: execute + fetchall).
"""
import argparse
import datetime as dt
import http.client
import json
import math
import random
import statistics
import sys
import time
import urllib.parse

import duckdb

START = dt.datetime(2016, 1, 1, tzinfo=dt.timezone.utc)  # damselfly-tsbs --start default (TSBS default)
FIELDS = ["usage_user", "usage_system", "usage_idle", "usage_nice", "usage_iowait",
          "usage_irq", "usage_softirq", "usage_steal", "usage_guest", "usage_guest_nice"]
TAGS = ["hostname", "region", "datacenter", "rack", "os", "arch", "team", "service", "service_version",
        "service_environment"]


def ts(t):
    return "TIMESTAMP '" + t.strftime("%Y-%m-%d %H:%M:%S") + "'"


def make_queries(seed, hosts, hours):
    """One SQL text per TSBS query type, with `{T}` in place of the table."""
    rng = random.Random(seed)
    end_all = START + dt.timedelta(hours=hours)

    def window(length):
        span = (end_all - START - length).total_seconds()
        s = START + dt.timedelta(seconds=rng.randrange(0, int(span) + 1))
        return s, s + length

    def host_list(n):
        return ", ".join("'host_%d'" % h for h in sorted(rng.sample(range(hosts), n)))

    q = {}
    # single-groupby-1-1-1: max of 1 metric, 1 host, 1 hour, by minute
    s, e = window(dt.timedelta(hours=1))
    q["single-groupby-1-1-1"] = (
        "SELECT date_trunc('minute', time) AS minute, max(usage_user) AS max_usage_user FROM {T} "
        f"WHERE hostname IN ({host_list(1)}) AND time >= {ts(s)} AND time < {ts(e)} "
        "GROUP BY minute ORDER BY minute ASC")
    # cpu-max-all-8: max of all 10 metrics, 8 hosts, 8 hours, by hour
    s, e = window(dt.timedelta(hours=8))
    q["cpu-max-all-8"] = (
        "SELECT date_trunc('hour', time) AS hour, "
        + ", ".join(f"max({f}) AS max_{f}" for f in FIELDS)
        + f" FROM {{T}} WHERE hostname IN ({host_list(8)}) AND time >= {ts(s)} AND time < {ts(e)} "
        "GROUP BY hour ORDER BY hour")
    # double-groupby-1: mean of 1 metric, all hosts, 12 hours, by hour and host
    s, e = window(dt.timedelta(hours=12))
    q["double-groupby-1"] = (
        "SELECT date_trunc('hour', time) AS hour, hostname, avg(usage_user) AS mean_usage_user FROM {T} "
        f"WHERE time >= {ts(s)} AND time < {ts(e)} GROUP BY hour, hostname ORDER BY hour, hostname")
    # high-cpu-1: all rows of 1 host with usage_user > 90 in 12 hours
    s, e = window(dt.timedelta(hours=12))
    q["high-cpu-1"] = (
        "SELECT * FROM {T} "
        f"WHERE usage_user > 90.0 AND time >= {ts(s)} AND time < {ts(e)} AND hostname IN ({host_list(1)}) "
        "ORDER BY time")
    # groupby-orderby-limit: last 5 minutes (max usage_user) before a random time
    s, e = window(dt.timedelta(0))
    q["groupby-orderby-limit"] = (
        "SELECT date_trunc('minute', time) AS minute, max(usage_user) AS max_usage_user FROM {T} "
        f"WHERE time < {ts(e)} GROUP BY minute ORDER BY minute DESC LIMIT 5")
    # lastpoint: the latest row of every host
    q["lastpoint"] = "SELECT DISTINCT ON (hostname) * FROM {T} ORDER BY hostname, time DESC"
    # extra, not in issue 8's list: high-cpu-all (all hosts, 12 hours), so the SELECT * path is also checked on a
    # non-empty answer (high-cpu-1's one host may have no row over 90 in its window)
    s, e = window(dt.timedelta(hours=12))
    q["high-cpu-all (extra)"] = (
        "SELECT * FROM {T} "
        f"WHERE usage_user > 90.0 AND time >= {ts(s)} AND time < {ts(e)} ORDER BY time, hostname")
    return q


class Damselfly:
    def __init__(self, url, fmt):
        u = urllib.parse.urlparse(url)
        self.host, self.port = u.hostname, u.port
        self.fmt = fmt
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=300)

    def query(self, sql):
        for attempt in (0, 1):
            try:
                self.conn.request("POST", f"/api/v1/sql?format={self.fmt}", body=sql.encode(),
                                  headers={"Content-Type": "text/plain"})
                r = self.conn.getresponse()
                body = r.read()
                break
            except (http.client.HTTPException, ConnectionError):
                if attempt:
                    raise
                self.conn.close()
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=300)
        if r.status != 200:
            raise RuntimeError(f"damselfly HTTP {r.status}: {body[:500]!r}")
        if self.fmt == "json":
            rows = json.loads(body)
            cols = list(rows[0].keys()) if rows else []
            return cols, [tuple(row[c] for c in cols) for row in rows]
        import pyarrow.ipc as ipc  # only with --format arrow
        t = ipc.open_stream(body).read_all()
        return t.column_names, list(zip(*(c.to_pylist() for c in t.columns)))


class DuckDB:
    def __init__(self, parquet_glob, threads):
        self.con = duckdb.connect()
        self.con.execute("SET TimeZone = 'UTC'")  # timestamp literals and date_trunc in UTC, like Damselfly
        if threads:
            self.con.execute(f"SET threads = {int(threads)}")
        self.source = (f"read_parquet('{parquet_glob}', hive_partitioning = true, union_by_name = true)")
        # float fields may be stored as DECIMAL; cast them so aggregates and results are DOUBLE like Damselfly's
        cols = [r[0] for r in self.con.execute(f"DESCRIBE SELECT * FROM {self.source}").fetchall()]
        sel = []
        for c in cols:
            if c in ("date", "hour"):  # hive partition columns, not part of the table
                continue
            sel.append(f'CAST("{c}" AS DOUBLE) AS "{c}"' if c.startswith("usage_") else f'"{c}"')
        self.table = "(SELECT " + ", ".join(sel) + f" FROM {self.source})"
        self.types = self.con.execute(f"DESCRIBE SELECT * FROM {self.source}").fetchall()

    def query(self, sql):
        cur = self.con.execute(sql)
        cols = [d[0] for d in cur.description]
        return cols, cur.fetchall()


def norm_value(v):
    if isinstance(v, dt.datetime):
        if v.tzinfo is None:
            v = v.replace(tzinfo=dt.timezone.utc)
        return v.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")
    if isinstance(v, str):
        try:  # Damselfly's JSON timestamps: 2016-01-01T00:00:00Z
            if len(v) >= 20 and v[4] == "-" and v[10] == "T":
                return norm_value(dt.datetime.fromisoformat(v.replace("Z", "+00:00")))
        except ValueError:
            pass
        return v
    if isinstance(v, (int, float)) or hasattr(v, "as_tuple"):  # Decimal too
        f = float(v)
        return None if math.isnan(f) else round(f, 6)
    return v


def normalise(cols, rows, sort):
    order = sorted(range(len(cols)), key=lambda i: cols[i])  # compare by column name, not position
    out = [tuple(norm_value(r[i]) for i in order) for r in rows]
    if sort:
        out.sort(key=lambda r: tuple((x is None, str(x)) for x in r))
    return [cols[i] for i in order], out


def compare(name, d, k):
    # lastpoint and high-cpu-1 have no total order in the SQL (ties); compare as sorted sets
    (dc, dr), (kc, kr) = normalise(*d, sort=True), normalise(*k, sort=True)
    if dc != kc and dr and kr:  # an empty JSON answer carries no column names
        return f"{name}: columns differ: damselfly {dc} duckdb {kc}"
    if len(dr) != len(kr):
        return f"{name}: row counts differ: damselfly {len(dr)} duckdb {len(kr)}"
    for i, (a, b) in enumerate(zip(dr, kr)):
        if a != b:
            return f"{name}: row {i} differs: damselfly {a} duckdb {b}"
    # ordered queries: also the order as returned
    if "ORDER BY" in QUERIES_BY_NAME[name] and name not in ("lastpoint", "high-cpu-1", "high-cpu-all (extra)"):
        if normalise(*d, sort=False)[1] != normalise(*k, sort=False)[1]:
            return f"{name}: same rows, different order"
    return None


QUERIES_BY_NAME = {}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True, help="collector HTTP URL")
    ap.add_argument("--parquet", required=True, help="glob of the cpu table's Parquet files")
    ap.add_argument("--runs", type=int, default=21)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--hosts", type=int, default=100)
    ap.add_argument("--hours", type=int, default=24)
    ap.add_argument("--format", choices=["json", "arrow"], default="json")
    ap.add_argument("--duckdb-threads", type=int, default=0, help="0 = DuckDB's default (all cores)")
    ap.add_argument("--only", default="", help="comma-separated query names")
    ap.add_argument("--explain", action="store_true", help="print Damselfly's EXPLAIN ANALYZE of each query")
    ap.add_argument("--json-out", default="", help="write the per-run timings here")
    a = ap.parse_args()

    queries = make_queries(a.seed, a.hosts, a.hours)
    if a.only:
        queries = {k: v for k, v in queries.items() if k in a.only.split(",")}
    QUERIES_BY_NAME.update(queries)
    df = Damselfly(a.url, a.format)
    kd = DuckDB(a.parquet, a.duckdb_threads)
    print(f"duckdb {duckdb.__version__}, threads {kd.con.execute('SELECT current_setting(' + chr(39) + 'threads' + chr(39) + ')').fetchone()[0]}; "
          f"parquet columns: " + ", ".join(f"{n} {t}" for n, t, *_ in kd.types if n.startswith("usage_user") or n in ("time", "hostname")),
          file=sys.stderr)

    failures, results, timings = [], [], {}
    for name, tmpl in queries.items():
        dsql, ksql = tmpl.format(T="cpu"), tmpl.format(T=kd.table)
        print(f"--- {name}: {dsql}", file=sys.stderr)
        try:
            d, k = df.query(dsql), kd.query(ksql)
        except Exception as e:  # a query Damselfly cannot run is a result, not a crash
            failures.append(f"{name}: error: {e}")
            print(f"    ERROR {e}", file=sys.stderr)
            results.append((name, None, None, None, None))
            continue
        err = compare(name, d, k)
        if err:
            failures.append(err)
        print(f"    rows damselfly {len(d[1])} duckdb {len(k[1])}: {'MISMATCH ' + err if err else 'same results'}",
              file=sys.stderr)
        if a.explain:
            try:
                _, plan = df.query("EXPLAIN ANALYZE " + dsql)
                for row in plan:
                    print("    " + str(row[-1]).replace("\n", "\n    "), file=sys.stderr)
            except Exception as e:
                print(f"    EXPLAIN ANALYZE failed: {e}", file=sys.stderr)
        for _ in range(a.warmup):
            df.query(dsql)
            kd.query(ksql)
        td, tk = [], []
        for i in range(a.runs):
            order = [(df, dsql, td), (kd, ksql, tk)]
            if i % 2:
                order.reverse()
            for eng, sql, out in order:
                t0 = time.perf_counter()
                eng.query(sql)
                out.append((time.perf_counter() - t0) * 1000)
        md, mk = statistics.median(td), statistics.median(tk)
        timings[name] = {"damselfly_ms": td, "duckdb_ms": tk, "rows": len(d[1]), "match": err is None}
        results.append((name, md, mk, md / mk, err is None))
        print(f"    damselfly median {md:.1f} ms (min {min(td):.1f}, max {max(td):.1f}); "
              f"duckdb median {mk:.1f} ms (min {min(tk):.1f}, max {max(tk):.1f})", file=sys.stderr)

    print(f"\n| query | Damselfly median ms | DuckDB median ms | ratio D/DuckDB | same results |")
    print("| --- | ---: | ---: | ---: | --- |")
    for name, md, mk, ratio, ok in results:
        if md is None:
            print(f"| {name} | error | — | — | no |")
        else:
            print(f"| {name} | {md:.1f} | {mk:.1f} | {ratio:.2f} | {'yes' if ok else 'NO'} |")
    lp = [r for r in results if r[0] == "lastpoint" and r[1] is not None]
    if lp:
        print(f"\nlastpoint on Damselfly: {lp[0][1]:.1f} ms, {'under' if lp[0][1] < 50 else 'NOT under'} 50 ms")
    issue = [r for r in results if "(extra)" not in r[0]]
    slower = [r[0] for r in issue if r[1] is None or r[3] > 1]
    print(f"Damselfly <= DuckDB on {sum(1 for r in issue if r[1] is not None and r[3] <= 1)} of the {len(issue)} "
          f"queries of issue 8; slower (or failed) on: {', '.join(slower) if slower else 'none'}")
    print(f"runs per query per engine: {a.runs} (after {a.warmup} warm-up), alternating; Damselfly format={a.format}")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"queries": queries, "timings": timings, "failures": failures}, f, indent=1)
    if failures:
        print("\nFAILURES:\n  " + "\n  ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
