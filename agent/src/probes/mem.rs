//! `mem` and `swap`, Telegraf's field names.
//!
//! `mem`: `total`, `used`, `free`, `available`, `buffered`, `cached`, `shared`, `active`, `inactive`, `dirty`,
//! `slab`, `sreclaimable`, `swap_total`, `swap_free`, `swap_cached` in bytes (u64; the ones after `available` on
//! Linux only, from `/proc/meminfo`; `swap_total` and `swap_free` everywhere), `used_percent` and `available_percent`
//! (f64). `used` is `total - available` (what applications cannot get back), like sysinfo's.
//!
//! `swap`: `total`, `used`, `free` in bytes (u64), `used_percent` (f64), and on Linux the counters `in` and `out`:
//! bytes swapped in and out since boot (`pswpin`/`pswpout` pages of `/proc/vmstat` times the page size), as Telegraf
//! reports them.

#[cfg(target_os = "linux")]
pub(super) use linux::*;
#[cfg(not(target_os = "linux"))]
pub(super) use other::*;

#[cfg(target_os = "linux")]
mod linux {
    use damselfly_proto::v1::Point;

    use super::super::{f64_field, percent, point, u64_field};

    /// The `/proc/meminfo` values the probes use, in bytes (0 when absent).
    #[derive(Debug, Clone, Default, PartialEq, Eq)]
    pub(in super::super) struct Meminfo {
        pub(in super::super) total: u64,
        pub(super) free: u64,
        pub(super) available: Option<u64>,
        pub(super) buffers: u64,
        pub(super) cached: u64,
        pub(super) shmem: u64,
        pub(super) active: u64,
        pub(super) inactive: u64,
        pub(super) dirty: u64,
        pub(super) slab: u64,
        pub(super) sreclaimable: u64,
        pub(super) swap_total: u64,
        pub(super) swap_free: u64,
        pub(super) swap_cached: u64,
    }

    impl Meminfo {
        /// Parses `Key:   123 kB` lines; unknown keys and malformed lines are skipped.
        pub(in super::super) fn parse(text: &str) -> Self {
            let mut m = Self::default();
            for line in text.lines() {
                let Some((key, rest)) = line.split_once(':') else {
                    continue;
                };
                let mut parts = rest.split_ascii_whitespace();
                let Some(Ok(value)) = parts.next().map(str::parse::<u64>) else {
                    continue;
                };
                let bytes = match parts.next() {
                    Some("kB") => value.saturating_mul(1024),
                    _ => value,
                };
                let slot = match key.trim() {
                    "MemTotal" => &mut m.total,
                    "MemFree" => &mut m.free,
                    "MemAvailable" => {
                        m.available = Some(bytes);
                        continue;
                    }
                    "Buffers" => &mut m.buffers,
                    "Cached" => &mut m.cached,
                    "Shmem" => &mut m.shmem,
                    "Active" => &mut m.active,
                    "Inactive" => &mut m.inactive,
                    "Dirty" => &mut m.dirty,
                    "Slab" => &mut m.slab,
                    "SReclaimable" => &mut m.sreclaimable,
                    "SwapTotal" => &mut m.swap_total,
                    "SwapFree" => &mut m.swap_free,
                    "SwapCached" => &mut m.swap_cached,
                    _ => continue,
                };
                *slot = bytes;
            }
            m
        }

        /// `MemAvailable`, or the kernel's own estimate from before 3.14 had it.
        pub(in super::super) fn available(&self) -> u64 {
            self.available
                .unwrap_or_else(|| {
                    (self.free + self.buffers + self.cached + self.sreclaimable)
                        .saturating_sub(self.shmem)
                })
                .min(self.total)
        }
    }

