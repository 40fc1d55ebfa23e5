//! The CB-Dragonfly-compatible monitoring API: `GET /dragonfly/ns/{ns}/mcis/{mcis}/vm/{vm}/metric/{metric}/info`.
//!
//! CB-Dragonfly answered this endpoint from InfluxDB 1.x; Cloud-Barista tools (cb-webtool, scripts written against
//! Dragonfly's Swagger page) read its JSON. This module answers the same request from SQL over the store: one query
//! per request, built from the agent's tables (`cpu`, `cpufreq`, `mem`, `disk`, `diskio`, `net`) and bucketed with
//! `date_bin`. The response keeps Dragonfly's shape and field names (`cpu_utilization`, `mem_used`, `kb_read`, ...)
//! and fixes its known faults:
//!
//! * a VM is `(ns_id, mcis_id, vm_id)`, never `vm_id` alone (Dragonfly filtered on `vmId` only, so two namespaces
//!   with a VM of the same id were mixed);
//! * every output column is defined once, in one ordered list that generates both the SQL aliases and the response's
//!   labels, so a label can never sit on another column's value (Dragonfly relabelled InfluxDB's columns with a
//!   struct's field names in a different order and count);
//! * counters (`diskio`, `net`) are per-second rates between consecutive samples of one device, summed over the
//!   VM's real devices, instead of derivatives of whatever series InfluxDB grouped together;
//! * `cpu` is the `cpu-total` row, not an average of the total and every core;
//! * buckets without data are left out rather than filled with zeros.
//!
//! Parameters, the response shape with examples, the field mapping and every difference from CB-Dragonfly are in
//! `docs/DRAGONFLY_API.md`.

use crate::model::now_nanos;
use std::sync::Arc;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Float64Type, TimestampNanosecondType};
use axum::Router;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Deserialize, Serialize, Serializer};

use crate::catalog::TableSchema;
use crate::http::{ApiError, ApiState};
use crate::model::{ColumnKind, FieldType};
use crate::query::{QueryEngine, QueryResult};
use crate::store::Store;

/// The route, with Dragonfly's path (its API was served under `/dragonfly`).
pub const ROUTE: &str = "/dragonfly/ns/{ns}/mcis/{mcis}/vm/{vm}/metric/{metric}/info";

const SECOND_NS: i64 = 1_000_000_000;
const MINUTE_NS: i64 = 60 * SECOND_NS;
const HOUR_NS: i64 = 60 * MINUTE_NS;
const DAY_NS: i64 = 24 * HOUR_NS;

/// The longest `duration`, in days: a year (leap day included).
pub const MAX_DURATION_DAYS: i64 = 366;
/// The most buckets one answer may hold: a week of minutes. Bounds the response and the work of one request.
pub const MAX_BUCKETS: i64 = 10_080;
/// Longest accepted id (the agent accepts tag values this long for its identity).
pub const MAX_ID_BYTES: usize = 256;
/// Rows up to this far ahead of the collector's clock still count: agents' clocks drift, and Dragonfly's InfluxDB
/// query also looked one minute ahead (`time > now() + 1m - duration`).
const FUTURE_SLACK_NS: i64 = MINUTE_NS;
/// How far before the window a counter's previous sample is looked for, so that the first sample inside the window
/// has a rate too (15 minutes covers any sane collection interval; the agent's default is 10 s).
const RATE_LOOKBACK_NS: i64 = 15 * MINUTE_NS;

/// The Dragonfly-compatible routes.
pub fn routes() -> Router<Arc<ApiState>> {
    Router::new().route(ROUTE, get(vm_metric_info))
}

/// A metric of the API (Dragonfly's names; `mem` and `net`, the agent's table names, are accepted too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    Cpu,
    CpuFreq,
    Memory,
    Disk,
    DiskIo,
    Network,
}

impl Metric {
    pub const ALL: [Metric; 6] = [
        Metric::Cpu,
        Metric::CpuFreq,
        Metric::Memory,
        Metric::Disk,
        Metric::DiskIo,
        Metric::Network,
    ];

    /// The metric a path segment names, if any.
    pub fn parse(s: &str) -> Option<Metric> {
        match s {
            "cpu" => Some(Metric::Cpu),
            "cpufreq" => Some(Metric::CpuFreq),
            "memory" | "mem" => Some(Metric::Memory),
            "disk" => Some(Metric::Disk),
            "diskio" => Some(Metric::DiskIo),
            "network" | "net" => Some(Metric::Network),
            _ => None,
        }
    }

    /// Dragonfly's name for it: the response's `name`.
    pub fn name(self) -> &'static str {
        match self {
            Metric::Cpu => "cpu",
            Metric::CpuFreq => "cpufreq",
            Metric::Memory => "memory",
            Metric::Disk => "disk",
            Metric::DiskIo => "diskio",
            Metric::Network => "network",
        }
    }

    /// Where its columns come from. `disk` is file-system space plus the disks' I/O rates, as in Dragonfly.
    fn parts(self) -> &'static [Part] {
        match self {
            Metric::Cpu => &[CPU],
            Metric::CpuFreq => &[CPUFREQ],
            Metric::Memory => &[MEMORY],
            Metric::Disk => &[DISK_SPACE, DISKIO],
            Metric::DiskIo => &[DISKIO],
            Metric::Network => &[NETWORK],
        }
    }

    /// The response's value columns, in order (after `time`).
    pub fn columns(self) -> Vec<&'static str> {
        self.parts().iter().flat_map(Part::columns).collect()
    }
}

/// The list of valid metric names, for error messages.
const VALID_METRICS: &str = "cpu, cpufreq, memory (or mem), disk, diskio, network (or net)";

/// `periodType`: the bucket width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    Minute,
    Hour,
    Day,
}

impl Period {
    pub fn parse(s: &str) -> Result<Period, String> {
        match s {
            "m" => Ok(Period::Minute),
            "h" => Ok(Period::Hour),
            "d" => Ok(Period::Day),
            other => Err(format!(
                "periodType {other:?} is not valid; use m (1-minute buckets), h (1 hour) or d (1 day)"
            )),
        }
    }

    pub fn nanos(self) -> i64 {
        match self {
            Period::Minute => MINUTE_NS,
            Period::Hour => HOUR_NS,
            Period::Day => DAY_NS,
        }
    }

    fn letter(self) -> char {
        match self {
            Period::Minute => 'm',
            Period::Hour => 'h',
            Period::Day => 'd',
        }
    }

