//! `disk`: space per mounted file system. Tags `path`, `device` (without `/dev/`, like Telegraf), `fstype`;
//! fields `total`, `used`, `free` in bytes (u64) and `used_percent` (f64).
//!
//! `free` is the space available to unprivileged users and `used` = `total` - `free`, so blocks reserved for root
//! count as used (sysinfo does not expose them separately). Pseudo file systems with a size of 0 are skipped.

use damselfly_proto::v1::Point;
use sysinfo::{DiskRefreshKind, Disks};

use super::{f64_field, percent, point, u64_field};

pub(super) fn collect(disks: &mut Disks, now: i64) -> Vec<Point> {
    // Re-reads the mount table, so mounts that come and go are followed; no I/O counters needed here.
    disks.refresh_specifics(true, DiskRefreshKind::nothing().with_storage());
    disks
        .iter()
        .filter(|d| d.total_space() > 0)
        .map(|d| {
            let total = d.total_space();
            let free = d.available_space().min(total);
            let used = total - free;
            let path = d.mount_point().to_string_lossy();
            let name = d.name().to_string_lossy();
            let device = name.strip_prefix("/dev/").unwrap_or(&name);
            let fstype = d.file_system().to_string_lossy();
            point(
                "disk",
                &[("path", &path), ("device", device), ("fstype", &fstype)],
                vec![
                    u64_field("total", total),
                    u64_field("used", used),
                    u64_field("free", free),
                    f64_field("used_percent", percent(used as f64, total as f64)),
                ],
                now,
            )
        })
        .collect()
}