    /// The `mem` point; `None` when the memory size is unknown.
    pub(in super::super) fn mem_point(m: &Meminfo, now: i64) -> Option<Point> {
        if m.total == 0 {
            tracing::debug!("memory size unknown; skipping mem");
            return None;
        }
        let total = m.total;
        let available = m.available();
        let used = total - available;
        let fields = vec![
            u64_field("total", total),
            u64_field("used", used),
            u64_field("free", m.free.min(total)),
            u64_field("available", available),
            f64_field("used_percent", percent(used as f64, total as f64)),
            f64_field("available_percent", percent(available as f64, total as f64)),
            u64_field("buffered", m.buffers),
            u64_field("cached", m.cached),
            u64_field("shared", m.shmem),
            u64_field("active", m.active),
            u64_field("inactive", m.inactive),
            u64_field("dirty", m.dirty),
            u64_field("slab", m.slab),
            u64_field("sreclaimable", m.sreclaimable),
            u64_field("swap_total", m.swap_total),
            u64_field("swap_free", m.swap_free.min(m.swap_total)),
            u64_field("swap_cached", m.swap_cached),
        ];
        Some(point("mem", &[], fields, now))
    }

    /// `pswpin` and `pswpout` of `/proc/vmstat`, in pages.
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub(in super::super) struct SwapPages {
        pub(in super::super) pswpin: Option<u64>,
        pub(in super::super) pswpout: Option<u64>,
    }

    /// Finds `pswpin` and `pswpout` in `/proc/vmstat` (`name value` lines); malformed lines are skipped.
    pub(in super::super) fn parse_vmstat_swap(text: &str) -> SwapPages {
        let mut s = SwapPages::default();
        for line in text.lines() {
            let mut parts = line.split_ascii_whitespace();
            let slot = match parts.next() {
                Some("pswpin") => &mut s.pswpin,
                Some("pswpout") => &mut s.pswpout,
                _ => continue,
            };
            if let Some(Ok(v)) = parts.next().map(str::parse::<u64>) {
                *slot = Some(v);
            }
            if s.pswpin.is_some() && s.pswpout.is_some() {
                break;
            }
        }
        s
    }

    /// The `swap` point (reported with zeros on a host without swap, like Telegraf).
    pub(in super::super) fn swap_point(m: &Meminfo, pages: SwapPages, now: i64) -> Point {
        let total = m.swap_total;
        let free = m.swap_free.min(total);
        let used = total - free;
        let mut fields = vec![
            u64_field("total", total),
            u64_field("used", used),
            u64_field("free", free),
            f64_field("used_percent", percent(used as f64, total as f64)),
        ];
        let page = rustix::param::page_size() as u64;
        for (key, v) in [("in", pages.pswpin), ("out", pages.pswpout)] {
            if let Some(v) = v {
                fields.push(u64_field(key, v.saturating_mul(page)));
            }
        }
        point("swap", &[], fields, now)
    }
}

#[cfg(not(target_os = "linux"))]
mod other {
    use damselfly_proto::v1::Point;
    use sysinfo::System;

    use super::super::{f64_field, percent, point, u64_field};

    /// The `mem` point from sysinfo (refreshed by the caller); `None` when the memory size is unknown.
    pub(in super::super) fn mem_point(sys: &System, now: i64) -> Option<Point> {
        let total = sys.total_memory();
        if total == 0 {
            tracing::debug!("memory size unknown; skipping mem");
            return None;
        }
        let used = sys.used_memory().min(total);
        let available = sys.available_memory().min(total);
        let fields = vec![
            u64_field("total", total),
            u64_field("used", used),
            u64_field("free", sys.free_memory().min(total)),
            u64_field("available", available),
            f64_field("used_percent", percent(used as f64, total as f64)),
            f64_field("available_percent", percent(available as f64, total as f64)),
            u64_field("swap_total", sys.total_swap()),
            u64_field("swap_free", sys.free_swap()),
        ];
        Some(point("mem", &[], fields, now))
    }

