//! `system`: load averages `load1`, `load5`, `load15` (f64), `uptime` in seconds, `n_cpus` and, on Linux where
//! the utmp file exists, `n_users` (logged-in user sessions) (u64), like Telegraf.

use damselfly_proto::v1::Point;
use sysinfo::{CpuRefreshKind, System};

use super::{f64_field, point, u64_field};

pub(super) fn collect(sys: &mut System, now: i64) -> Vec<Point> {
    let mut fields = Vec::with_capacity(6);
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
    #[cfg(target_os = "linux")]
    if let Some(n) = linux::n_users() {
        fields.push(u64_field("n_users", n));
    }
    if fields.is_empty() {
        return Vec::new();
    }
    vec![point("system", &[], fields, now)]
}

#[cfg(target_os = "linux")]
mod linux {
    /// Size of glibc's (and musl's) `struct utmp` on Linux.
    const UTMP_RECORD: usize = 384;
    /// `ut_type` of a logged-in user's session.
    const USER_PROCESS: i16 = 7;

    /// Logged-in sessions from the utmp file; `None` when there is none (containers, systemd without utmp).
    pub(super) fn n_users() -> Option<u64> {
        for path in ["/run/utmp", "/var/run/utmp"] {
            if let Ok(bytes) = std::fs::read(path) {
                return count_user_processes(&bytes);
            }
        }
        None
    }

    /// Counts `USER_PROCESS` records; `None` if the file is not a whole number of records (not glibc's layout).
    pub(super) fn count_user_processes(bytes: &[u8]) -> Option<u64> {
        if !bytes.len().is_multiple_of(UTMP_RECORD) {
            return None;
        }
        Some(
            bytes
                .chunks_exact(UTMP_RECORD)
                .filter(|r| matches!(r, [a, b, ..] if i16::from_ne_bytes([*a, *b]) == USER_PROCESS))
                .count() as u64,
        )
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn utmp_records() {
            let mut bytes = vec![0u8; UTMP_RECORD * 3];
            bytes[..2].copy_from_slice(&USER_PROCESS.to_ne_bytes());
            bytes[UTMP_RECORD..UTMP_RECORD + 2].copy_from_slice(&2i16.to_ne_bytes()); // BOOT_TIME
            bytes[2 * UTMP_RECORD..2 * UTMP_RECORD + 2]
                .copy_from_slice(&USER_PROCESS.to_ne_bytes());
            assert_eq!(count_user_processes(&bytes), Some(2));
            assert_eq!(count_user_processes(&[]), Some(0));
            assert_eq!(count_user_processes(&bytes[..100]), None);
        }
    }
}