    fn sql_interval(self) -> &'static str {
        match self {
            Period::Minute => "INTERVAL '1 minute'",
            Period::Hour => "INTERVAL '1 hour'",
            Period::Day => "INTERVAL '1 day'",
        }
    }

    /// The `duration` used when the request has none: 60 minutes, 24 hours or 7 days.
    fn default_duration(self) -> i64 {
        match self {
            Period::Minute => HOUR_NS,
            Period::Hour => DAY_NS,
            Period::Day => 7 * DAY_NS,
        }
    }
}

/// `statisticsCriteria`: how one bucket's samples become one value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Criteria {
    Min,
    Max,
    Avg,
    /// The value at the latest time in the bucket.
    Last,
}

impl Criteria {
    pub fn parse(s: &str) -> Result<Criteria, String> {
        match s {
            "min" => Ok(Criteria::Min),
            "max" => Ok(Criteria::Max),
            "avg" => Ok(Criteria::Avg),
            "last" => Ok(Criteria::Last),
            other => Err(format!(
                "statisticsCriteria {other:?} is not valid; use min, max, avg or last"
            )),
        }
    }

    /// The aggregate over `column` (a quoted identifier) of one bucket.
    fn sql(self, column: &str) -> String {
        match self {
            Criteria::Min => format!("min({column})"),
            Criteria::Max => format!("max({column})"),
            Criteria::Avg => format!("avg({column})"),
            Criteria::Last => format!("last_value({column} ORDER BY time)"),
        }
    }
}

/// Parses `duration`: a whole number and one unit, `m`, `h` or `d` (`10m`, `1h`, `7d`), from 1m to
/// [`MAX_DURATION_DAYS`]. Returns nanoseconds.
pub fn parse_duration(s: &str) -> Result<i64, String> {
    let invalid = || {
        format!(
            "duration {s:?} is not valid; use a whole number followed by m, h or d (e.g. 10m, 1h, 7d), from 1m to \
             {MAX_DURATION_DAYS}d"
        )
    };
    let unit = match s.as_bytes().last() {
        Some(b'm') => MINUTE_NS,
        Some(b'h') => HOUR_NS,
        Some(b'd') => DAY_NS,
        _ => return Err(invalid()),
    };
    let digits = &s[..s.len() - 1];
    // Strict: ASCII digits only (no sign, no spaces, no leading zero), so "+5m", " 5m" and "05m" are refused.
    if digits.is_empty()
        || digits.len() > 9
        || digits.starts_with('0')
        || !digits.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(invalid());
    }
    let n: i64 = digits.parse().map_err(|_| invalid())?;
    match n.checked_mul(unit) {
        Some(ns) if ns <= MAX_DURATION_DAYS * DAY_NS => Ok(ns),
        _ => Err(invalid()),
    }
}

/// Checks one path id (`ns`, `mcis` or `vm`): 1 to [`MAX_ID_BYTES`] ASCII letters, digits, `-`, `_` or `.` (what
/// Cloud-Barista ids and host names, the agent's default `vm_id`, are made of). The SQL quotes it as well.
pub fn validate_id(parameter: &str, value: &str) -> Result<(), String> {
    let ok = !value.is_empty()
        && value.len() <= MAX_ID_BYTES
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{parameter} {value:?} is not a valid id: use 1 to {MAX_ID_BYTES} ASCII letters, digits, '-', '_' or '.'"
        ))
    }
}

/// The VM a request is about: all three ids, always together.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmKey {
    #[serde(rename = "nsId")]
    pub ns: String,
    #[serde(rename = "mcisId")]
    pub mcis: String,
    #[serde(rename = "vmId")]
    pub vm: String,
}

/// How `values` is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Dragonfly's: one JSON object per bucket, keyed by column name (what Cloud-Barista tools decode).
    Dragonfly,
    /// InfluxDB 1.x's series: one array per bucket, in `columns` order.
    Series,
}

impl Format {
    fn parse(s: &str) -> Result<Format, String> {
        match s {
            "dragonfly" => Ok(Format::Dragonfly),
            "series" => Ok(Format::Series),
            other => Err(format!(
                "format {other:?} is not valid; use dragonfly (objects, the default) or series (arrays)"
            )),
        }
    }
}

/// A parsed, validated request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub vm: VmKey,
    pub metric: Metric,
    pub period: Period,
    pub criteria: Criteria,
    /// Nanoseconds.
    pub duration: i64,
    pub format: Format,
}

/// The query string. Other parameters are ignored, as Dragonfly did.
#[derive(Debug, Default, Deserialize)]
pub struct InfoParams {
    #[serde(rename = "periodType")]
    pub period_type: Option<String>,
    #[serde(rename = "statisticsCriteria")]
    pub statistics_criteria: Option<String>,
    pub duration: Option<String>,
    pub format: Option<String>,
}

fn bad_request(message: String) -> ApiError {
    ApiError {
        status: StatusCode::BAD_REQUEST,
        message,
    }
}

fn not_found(message: String) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message,
    }
}

fn internal(message: String) -> ApiError {
    ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        message,
    }
}

impl InfoRequest {
    /// Validates the path and the query: an unknown metric is a `404` (the resource does not exist), every other
    /// fault a `400` naming the parameter and what it may be.
    pub fn parse(
        ns: &str,
        mcis: &str,
        vm: &str,
        metric: &str,
        params: &InfoParams,
    ) -> Result<InfoRequest, ApiError> {
        let metric = Metric::parse(metric).ok_or_else(|| {
            not_found(format!(
                "unknown metric {metric:?}; valid metrics: {VALID_METRICS}"
            ))
        })?;
        for (parameter, value) in [("ns", ns), ("mcis", mcis), ("vm", vm)] {
            validate_id(parameter, value).map_err(bad_request)?;
        }
        let period = match &params.period_type {
            None => Period::Minute,
            Some(p) => Period::parse(p).map_err(bad_request)?,
        };
        let criteria = match &params.statistics_criteria {
            None => Criteria::Avg,
            Some(c) => Criteria::parse(c).map_err(bad_request)?,
        };
        let duration = match &params.duration {
            None => period.default_duration(),
            Some(d) => parse_duration(d).map_err(bad_request)?,
        };
        // Round up: a 90m duration at periodType=h touches 2 hour buckets (3 when it straddles both ends).
        let buckets = (duration + period.nanos() - 1) / period.nanos();
        if buckets > MAX_BUCKETS {
            return Err(bad_request(format!(
                "duration {} with periodType {} makes {buckets} buckets, more than the {MAX_BUCKETS} one answer may \
                 hold; use a longer periodType (h or d) or a shorter duration",
                params.duration.as_deref().unwrap_or_default(),
                period.letter(),
            )));
        }
        let format = match &params.format {
            None => Format::Dragonfly,
            Some(f) => Format::parse(f).map_err(bad_request)?,
        };
        Ok(InfoRequest {
            vm: VmKey {
                ns: ns.to_owned(),
                mcis: mcis.to_owned(),
                vm: vm.to_owned(),
            },
            metric,
            period,
            criteria,
            duration,
            format,
        })
    }
}

