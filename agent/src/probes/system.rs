//! `system`: load averages `load1`, `load5`, `load15` (f64), `uptime` in seconds and `n_cpus` (u64), like Telegraf.

use damselfly_proto::v1::Point;
use sysinfo::{CpuRefreshKind, System};

use super::{f64_field, point, u64_field};

pub(super) fn collect(sys: &mut System, now: i64) -> Vec<Point> {
    let mut fields = Vec::with_capacity(5);
    // Windows has no load average: leave the fields out rather than report zeros.
    match System::load_average() {
        Ok(l) => fields.extend([
            f64_field("load1", l.one),
            f64_field("load5", l.five),
            f64_field("load15", l.fifteen),
        ]),
        Err(e) => tracing::debug!(error = %e, "no load average"),
    }
    match System::uptime() {
        Ok(up) => fields.push(u64_field("uptime", up)),
        Err(e) => tracing::debug!(error = %e, "no uptime"),
    }
    if sys.cpus().is_empty() {
        sys.refresh_cpu_list(CpuRefreshKind::nothing());
    }
    let n_cpus = match sys.cpus().len() {
        0 => std::thread::available_parallelism().map_or(0, |n| n.get()),
        n => n,
    };
    if n_cpus > 0 {
        fields.push(u64_field("n_cpus", n_cpus as u64));
    }
    if fields.is_empty() {
        return Vec::new();
    }
    vec![point("system", &[], fields, now)]
}
