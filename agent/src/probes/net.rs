//! `net`: traffic counters per interface (tag `interface`), as the kernel reports them: u64, monotonic until the
//! interface or host resets them; the agent never resets or differentiates them (SQL and rollups derive rates).
//! Fields: `bytes_sent`, `bytes_recv`, `packets_sent`, `packets_recv`, `err_in`, `err_out`, and on Linux `drop_in`,
//! `drop_out` from `/sys/class/net/<interface>/statistics`.

use damselfly_proto::v1::Point;
use sysinfo::Networks;

use super::{point, u64_field};

pub(super) fn collect(networks: &mut Networks, now: i64) -> Vec<Point> {
    // `true` forgets interfaces that disappeared.
    networks.refresh(true);
    let mut list: Vec<_> = networks.iter().collect();
    // Stable output order makes `--once` diffable.
    list.sort_by(|a, b| a.0.cmp(b.0));
    list.into_iter()
        .map(|(name, data)| {
            let name = name.to_string_lossy();
            #[allow(unused_mut)]
            let mut fields = vec![
                u64_field("bytes_sent", data.total_transmitted()),
                u64_field("bytes_recv", data.total_received()),
                u64_field("packets_sent", data.total_packets_transmitted()),
                u64_field("packets_recv", data.total_packets_received()),
                u64_field("err_in", data.total_errors_on_received()),
                u64_field("err_out", data.total_errors_on_transmitted()),
            ];
            #[cfg(target_os = "linux")]
            for (field, file) in [("drop_in", "rx_dropped"), ("drop_out", "tx_dropped")] {
                if let Some(v) = sysfs_counter(&name, file) {
                    fields.push(u64_field(field, v));
                }
            }
            point("net", &[("interface", &name)], fields, now)
        })
        .collect()
}

/// `/sys/class/net/<iface>/statistics/<file>`; `None` for a name that could escape the directory.
#[cfg(target_os = "linux")]
fn sysfs_counter(iface: &str, file: &str) -> Option<u64> {
    if iface.is_empty() || iface.contains('/') || iface == "." || iface == ".." {
        return None;
    }
    std::fs::read_to_string(format!("/sys/class/net/{iface}/statistics/{file}"))
        .ok()?
        .trim()
        .parse()
        .ok()
}