// --- Where each column comes from -------------------------------------------------------------------------------

/// A gauge column of a row.
#[derive(Debug, Clone, Copy)]
enum Gauge {
    /// A numeric column as it is.
    Col(&'static str),
    /// `usage_percent` (the agent's busy share: 100 − idle − iowait), or that computed from `usage_idle` and
    /// `usage_iowait` for rows without it (Telegraf's cpu input writes no `usage_percent`).
    CpuBusy,
}

/// A file-system space column, summed over the VM's distinct devices.
#[derive(Debug, Clone, Copy)]
enum Space {
    /// 100 × Σused / (Σused + Σfree): Telegraf's `used_percent` of the sums (space reserved for root excluded).
    UsedPercent,
    Total,
    Used,
    Free,
}

/// Devices or interfaces left out of a VM's sum, because their traffic is already counted on another.
#[derive(Debug, Clone, Copy)]
enum Skip {
    /// Partitions (`vda1`, `nvme0n1p1`) are counted in their disk; device-mapper, md and zram devices sit on top
    /// of other devices (or on memory).
    StackedBlockDevices,
    /// Loopback, ifb mirrors (traffic shaping copies another interface's packets), the virtual interfaces of
    /// containers, bridges and overlays, and tunnels: their traffic is a copy of, or also crosses, a real NIC.
    VirtualInterfaces,
}

impl Skip {
    /// The regular expression of names to leave out.
    fn pattern(self) -> &'static str {
        match self {
            Skip::StackedBlockDevices => {
                "^((sd|vd|xvd|hd)[a-z]+[0-9]+|(nvme[0-9]+n[0-9]+|mmcblk[0-9]+)p[0-9]+|dm-[0-9]+|md[0-9]+|zram[0-9]+)$"
            }
            Skip::VirtualInterfaces => {
                "^(lo[0-9]*|ifb.*|veth.*|docker.*|br-.*|virbr.*|cni.*|flannel.*|cali.*|vxlan.*|kube-.*|tun.*|tap.*|wg.*)$"
            }
        }
    }
}

/// One source of columns: a table and how its rows become one row per timestamp.
#[derive(Debug, Clone, Copy)]
enum Part {
    /// Gauges. `only` keeps the rows with that tag value (when the table has the tag); `mean` averages the rows
    /// that share a timestamp (one per core).
    Gauges {
        table: &'static str,
        only: Option<(&'static str, &'static str)>,
        mean: bool,
        columns: &'static [(&'static str, Gauge)],
    },
    /// File-system space of the `disk` table, summed over distinct devices (a file system mounted at two paths is
    /// counted once).
    DiskSpace {
        columns: &'static [(&'static str, Space)],
    },
    /// Cumulative counters per device (tag `key`): the per-second rate between consecutive samples of one device
    /// (a decrease, i.e. a counter reset, gives no rate), divided by `divisor`, summed over the devices `skip` keeps.
    Rates {
        table: &'static str,
        key: &'static str,
        skip: Skip,
        /// (output column, counter column, divisor)
        columns: &'static [(&'static str, &'static str, f64)],
    },
}

/// `cpu`: the `cpu-total` row, Dragonfly's column order.
const CPU: Part = Part::Gauges {
    table: "cpu",
    only: Some(("cpu", "cpu-total")),
    mean: false,
    columns: &[
        ("cpu_utilization", Gauge::CpuBusy),
        ("cpu_system", Gauge::Col("usage_system")),
        ("cpu_idle", Gauge::Col("usage_idle")),
        ("cpu_iowait", Gauge::Col("usage_iowait")),
        ("cpu_hintr", Gauge::Col("usage_irq")),
        ("cpu_sintr", Gauge::Col("usage_softirq")),
        ("cpu_user", Gauge::Col("usage_user")),
        ("cpu_nice", Gauge::Col("usage_nice")),
        ("cpu_steal", Gauge::Col("usage_steal")),
        ("cpu_guest", Gauge::Col("usage_guest")),
        ("cpu_guest_nice", Gauge::Col("usage_guest_nice")),
    ],
};

/// `cpufreq`: the mean over cores of each sample, MHz.
const CPUFREQ: Part = Part::Gauges {
    table: "cpufreq",
    only: None,
    mean: true,
    columns: &[("cpu_speed", Gauge::Col("cur_freq_mhz"))],
};

/// `memory`: the `mem` table, bytes and percent.
const MEMORY: Part = Part::Gauges {
    table: "mem",
    only: None,
    mean: false,
    columns: &[
        ("mem_utilization", Gauge::Col("used_percent")),
        ("mem_total", Gauge::Col("total")),
        ("mem_used", Gauge::Col("used")),
        ("mem_free", Gauge::Col("free")),
        ("mem_shared", Gauge::Col("shared")),
        ("mem_buffers", Gauge::Col("buffered")),
        ("mem_cached", Gauge::Col("cached")),
    ],
};

const DISK_SPACE: Part = Part::DiskSpace {
    columns: &[
        ("disk_utilization", Space::UsedPercent),
        ("disk_total", Space::Total),
        ("disk_used", Space::Used),
        ("disk_free", Space::Free),
    ],
};

/// `diskio`: KiB/s and operations/s over whole disks.
const DISKIO: Part = Part::Rates {
    table: "diskio",
    key: "name",
    skip: Skip::StackedBlockDevices,
    columns: &[
        ("kb_read", "read_bytes", 1024.0),
        ("kb_written", "write_bytes", 1024.0),
        ("ops_read", "reads", 1.0),
        ("ops_write", "writes", 1.0),
    ],
};

