//! `mem`: RAM totals in bytes (u64) and `used_percent` (f64); Telegraf's field names.
//!
//! `used` is sysinfo's (on Linux: total - available). `buffered` and `cached` come from `/proc/meminfo` on Linux.

use damselfly_proto::v1::Point;
use sysinfo::{MemoryRefreshKind, System};

use super::{f64_field, percent, point, u64_field};

pub(super) fn collect(sys: &mut System, now: i64) -> Vec<Point> {
    sys.refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
    let total = sys.total_memory();
    if total == 0 {
        tracing::debug!("memory size unknown; skipping mem");
        return Vec::new();
    }
    let used = sys.used_memory();
    let mut fields = vec![
        u64_field("total", total),
        u64_field("used", used),
        u64_field("free", sys.free_memory()),
        u64_field("available", sys.available_memory()),
        f64_field("used_percent", percent(used as f64, total as f64)),
    ];
    #[cfg(target_os = "linux")]
    if let Ok(text) = std::fs::read_to_string("/proc/meminfo") {
        for (field, key) in [("buffered", "Buffers:"), ("cached", "Cached:")] {
            if let Some(v) = meminfo_bytes(&text, key) {
                fields.push(u64_field(field, v));
            }
        }
    }
    vec![point("mem", &[], fields, now)]
}

/// A `/proc/meminfo` value (`Key:   123 kB`) in bytes.
#[cfg(target_os = "linux")]
fn meminfo_bytes(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    let mut parts = line[key.len()..].split_ascii_whitespace();
    let value: u64 = parts.next()?.parse().ok()?;
    Some(match parts.next() {
        Some("kB") => value.saturating_mul(1024),
        _ => value,
    })
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #[test]
    fn meminfo_parses_kb() {
        let text = "MemTotal: 100 kB\nBuffers:   2 kB\nCached:  3 kB\nSwapCached: 9 kB\n";
        assert_eq!(super::meminfo_bytes(text, "Buffers:"), Some(2048));
        // `Cached:` must not match `SwapCached:`.
        assert_eq!(super::meminfo_bytes(text, "Cached:"), Some(3072));
        assert_eq!(super::meminfo_bytes(text, "Nope:"), None);
    }
}