    /// The `swap` point from sysinfo (refreshed by the caller).
    pub(in super::super) fn swap_point(sys: &System, now: i64) -> Point {
        let total = sys.total_swap();
        let free = sys.free_swap().min(total);
        let used = total - free;
        point(
            "swap",
            &[],
            vec![
                u64_field("total", total),
                u64_field("used", used),
                u64_field("free", free),
                f64_field("used_percent", percent(used as f64, total as f64)),
            ],
            now,
        )
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    const MEMINFO: &str = "MemTotal:       16000000 kB\n\
        MemFree:         1000000 kB\n\
        MemAvailable:    8000000 kB\n\
        Buffers:            2000 kB\n\
        Cached:          3000000 kB\n\
        SwapCached:          900 kB\n\
        Active:          4000000 kB\n\
        Inactive:        2000000 kB\n\
        SwapTotal:       2000000 kB\n\
        SwapFree:        1500000 kB\n\
        Dirty:               100 kB\n\
        Shmem:             50000 kB\n\
        Slab:             300000 kB\n\
        SReclaimable:     200000 kB\n\
        HugePages_Total:       0\n";

    #[test]
    fn meminfo_parses_kb_and_exact_keys() {
        let m = Meminfo::parse(MEMINFO);
        assert_eq!(m.total, 16_000_000 * 1024);
        assert_eq!(m.available(), 8_000_000 * 1024);
        assert_eq!(m.buffers, 2000 * 1024);
        // `Cached:` must not pick up `SwapCached:`.
        assert_eq!(m.cached, 3_000_000 * 1024);
        assert_eq!(m.swap_cached, 900 * 1024);
        assert_eq!(m.swap_total, 2_000_000 * 1024);
        assert_eq!(m.swap_free, 1_500_000 * 1024);
    }

    #[test]
    fn meminfo_skips_malformed_lines() {
        let text = "MemTotal: 100 kB\nMemFree\n: 5 kB\nBuffers: x kB\nCached:\nDirty: 18446744073709551615 kB\n\
                    Slab: -1 kB\n\u{0}\u{fffd}:\nSwapTotal: 7\n";
        let m = Meminfo::parse(text);
        assert_eq!(m.total, 102_400);
        assert_eq!((m.free, m.buffers, m.cached, m.slab), (0, 0, 0, 0));
        assert_eq!(m.dirty, u64::MAX, "saturates");
        assert_eq!(m.swap_total, 7, "no unit: taken as is");
        assert_eq!(Meminfo::parse(""), Meminfo::default());
    }

    #[test]
    fn available_falls_back_for_old_kernels() {
        let m = Meminfo::parse(
            "MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 10 kB\nCached: 200 kB\nShmem: 20 kB\nSReclaimable: 10 kB\n",
        );
        assert_eq!(m.available(), 300 * 1024);
        let p = mem_point(&m, 1).expect("point");
        assert_eq!(p.measurement, "mem");
        assert!(mem_point(&Meminfo::default(), 1).is_none());
    }

    #[test]
    fn vmstat_swap_counters() {
        let s = parse_vmstat_swap("nr_free_pages 5\npswpin 12\npswpout 34\npgfault 9\n");
        assert_eq!(
            s,
            SwapPages {
                pswpin: Some(12),
                pswpout: Some(34)
            }
        );
        let bad = parse_vmstat_swap("pswpin\npswpout -3\npswpin x y\n\n   \npgpgin 1\n");
        assert_eq!(bad, SwapPages::default());
        let p = swap_point(&Meminfo::parse(MEMINFO), s, 1);
        let page = rustix::param::page_size() as u64;
        let get = |k: &str| {
            p.fields
                .iter()
                .find(|f| f.key == k)
                .and_then(|f| f.value.clone())
        };
        use damselfly_proto::v1::field::Value;
        assert_eq!(get("in"), Some(Value::U64(12 * page)));
        assert_eq!(get("used"), Some(Value::U64(500_000 * 1024)));
        assert_eq!(get("used_percent"), Some(Value::F64(25.0)));
    }
}