/// `network`: bytes/s and packets/s over real interfaces.
const NETWORK: Part = Part::Rates {
    table: "net",
    key: "interface",
    skip: Skip::VirtualInterfaces,
    columns: &[
        ("bytes_in", "bytes_recv", 1.0),
        ("bytes_out", "bytes_sent", 1.0),
        ("pkts_in", "packets_recv", 1.0),
        ("pkts_out", "packets_sent", 1.0),
    ],
};

/// The identity tags a table must have to hold any VM's rows.
const IDENTITY: [&str; 3] = ["ns_id", "mcis_id", "vm_id"];

/// `"name"` with embedded double quotes doubled: a SQL identifier.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `'value'` with embedded single quotes doubled: a SQL string literal. Ids are validated before they get here;
/// quoting them anyway means a future change to the charset cannot open an injection.
fn literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// A `time` literal for nanoseconds since the epoch, exact to the nanosecond. `to_timestamp_nanos` of a constant
/// is folded into a timestamp literal before planning, so the store's file pruning sees the bound.
fn time_literal(ns: i64) -> String {
    format!("to_timestamp_nanos({ns})")
}

/// A numeric column as DOUBLE, or a typed NULL when the table does not have it as a number (another producer,
/// another OS): a missing field is unknown, not an error.
fn num(schema: &TableSchema, column: &str) -> String {
    match schema.get(column) {
        Some(ColumnKind::Field(FieldType::F64 | FieldType::I64 | FieldType::U64)) => {
            format!("CAST({} AS DOUBLE)", ident(column))
        }
        _ => "CAST(NULL AS DOUBLE)".to_owned(),
    }
}

fn has_tag(schema: &TableSchema, tag: &str) -> bool {
    schema.get(tag) == Some(ColumnKind::Tag)
}

/// Where the rows of one request lie.
#[derive(Debug, Clone)]
struct Window {
    vm: VmKey,
    /// Exclusive lower bound, nanoseconds.
    from: i64,
    /// Inclusive upper bound, nanoseconds.
    to: i64,
}

impl Window {
    /// `ns_id = .. AND mcis_id = .. AND vm_id = .. AND time > from AND time <= to`.
    fn filter(&self, from: i64) -> String {
        format!(
            "ns_id = {} AND mcis_id = {} AND vm_id = {} AND time > {} AND time <= {}",
            literal(&self.vm.ns),
            literal(&self.vm.mcis),
            literal(&self.vm.vm),
            time_literal(from),
            time_literal(self.to),
        )
    }
}

impl Gauge {
    fn sql(self, schema: &TableSchema) -> String {
        match self {
            Gauge::Col(column) => num(schema, column),
            Gauge::CpuBusy => format!(
                "coalesce({}, 100.0 - {} - coalesce({}, 0.0))",
                num(schema, "usage_percent"),
                num(schema, "usage_idle"),
                num(schema, "usage_iowait")
            ),
        }
    }
}

impl Part {
    fn table(&self) -> &'static str {
        match self {
            Part::Gauges { table, .. } | Part::Rates { table, .. } => table,
            Part::DiskSpace { .. } => "disk",
        }
    }

    /// The output columns, in order.
    fn columns(&self) -> Vec<&'static str> {
        match self {
            Part::Gauges { columns, .. } => columns.iter().map(|(name, _)| *name).collect(),
            Part::DiskSpace { columns } => columns.iter().map(|(name, _)| *name).collect(),
            Part::Rates { columns, .. } => columns.iter().map(|(name, ..)| *name).collect(),
        }
    }

    /// SQL giving one row per timestamp: `time` and the output columns (named as in [`Part::columns`]).
    fn series_sql(&self, schema: &TableSchema, window: &Window) -> String {
        let table = ident(self.table());
        match self {
            Part::Gauges {
                only,
                mean,
                columns,
                ..
            } => {
                let select: Vec<String> = columns
                    .iter()
                    .map(|(name, gauge)| {
                        let value = gauge.sql(schema);
                        let value = if *mean {
                            format!("avg({value})")
                        } else {
                            value
                        };
                        format!("{value} AS {}", ident(name))
                    })
                    .collect();
                let mut sql = format!(
                    "SELECT time, {} FROM {table} WHERE {}",
                    select.join(", "),
                    window.filter(window.from)
                );
                if let Some((tag, value)) = only
                    && has_tag(schema, tag)
                {
                    sql.push_str(&format!(" AND {} = {}", ident(tag), literal(value)));
                }
                if *mean {
                    sql.push_str(" GROUP BY time");
                }
                sql
            }
            Part::DiskSpace { columns } => {
                // A file system mounted at several paths (bind mounts) has one row per path: keep one per device.
                let key = ["device", "path"]
                    .into_iter()
                    .find(|tag| has_tag(schema, tag));
                let (per_device, group) = match key {
                    Some(tag) => (
                        format!(
                            "max({}) AS total, max({}) AS used, max({}) AS free",
                            num(schema, "total"),
                            num(schema, "used"),
                            num(schema, "free")
                        ),
                        format!(" GROUP BY time, {}", ident(tag)),
                    ),
                    None => (
                        format!(
                            "{} AS total, {} AS used, {} AS free",
                            num(schema, "total"),
                            num(schema, "used"),
                            num(schema, "free")
                        ),
                        String::new(),
                    ),
                };
                let select: Vec<String> = columns
                    .iter()
                    .map(|(name, space)| {
                        let value = match space {
                            Space::UsedPercent => {
                                "100.0 * sum(used) / nullif(sum(used) + sum(free), 0.0)"
                            }
                            Space::Total => "sum(total)",
                            Space::Used => "sum(used)",
                            Space::Free => "sum(free)",
                        };
                        format!("{value} AS {}", ident(name))
                    })
                    .collect();
                format!(
                    "SELECT time, {} FROM (SELECT time, {per_device} FROM {table} WHERE {}{group}) GROUP BY time",
                    select.join(", "),
                    window.filter(window.from)
                )
            }
            Part::Rates {
                key, skip, columns, ..
            } => {
                let has_key = has_tag(schema, key);
                let over = if has_key {
                    format!("OVER (PARTITION BY {} ORDER BY time)", ident(key))
                } else {
                    "OVER (ORDER BY time)".to_owned()
                };
                let skip_filter = if has_key {
                    format!(
                        " AND NOT regexp_like(coalesce({}, ''), {})",
                        ident(key),
                        literal(skip.pattern())
                    )
                } else {
                    String::new()
                };
                let mut deltas = Vec::with_capacity(columns.len());
                let mut rates = Vec::with_capacity(columns.len());
                let mut sums = Vec::with_capacity(columns.len());
                for (i, (name, counter, divisor)) in columns.iter().enumerate() {
                    let value = num(schema, counter);
                    deltas.push(format!("{value} - lag({value}) {over} AS d{i}"));
                    // A counter that went down was reset (reboot, wrap): no rate for that step, like InfluxDB's
                    // non_negative_derivative.
                    rates.push(format!(
                        "CASE WHEN d{i} >= 0 AND dt > 0 THEN d{i} / dt / {divisor:?} END AS r{i}"
                    ));
                    sums.push(format!("sum(r{i}) AS {}", ident(name)));
                }
                // The scan starts RATE_LOOKBACK_NS early so the first sample in the window has a predecessor; the
                // outer filter then keeps only the window's samples.
                format!(
                    "SELECT time, {sums} FROM (\
                       SELECT time, {rates} FROM (\
                         SELECT time, {deltas}, \
                           CAST(CAST(time AS BIGINT) - lag(CAST(time AS BIGINT)) {over} AS DOUBLE) / 1e9 AS dt \
                         FROM {table} WHERE {filter}{skip_filter}\
                       ) WHERE time > {from}\
                     ) GROUP BY time",
                    sums = sums.join(", "),
                    rates = rates.join(", "),
                    deltas = deltas.join(", "),
                    filter = window.filter(window.from.saturating_sub(RATE_LOOKBACK_NS)),
                    from = time_literal(window.from),
                )
            }
        }
    }
}

/// SQL for one part: its series, bucketed and aggregated. Columns `bucket` and the part's output columns.
fn bucket_sql(part: &Part, schema: &TableSchema, window: &Window, request: &InfoRequest) -> String {
    let aggregates: Vec<String> = part
        .columns()
        .into_iter()
        .map(|name| format!("{} AS {}", request.criteria.sql(&ident(name)), ident(name)))
        .collect();
    format!(
        "SELECT bucket, {} FROM (SELECT date_bin({}, time) AS bucket, * FROM ({})) GROUP BY bucket",
        aggregates.join(", "),
        request.period.sql_interval(),
        part.series_sql(schema, window)
    )
}

/// The whole query, or `None` when none of the metric's tables holds rows of any VM (absent, or without the
/// identity tags). Parts whose table is missing are left out; their columns come back null.
fn request_sql(store: &Store, request: &InfoRequest, window: &Window) -> Option<String> {
    let mut buckets = Vec::new();
    for part in request.metric.parts() {
        let Some(schema) = store.with_state(|s| s.catalog.table(part.table()).cloned()) else {
            continue;
        };
        if !IDENTITY.iter().all(|tag| has_tag(&schema, tag)) {
            continue;
        }
        buckets.push((part, bucket_sql(part, &schema, window, request)));
    }
    match buckets.as_slice() {
        [] => None,
        [(_, only)] => Some(format!("{only} ORDER BY bucket")),
        [_, ..] => {
            // Several parts (disk: space and I/O) are joined on the bucket; a bucket only one of them has keeps
            // the other's columns null.
            let ctes: Vec<String> = buckets
                .iter()
                .enumerate()
                .map(|(i, (_, sql))| format!("b{i} AS ({sql})"))
                .collect();
            let bucket_expr: Vec<String> =
                (0..buckets.len()).map(|i| format!("b{i}.bucket")).collect();
            let mut select = vec![format!("coalesce({}) AS bucket", bucket_expr.join(", "))];
            let mut from = "b0".to_owned();
            for (i, (part, _)) in buckets.iter().enumerate() {
                select.extend(
                    part.columns()
                        .into_iter()
                        .map(|name| format!("b{i}.{}", ident(name))),
                );
                if i > 0 {
                    from.push_str(&format!(" FULL OUTER JOIN b{i} ON b0.bucket = b{i}.bucket"));
                }
            }
            Some(format!(
                "WITH {} SELECT {} FROM {from} ORDER BY bucket",
                ctes.join(", "),
                select.join(", ")
            ))
        }
    }
}

/// One metric of one VM over one window: Dragonfly's series.
#[derive(Debug, Clone, PartialEq)]
pub struct MonitoringSeries {
    pub name: &'static str,
    pub vm: VmKey,
    /// Value columns, in order (`time` comes before them in the response).
    pub columns: Vec<&'static str>,
    pub rows: Vec<BucketRow>,
}

/// One bucket: its start (nanoseconds since the epoch) and one value per column, in `columns` order (`None`: no
/// value, e.g. a field the VM's agent does not report).
pub type BucketRow = (i64, Vec<Option<f64>>);

/// Answers a request as of `now` (nanoseconds since the epoch). `Err` is a `404` when the VM has no rows of this
/// metric in the window, else a query failure.
pub async fn monitoring_series(
    store: &Store,
    engine: &QueryEngine,
    request: &InfoRequest,
    now: i64,
) -> Result<MonitoringSeries, ApiError> {
    let window = Window {
        vm: request.vm.clone(),
        from: now.saturating_sub(request.duration),
        to: now.saturating_add(FUTURE_SLACK_NS),
    };
    let columns = request.metric.columns();
    let no_data = || {
        not_found(format!(
            "no {} data for VM (ns {:?}, mcis {:?}, vm {:?}) in the last {}; a VM is identified by all three ids",
            request.metric.name(),
            request.vm.ns,
            request.vm.mcis,
            request.vm.vm,
            describe_duration(request.duration),
        ))
    };
    let Some(sql) = request_sql(store, request, &window) else {
        return Err(no_data());
    };
    tracing::debug!(metric = request.metric.name(), %sql, "dragonfly monitoring query");
    let result = engine.sql(&sql).await.map_err(|e| {
        tracing::warn!(metric = request.metric.name(), error = %e, "dragonfly monitoring query failed");
        ApiError::from(e)
    })?;
    let rows = read_rows(&result, &columns)?;
    if rows.is_empty() {
        return Err(no_data());
    }
    Ok(MonitoringSeries {
        name: request.metric.name(),
        vm: request.vm.clone(),
        columns,
        rows,
    })
}

/// The result's rows: `bucket` and each of `columns` by name (a column the query did not produce is null).
fn read_rows(result: &QueryResult, columns: &[&'static str]) -> Result<Vec<BucketRow>, ApiError> {
    let mut rows = Vec::with_capacity(result.num_rows());
    for batch in &result.batches {
        let bucket = batch
            .column_by_name("bucket")
            .and_then(|c| c.as_primitive_opt::<TimestampNanosecondType>())
            .ok_or_else(|| {
                internal(format!(
                    "the monitoring query returned no nanosecond `bucket` column: {}",
                    batch.schema()
                ))
            })?;
        let mut values = Vec::with_capacity(columns.len());
        for name in columns {
            let array = match batch.column_by_name(name) {
                Some(array) => Some(arrow::compute::cast(array, &DataType::Float64).map_err(
                    |e| internal(format!("column {name} of the monitoring query: {e}")),
                )?),
                None => None,
            };
            values.push(array);
        }
        for row in 0..batch.num_rows() {
            if bucket.is_null(row) {
                continue;
            }
            let row_values = values
                .iter()
                .map(|array| {
                    let array = array.as_ref()?.as_primitive::<Float64Type>();
                    // NaN or infinity cannot be JSON numbers; like a missing value they are unknown.
                    (array.is_valid(row) && array.value(row).is_finite()).then(|| array.value(row))
                })
                .collect();
            rows.push((bucket.value(row), row_values));
        }
    }
    Ok(rows)
}

/// `90m` → "90m", `2h` → "2h": the duration as a request would write it.
fn describe_duration(ns: i64) -> String {
    if ns % DAY_NS == 0 {
        format!("{}d", ns / DAY_NS)
    } else if ns % HOUR_NS == 0 {
        format!("{}h", ns / HOUR_NS)
    } else {
        format!("{}m", ns / MINUTE_NS)
    }
}

/// RFC 3339 in UTC, whole seconds (bucket starts are whole minutes): InfluxDB's and so Dragonfly's time format.
fn rfc3339(ns: i64) -> String {
    chrono::DateTime::from_timestamp_nanos(ns).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// The JSON body: `{"name", "tags", "columns", "values"}` with `values` as objects or arrays.
struct Body<'a> {
    series: &'a MonitoringSeries,
    format: Format,
}

impl Serialize for Body<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut columns = Vec::with_capacity(self.series.columns.len() + 1);
        columns.push("time");
        columns.extend_from_slice(&self.series.columns);
        let mut map = serializer.serialize_map(Some(4))?;
        map.serialize_entry("name", self.series.name)?;
        map.serialize_entry("tags", &self.series.vm)?;
        map.serialize_entry("columns", &columns)?;
        map.serialize_entry("values", &Values(self))?;
        map.end()
    }
}

struct Values<'a>(&'a Body<'a>);

impl Serialize for Values<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let series = self.0.series;
        let mut seq = serializer.serialize_seq(Some(series.rows.len()))?;
        for (time, values) in &series.rows {
            let row = Row {
                columns: &series.columns,
                time: rfc3339(*time),
                values,
            };
            match self.0.format {
                Format::Dragonfly => seq.serialize_element(&RowObject(&row))?,
                Format::Series => seq.serialize_element(&RowArray(&row))?,
            }
        }
        seq.end()
    }
}

struct Row<'a> {
    columns: &'a [&'static str],
    time: String,
    values: &'a [Option<f64>],
}

/// `{"time": .., "<column>": .., ...}`, keys in column order. Labels and values are zipped from one list, so they
/// cannot drift apart.
struct RowObject<'a>(&'a Row<'a>);

impl Serialize for RowObject<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let row = self.0;
        let mut map = serializer.serialize_map(Some(row.columns.len() + 1))?;
        map.serialize_entry("time", &row.time)?;
        for (name, value) in row.columns.iter().zip(row.values) {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}

/// `[time, v1, v2, ...]` in `columns` order.
struct RowArray<'a>(&'a Row<'a>);

impl Serialize for RowArray<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let row = self.0;
        let mut seq = serializer.serialize_seq(Some(row.values.len() + 1))?;
        seq.serialize_element(&row.time)?;
        for value in row.values {
            seq.serialize_element(value)?;
        }
        seq.end()
    }
}

/// Renders a series as the API's JSON value (for callers that embed it).
pub fn to_json(series: &MonitoringSeries, format: Format) -> serde_json::Value {
    serde_json::to_value(Body { series, format }).unwrap_or_else(|e| {
        // Serialising strings and finite floats cannot fail; keep a visible trace if it ever does.
        serde_json::json!({ "error": format!("cannot encode the series: {e}") })
    })
}

/// `GET /dragonfly/ns/{ns}/mcis/{mcis}/vm/{vm}/metric/{metric}/info`.
async fn vm_metric_info(
    State(api): State<Arc<ApiState>>,
    path: Result<Path<(String, String, String, String)>, PathRejection>,
    params: Result<Query<InfoParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Path((ns, mcis, vm, metric)) =
        path.map_err(|e| bad_request(format!("bad path: {}", e.body_text())))?;
    let Query(params) =
        params.map_err(|e| bad_request(format!("bad query string: {}", e.body_text())))?;
    let request = InfoRequest::parse(&ns, &mcis, &vm, &metric, &params)?;
    let series = monitoring_series(&api.store, &api.engine, &request, now_nanos()).await?;
    Ok(axum::Json(Body {
        series: &series,
        format: request.format,
    })
    .into_response())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::config::{CollectorConfig, WalSync};
    use crate::query::QueryLimits;
    use crate::store::WriteOutcome;
    use damselfly_proto::v1::{Field, Point, Tag, WriteBatch, field::Value};
    use std::time::Duration;

    #[test]
    fn durations_parse_strictly_and_are_bounded() {
        assert_eq!(parse_duration("10m"), Ok(10 * MINUTE_NS));
        assert_eq!(parse_duration("1h"), Ok(HOUR_NS));
        assert_eq!(parse_duration("7d"), Ok(7 * DAY_NS));
        assert_eq!(parse_duration("366d"), Ok(366 * DAY_NS));
        assert_eq!(parse_duration("8784h"), Ok(366 * DAY_NS));
        for bad in [
            "",
            "m",
            "0m",
            "05m",
            "-5m",
            "+5m",
            " 5m",
            "5m ",
            "5",
            "5s",
            "5w",
            "5M",
            "1.5h",
            "367d",
            "8785h",
            "99999999999999999999d",
            "5mm",
            "٣m",
        ] {
            let e = parse_duration(bad).unwrap_err();
            assert!(
                e.starts_with("duration ") && e.contains("10m, 1h, 7d"),
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn parameters_and_ids() {
        assert_eq!(Period::parse("h"), Ok(Period::Hour));
        assert!(
            Period::parse("w")
                .unwrap_err()
                .contains("use m (1-minute buckets), h")
        );
        assert_eq!(Criteria::parse("last"), Ok(Criteria::Last));
        assert!(
            Criteria::parse("mean")
                .unwrap_err()
                .contains("min, max, avg or last")
        );
        assert_eq!(Metric::parse("mem"), Some(Metric::Memory));
        assert_eq!(Metric::parse("net"), Some(Metric::Network));
        assert_eq!(Metric::parse("swap"), None);
        assert!(validate_id("vm", "vm-1.host_A").is_ok());
        for bad in ["", "a b", "x'--", "a\"b", "ns;DROP", "é", &"x".repeat(257)] {
            assert!(
                validate_id("vm", bad).unwrap_err().starts_with("vm "),
                "{bad:?}"
            );
        }
        assert_eq!(literal("it's"), "'it''s'");
        assert_eq!(ident("a\"b"), "\"a\"\"b\"");

        let params = |p: &str, c: &str, d: &str| InfoParams {
            period_type: Some(p.into()),
            statistics_criteria: Some(c.into()),
            duration: Some(d.into()),
            format: None,
        };
        let ok = InfoRequest::parse("ns", "m", "v", "cpu", &params("m", "max", "7d")).unwrap();
        assert_eq!(
            (ok.period, ok.criteria, ok.duration),
            (Period::Minute, Criteria::Max, 7 * DAY_NS)
        );
        let e = InfoRequest::parse("ns", "m", "v", "cpu", &params("m", "max", "8d")).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.message.contains("11520 buckets"), "{}", e.message);
        let e = InfoRequest::parse("ns", "m", "v", "gpu", &params("m", "max", "1h")).unwrap_err();
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        assert!(e.message.contains(VALID_METRICS), "{}", e.message);
        let defaults = InfoRequest::parse("ns", "m", "v", "net", &InfoParams::default()).unwrap();
        assert_eq!(
            (
                defaults.period,
                defaults.criteria,
                defaults.duration,
                defaults.format
            ),
            (Period::Minute, Criteria::Avg, HOUR_NS, Format::Dragonfly)
        );
    }

    #[test]
    fn every_metric_has_distinct_columns() {
        for metric in Metric::ALL {
            let columns = metric.columns();
            let mut unique = columns.clone();
            unique.sort_unstable();
            unique.dedup();
            assert_eq!(unique.len(), columns.len(), "{metric:?}: {columns:?}");
            assert!(
                !columns.contains(&"time") && !columns.contains(&"bucket"),
                "{metric:?}"
            );
            assert_eq!(Metric::parse(metric.name()), Some(metric));
        }
        assert_eq!(Metric::Disk.columns()[4..], Metric::DiskIo.columns()[..]);
    }

    /// A minute boundary (2023-11-14T22:13:00Z).
    const T0: i64 = 1_699_999_980 * SECOND_NS;

    fn point(
        measurement: &str,
        ns: &str,
        tags: &[(&str, &str)],
        fields: &[(&str, Value)],
        t: i64,
    ) -> Point {
        let mut all = vec![("ns_id", ns), ("mcis_id", "mcis-1"), ("vm_id", "vm-1")];
        all.extend_from_slice(tags);
        Point {
            measurement: measurement.into(),
            tags: all
                .iter()
                .map(|(k, v)| Tag {
                    key: (*k).into(),
                    value: (*v).into(),
                })
                .collect(),
            fields: fields
                .iter()
                .map(|(k, v)| Field {
                    key: (*k).into(),
                    value: Some(v.clone()),
                })
                .collect(),
            time_unix_nano: t,
        }
    }

    async fn setup(dir: &std::path::Path, points: Vec<Point>) -> (Store, QueryEngine) {
        let store = Store::open(&CollectorConfig {
            data_dir: dir.to_path_buf(),
            wal_sync: WalSync::None,
            ..CollectorConfig::default()
        })
        .unwrap();
        let outcome = store
            .write(WriteBatch {
                agent_id: "t".into(),
                seq: 1,
                points,
                ..WriteBatch::default()
            })
            .await;
        assert!(
            matches!(outcome, WriteOutcome::Stored { .. }),
            "{outcome:?}"
        );
        let engine = QueryEngine::new(
            store.clone(),
            QueryLimits {
                timeout: Duration::from_secs(30),
                memory_bytes: 256 << 20,
                max_result_rows: 100_000,
            },
        )
        .unwrap();
        (store, engine)
    }

    fn request(ns: &str, metric: Metric, criteria: Criteria) -> InfoRequest {
        InfoRequest {
            vm: VmKey {
                ns: ns.into(),
                mcis: "mcis-1".into(),
                vm: "vm-1".into(),
            },
            metric,
            period: Period::Minute,
            criteria,
            duration: 10 * MINUTE_NS,
            format: Format::Dragonfly,
        }
    }

    #[tokio::test]
    async fn cpu_buckets_per_vm_with_each_criteria() {
        let dir = tempfile::tempdir().unwrap();
        let mut points = Vec::new();
        // ns-a: minute 0 has busy 10, 30, 20 (at +0 s, +20 s, +40 s); minute 1 has 50. ns-b: same vm_id, 90.
        for (t, busy) in [(0, 10.0), (20, 30.0), (40, 20.0), (60, 50.0)] {
            let fields = [
                ("usage_percent", Value::F64(busy)),
                ("usage_system", Value::F64(busy / 2.0)),
            ];
            points.push(point(
                "cpu",
                "ns-a",
                &[("cpu", "cpu-total")],
                &fields,
                T0 + t * SECOND_NS,
            ));
            // A core's row must not be mixed in.
            let core = [
                ("usage_percent", Value::F64(99.0)),
                ("usage_system", Value::F64(99.0)),
            ];
            points.push(point(
                "cpu",
                "ns-a",
                &[("cpu", "cpu0")],
                &core,
                T0 + t * SECOND_NS,
            ));
            let other = [
                ("usage_percent", Value::F64(90.0)),
                ("usage_system", Value::F64(45.0)),
            ];
            points.push(point(
                "cpu",
                "ns-b",
                &[("cpu", "cpu-total")],
                &other,
                T0 + t * SECOND_NS,
            ));
        }
        let (store, engine) = setup(dir.path(), points).await;
        let now = T0 + 3 * MINUTE_NS;
        let expect = [
            (Criteria::Min, 10.0, 50.0),
            (Criteria::Max, 30.0, 50.0),
            (Criteria::Avg, 20.0, 50.0),
            (Criteria::Last, 20.0, 50.0),
        ];
        for (criteria, first, second) in expect {
            let s = monitoring_series(
                &store,
                &engine,
                &request("ns-a", Metric::Cpu, criteria),
                now,
            )
            .await
            .unwrap();
            assert_eq!(s.columns[..2], ["cpu_utilization", "cpu_system"]);
            assert_eq!(s.rows.len(), 2, "{criteria:?}: {s:?}");
            assert_eq!(s.rows[0].0, T0);
            assert_eq!(s.rows[1].0, T0 + MINUTE_NS);
            assert_eq!(s.rows[0].1[0], Some(first), "{criteria:?}");
            assert_eq!(s.rows[0].1[1], Some(first / 2.0), "{criteria:?}");
            assert_eq!(s.rows[1].1[0], Some(second), "{criteria:?}");
            // Columns the table lacks are null, not zero.
            assert_eq!(s.rows[0].1[2], None);
        }
        let b = monitoring_series(
            &store,
            &engine,
            &request("ns-b", Metric::Cpu, Criteria::Max),
            now,
        )
        .await
        .unwrap();
        assert_eq!(
            b.rows.iter().map(|r| r.1[0]).collect::<Vec<_>>(),
            [Some(90.0); 2]
        );
        let json = to_json(&b, Format::Series);
        assert_eq!(json["tags"]["nsId"], "ns-b");
        assert_eq!(json["columns"][0], "time");
        assert_eq!(json["values"][0][0], "2023-11-14T22:13:00Z");
        assert_eq!(json["values"][0][1], 90.0);

        // Outside the window, or an unknown VM: 404.
        let e = monitoring_series(
            &store,
            &engine,
            &request("ns-c", Metric::Cpu, Criteria::Avg),
            now,
        )
        .await
        .unwrap_err();
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        let late = now + HOUR_NS;
        let e = monitoring_series(
            &store,
            &engine,
            &request("ns-a", Metric::Cpu, Criteria::Avg),
            late,
        )
        .await
        .unwrap_err();
        assert!(e.message.contains("in the last 10m"), "{}", e.message);
        // A metric whose table does not exist yet: 404 as well.
        let e = monitoring_series(
            &store,
            &engine,
            &request("ns-a", Metric::Memory, Criteria::Avg),
            now,
        )
        .await
        .unwrap_err();
        assert_eq!(e.status, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn counters_become_rates_over_whole_disks_and_real_interfaces() {
        let dir = tempfile::tempdir().unwrap();
        let mut points = Vec::new();
        for step in 0..7i64 {
            let t = T0 + step * 10 * SECOND_NS;
            // eth0: 1000 bytes per 10 s = 100 B/s, then a reset at step 5 (no rate there).
            let recv = if step < 5 {
                5_000 + step * 1_000
            } else {
                step * 10
            };
            let net = [
                ("bytes_recv", Value::U64(recv as u64)),
                ("bytes_sent", Value::U64((step * 2_000) as u64)),
            ];
            points.push(point("net", "ns-a", &[("interface", "eth0")], &net, t));
            // Copies of eth0's traffic: loopback, an ifb mirror, a container's veth.
            for copy in ["lo", "ifb0", "veth1a2b"] {
                points.push(point("net", "ns-a", &[("interface", copy)], &net, t));
            }
            // vda: 10 KiB per 10 s = 1 KiB/s; its partition vda1 repeats the same I/O; vdb adds 2 KiB/s.
            let io = |kib: i64| {
                [
                    ("read_bytes", Value::U64((kib * 1024 * step) as u64)),
                    ("reads", Value::U64((step * 5) as u64)),
                ]
            };
            points.push(point("diskio", "ns-a", &[("name", "vda")], &io(10), t));
            points.push(point("diskio", "ns-a", &[("name", "vda1")], &io(10), t));
            points.push(point("diskio", "ns-a", &[("name", "vdb")], &io(20), t));
            // Disk space: / and a bind mount of the same device, plus /data.
            let space = |total: u64, used: u64| {
                [
                    ("total", Value::U64(total)),
                    ("used", Value::U64(used)),
                    ("free", Value::U64(total - used)),
                ]
            };
            points.push(point(
                "disk",
                "ns-a",
                &[("path", "/"), ("device", "vda1")],
                &space(1000, 250),
                t,
            ));
            points.push(point(
                "disk",
                "ns-a",
                &[("path", "/mnt/bind"), ("device", "vda1")],
                &space(1000, 250),
                t,
            ));
            points.push(point(
                "disk",
                "ns-a",
                &[("path", "/data"), ("device", "vdb")],
                &space(3000, 750),
                t,
            ));
        }
        let (store, engine) = setup(dir.path(), points).await;
        let now = T0 + 2 * MINUTE_NS;

        let net = monitoring_series(
            &store,
            &engine,
            &request("ns-a", Metric::Network, Criteria::Max),
            now,
        )
        .await
        .unwrap();
        assert_eq!(
            net.columns,
            ["bytes_in", "bytes_out", "pkts_in", "pkts_out"]
        );
        assert_eq!(net.rows.len(), 2, "{net:?}");
        // Minute 0 (steps 1..5 have rates: 100 B/s in, 200 B/s out; step 5 is a reset); minute 1 (step 6: 1 B/s).
        assert_eq!(net.rows[0].1, [Some(100.0), Some(200.0), None, None]);
        assert_eq!(net.rows[1].1, [Some(1.0), Some(200.0), None, None]);

        let disk = monitoring_series(
            &store,
            &engine,
            &request("ns-a", Metric::Disk, Criteria::Avg),
            now,
        )
        .await
        .unwrap();
        assert_eq!(
            disk.columns,
            [
                "disk_utilization",
                "disk_total",
                "disk_used",
                "disk_free",
                "kb_read",
                "kb_written",
                "ops_read",
                "ops_write"
            ]
        );
        assert_eq!(
            disk.rows[0].1,
            [
                Some(25.0),
                Some(4000.0),
                Some(1000.0),
                Some(3000.0),
                Some(3.0),
                None,
                Some(1.0),
                None
            ]
        );
        let diskio = monitoring_series(
            &store,
            &engine,
            &request("ns-a", Metric::DiskIo, Criteria::Last),
            now,
        )
        .await
        .unwrap();
        assert_eq!(diskio.rows[1].1, [Some(3.0), None, Some(1.0), None]);
    }
}
