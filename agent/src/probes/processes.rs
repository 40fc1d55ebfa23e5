//! `processes` and `procstat_top`, from one scan of the process table per round.
//!
//! `processes` (Telegraf's names, u64): `running`, `sleeping`, `blocked` (D, uninterruptible), `zombies`, `stopped`
//! (T and t), `idle` (I, idle kernel threads), `dead`, `paging`, `parked`, `unknown`, `total`, and on Linux
//! `total_threads`. Linux reads the state and thread count of `/proc/[pid]/stat`; elsewhere sysinfo's process status.
//!
//! `procstat_top`: the top N processes by CPU and the top N by resident memory, one row per process (a process in
//! both lists is one row), tags `pid`, `process_name`, `rank_by` (`cpu`, `mem` or `cpu,mem`); fields `cpu_usage`
//! (percent of one CPU since the previous round, so a busy multi-threaded process can exceed 100, like `top`),
//! `rss` (bytes, u64), `memory_percent` (of total RAM) and on Linux `num_threads`. Processes with no CPU time in the
//! window are never "top by CPU", nor processes without resident memory (kernel threads) "top by memory".
//! On Linux the CPU time comes from `utime + stime` deltas of the same `/proc/[pid]/stat` read (a pid reused by a
//! new process is recognised by its start time); a process that started during the window is charged all its CPU
//! time. Long `process_name`s truncated by the kernel (15 bytes) are completed from `/proc/[pid]/cmdline`, like
//! gopsutil, for the reported rows only.

use damselfly_proto::v1::Point;

use super::{f64_field, point, u64_field};

#[cfg(target_os = "linux")]
pub(super) use linux::*;
#[cfg(not(target_os = "linux"))]
pub(super) use other::*;

/// Process counts by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Counts {
    running: u64,
    sleeping: u64,
    blocked: u64,
    zombies: u64,
    stopped: u64,
    idle: u64,
    dead: u64,
    paging: u64,
    parked: u64,
    unknown: u64,
    total: u64,
    /// `None` where the OS source has no thread counts.
    total_threads: Option<u64>,
}

impl Counts {
    /// Counts one process by its Linux state letter (`ps`'s STAT column).
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    fn add_linux_state(&mut self, state: u8) {
        let slot = match state {
            b'R' => &mut self.running,
            b'S' => &mut self.sleeping,
            b'D' => &mut self.blocked,
            b'Z' => &mut self.zombies,
            b'T' | b't' => &mut self.stopped,
            b'I' => &mut self.idle,
            b'X' | b'x' => &mut self.dead,
            b'W' => &mut self.paging,
            b'P' => &mut self.parked,
            _ => &mut self.unknown,
        };
        *slot += 1;
        self.total += 1;
    }

    fn point(&self, now: i64) -> Point {
        let mut fields = vec![
            u64_field("running", self.running),
            u64_field("sleeping", self.sleeping),
            u64_field("blocked", self.blocked),
            u64_field("zombies", self.zombies),
            u64_field("stopped", self.stopped),
            u64_field("idle", self.idle),
            u64_field("dead", self.dead),
            u64_field("paging", self.paging),
            u64_field("parked", self.parked),
            u64_field("unknown", self.unknown),
            u64_field("total", self.total),
        ];
        if let Some(t) = self.total_threads {
            fields.push(u64_field("total_threads", t));
        }
        point("processes", &[], fields, now)
    }
}

/// What ranks a process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Ranked {
    pub(super) pid: u32,
    /// Percent of one CPU over the window.
    pub(super) cpu: f64,
    /// Resident memory in bytes.
    pub(super) rss: u64,
}

/// The rows of `procstat_top`: indices into `list` with their `rank_by` tag, the CPU ranking first (busiest
/// first), then the memory-only ones (largest first). Ties go to the lower pid.
pub(super) fn select_top(
    list: &[Ranked],
    n: usize,
    order: &mut Vec<usize>,
) -> Vec<(usize, &'static str)> {
    let mut rows: Vec<(usize, &'static str)> = Vec::with_capacity(2 * n);
    if n == 0 {
        return rows;
    }
    order.clear();
    order.extend((0..list.len()).filter(|&i| list.get(i).is_some_and(|r| r.cpu > 0.0)));
    let by_pid = |a: &usize, b: &usize| {
        let pa = list.get(*a).map_or(0, |r| r.pid);
        let pb = list.get(*b).map_or(0, |r| r.pid);
        pa.cmp(&pb)
    };
    order.sort_unstable_by(|a, b| {
        let ca = list.get(*a).map_or(0.0, |r| r.cpu);
        let cb = list.get(*b).map_or(0.0, |r| r.cpu);
        cb.total_cmp(&ca).then_with(|| by_pid(a, b))
    });
    rows.extend(order.iter().take(n).map(|&i| (i, "cpu")));
    order.clear();
    order.extend((0..list.len()).filter(|&i| list.get(i).is_some_and(|r| r.rss > 0)));
    order.sort_unstable_by(|a, b| {
        let ra = list.get(*a).map_or(0, |r| r.rss);
        let rb = list.get(*b).map_or(0, |r| r.rss);
        rb.cmp(&ra).then_with(|| by_pid(a, b))
    });
    for &i in order.iter().take(n) {
        match rows.iter_mut().find(|(j, _)| *j == i) {
            Some(row) => row.1 = "cpu,mem",
            None => rows.push((i, "mem")),
        }
    }
    rows
}

/// One `procstat_top` row.
fn top_point(
    r: &Ranked,
    name: &str,
    rank_by: &str,
    mem_total: u64,
    threads: Option<u64>,
    now: i64,
) -> Point {
    let pid = r.pid.to_string();
    let cpu = if r.cpu.is_finite() {
        r.cpu.max(0.0)
    } else {
        0.0
    };
    let mut fields = vec![f64_field("cpu_usage", cpu), u64_field("rss", r.rss)];
    if mem_total > 0 {
        fields.push(f64_field(
            "memory_percent",
            100.0 * r.rss as f64 / mem_total as f64,
        ));
    }
    if let Some(t) = threads {
        fields.push(u64_field("num_threads", t));
    }
    point(
        "procstat_top",
        &[("pid", &pid), ("process_name", name), ("rank_by", rank_by)],
        fields,
        now,
    )
}

#[cfg(target_os = "linux")]
mod linux {
    use std::collections::HashMap;
    use std::fmt::Write as _;

    use damselfly_proto::v1::Point;

    use super::super::procfs;
    use super::{Counts, Ranked, select_top, top_point};

    /// The fields of `/proc/[pid]/stat` the probes use.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(in super::super) struct PidStat<'a> {
        pub(in super::super) pid: u32,
        /// `comm`, as the kernel truncated it.
        pub(in super::super) comm: &'a str,
        /// The state letter (`R`, `S`, `D`, ...).
        pub(in super::super) state: u8,
        /// `utime + stime`, in clock ticks.
        pub(in super::super) ticks: u64,
        pub(in super::super) num_threads: u64,
        /// Start time in clock ticks after boot (tells a reused pid from the old process).
        pub(in super::super) starttime: u64,
        /// Resident set, in pages.
        pub(in super::super) rss_pages: u64,
    }

    /// Parses `pid (comm) state ppid ...`. The command name may itself contain spaces and parentheses, so it
    /// runs to the last `)`. `None` for anything malformed or too short.
    pub(in super::super) fn parse_pid_stat(text: &str) -> Option<PidStat<'_>> {
        let open = text.find('(')?;
        let close = text.rfind(')')?;
        let pid = text.get(..open)?.trim().parse().ok()?;
        let comm = text.get(open.checked_add(1)?..close)?;
        let mut it = text.get(close.checked_add(1)?..)?.split_ascii_whitespace();
        // Field numbers as in proc(5): 3 state, 14 utime, 15 stime, 20 num_threads, 22 starttime, 24 rss.
        let state = *it.next()?.as_bytes().first()?;
        let utime: u64 = it.nth(10)?.parse().ok()?;
        let stime: u64 = it.next()?.parse().ok()?;
        let num_threads = it.nth(4)?.parse().ok()?;
        let starttime = it.nth(1)?.parse().ok()?;
        let rss_pages = it.nth(1)?.parse().ok()?;
        Some(PidStat {
            pid,
            comm,
            state,
            ticks: utime.saturating_add(stime),
            num_threads,
            starttime,
            rss_pages,
        })
    }

    /// The name `gopsutil` would give: `comm`, or when the kernel truncated it to 15 bytes, the base name of the
    /// first `cmdline` argument if that starts with `comm`.
    pub(in super::super) fn full_name<'a>(comm: &'a str, cmdline: &'a str) -> &'a str {
        if comm.len() < 15 {
            return comm;
        }
        let arg0 = cmdline.split('\0').next().unwrap_or("");
        let base = arg0.rsplit('/').next().unwrap_or("");
        // (A name is at most 255 bytes on any file system; anything longer is not a program's name.)
        if base.len() > comm.len() && base.len() <= 255 && base.starts_with(comm) {
            base
        } else {
            comm
        }
    }

    /// A command name stored inline (no allocation per process per round).
    #[derive(Clone, Copy)]
    struct ShortName {
        bytes: [u8; 64],
        len: u8,
    }

    impl ShortName {
        fn new(s: &str) -> Self {
            let mut end = s.len().min(64);
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            let mut bytes = [0u8; 64];
            let src = s.as_bytes().get(..end).unwrap_or_default();
            if let Some(dst) = bytes.get_mut(..src.len()) {
                dst.copy_from_slice(src);
            }
            Self {
                bytes,
                len: end as u8,
            }
        }

        fn as_str(&self) -> &str {
            self.bytes
                .get(..usize::from(self.len))
                .and_then(|b| std::str::from_utf8(b).ok())
                .unwrap_or("")
        }
    }

    /// Per-process state of one scan.
    #[derive(Clone, Copy)]
    struct Sample {
        name: ShortName,
        threads: u64,
    }

    /// Keeps the previous scan's CPU times and reusable buffers.
    #[derive(Default)]
    pub(in super::super) struct ProcessProbe {
        /// pid → (start time, ticks) of the previous scan, and the one being built.
        prev: HashMap<u32, (u64, u64)>,
        cur: HashMap<u32, (u64, u64)>,
        /// Boot-clock time of the previous scan, in ticks; `None` before the first.
        prev_at: Option<u64>,
        ranked: Vec<Ranked>,
        samples: Vec<Sample>,
        order: Vec<usize>,
        path: String,
        counts: Counts,
    }

    impl std::fmt::Debug for ProcessProbe {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("ProcessProbe")
                .field("tracked", &self.prev.len())
                .finish_non_exhaustive()
        }
    }

    /// Clock ticks per second of `/proc/[pid]/stat` times (USER_HZ).
    fn ticks_per_second() -> u64 {
        rustix::param::clock_ticks_per_second().max(1)
    }

    /// Boot-clock time (the clock `starttime` counts in) in ticks.
    fn boot_ticks(hz: u64) -> u64 {
        let t = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
        let secs = u64::try_from(t.tv_sec).unwrap_or(0);
        let nanos = u64::try_from(t.tv_nsec).unwrap_or(0);
        secs.saturating_mul(hz)
            .saturating_add(nanos.saturating_mul(hz) / 1_000_000_000)
    }

    impl ProcessProbe {
        /// Reads every `/proc/[pid]/stat`: counts by state and, with `track`, the CPU percentages since the
        /// previous tracked scan.
        pub(in super::super) fn scan(&mut self, track: bool) {
            let hz = ticks_per_second();
            let page = rustix::param::page_size() as u64;
            let now_ticks = boot_ticks(hz);
            let window = self.prev_at.map(|p| now_ticks.saturating_sub(p));
            self.counts = Counts {
                total_threads: Some(0),
                ..Counts::default()
            };
            let mut threads = 0u64;
            // A stat line is at most about 1 KiB (64-byte name, 52 numbers).
            let mut stat_buf = [0u8; 4096];
            self.ranked.clear();
            self.samples.clear();
            self.cur.clear();
            let dir = match std::fs::read_dir("/proc") {
                Ok(d) => d,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot list /proc");
                    return;
                }
            };
            for entry in dir.flatten() {
                let name = entry.file_name();
                let Some(name) = name.to_str() else { continue };
                if name.is_empty() || !name.bytes().all(|b| b.is_ascii_digit()) {
                    continue;
                }
                self.path.clear();
                let _ = write!(self.path, "/proc/{name}/stat");
                // A process may exit between the listing and the read: skip it quietly.
                let Some(text) = procfs::read_small(&self.path, &mut stat_buf) else {
                    continue;
                };
                let Some(s) = parse_pid_stat(text) else {
                    continue;
                };
                self.counts.add_linux_state(s.state);
                threads = threads.saturating_add(s.num_threads);
                if !track {
                    continue;
                }
                self.cur.insert(s.pid, (s.starttime, s.ticks));
                let cpu = match (window, self.prev.get(&s.pid)) {
                    (Some(w), Some(&(start, ticks))) if w > 0 && start == s.starttime => {
                        100.0 * s.ticks.saturating_sub(ticks) as f64 / w as f64
                    }
                    // Started during the window: all its CPU time is in the window.
                    (Some(w), _)
                        if w > 0
                            && s.starttime.saturating_add(1) >= now_ticks.saturating_sub(w) =>
                    {
                        100.0 * s.ticks as f64 / w as f64
                    }
                    _ => 0.0,
                };
                self.ranked.push(Ranked {
                    pid: s.pid,
                    cpu,
                    rss: s.rss_pages.saturating_mul(page),
                });
                self.samples.push(Sample {
                    name: ShortName::new(s.comm),
                    threads: s.num_threads,
                });
            }
            self.counts.total_threads = Some(threads);
            if track {
                std::mem::swap(&mut self.prev, &mut self.cur);
                self.cur.clear();
                self.prev_at = Some(now_ticks);
            }
        }

        /// The `processes` point of the last scan.
        pub(in super::super) fn counts_point(&self, now: i64) -> Option<Point> {
            (self.counts.total > 0).then(|| self.counts.point(now))
        }

        /// The `procstat_top` rows of the last (tracked) scan.
        pub(in super::super) fn top(
            &mut self,
            buf: &mut String,
            n: usize,
            mem_total: u64,
            now: i64,
            points: &mut Vec<Point>,
        ) {
            for (i, rank_by) in select_top(&self.ranked, n, &mut self.order) {
                let (Some(r), Some(sample)) = (self.ranked.get(i), self.samples.get(i)) else {
                    continue;
                };
                let comm = sample.name.as_str();
                let name = if comm.len() >= 15 {
                    self.path.clear();
                    let _ = write!(self.path, "/proc/{}/cmdline", r.pid);
                    if procfs::read_quiet(&self.path, buf) {
                        full_name(comm, buf)
                    } else {
                        comm
                    }
                } else {
                    comm
                };
                points.push(top_point(
                    r,
                    name,
                    rank_by,
                    mem_total,
                    Some(sample.threads),
                    now,
                ));
            }
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod other {
    use damselfly_proto::v1::Point;
    use sysinfo::{ProcessRefreshKind, ProcessStatus, ProcessesToUpdate, System};

    use super::{Counts, Ranked, select_top, top_point};

    #[derive(Debug, Default)]
    pub(in super::super) struct ProcessProbe {
        ranked: Vec<Ranked>,
        order: Vec<usize>,
    }

    impl ProcessProbe {
        /// Refreshes sysinfo's process list; CPU and memory only when `cpu_mem` (for `procstat_top`).
        pub(in super::super) fn refresh(&mut self, sys: &mut System, cpu_mem: bool) {
            let kind = ProcessRefreshKind::nothing().without_tasks();
            let kind = if cpu_mem {
                kind.with_cpu().with_memory()
            } else {
                kind
            };
            sys.refresh_processes_specifics(ProcessesToUpdate::All, true, kind);
        }

        pub(in super::super) fn counts(&self, sys: &System, now: i64) -> Option<Point> {
            let mut c = Counts::default();
            for p in sys.processes().values() {
                let slot = match p.status() {
                    ProcessStatus::Run => &mut c.running,
                    ProcessStatus::Sleep => &mut c.sleeping,
                    ProcessStatus::UninterruptibleDiskSleep | ProcessStatus::LockBlocked => {
                        &mut c.blocked
                    }
                    ProcessStatus::Zombie => &mut c.zombies,
                    ProcessStatus::Stop | ProcessStatus::Tracing | ProcessStatus::Suspended => {
                        &mut c.stopped
                    }
                    ProcessStatus::Idle => &mut c.idle,
                    ProcessStatus::Dead => &mut c.dead,
                    ProcessStatus::Parked => &mut c.parked,
                    _ => &mut c.unknown,
                };
                *slot += 1;
                c.total += 1;
            }
            (c.total > 0).then(|| c.point(now))
        }

        pub(in super::super) fn top(
            &mut self,
            sys: &System,
            n: usize,
            now: i64,
            points: &mut Vec<Point>,
        ) {
            let procs: Vec<&sysinfo::Process> = sys.processes().values().collect();
            self.ranked.clear();
            self.ranked.extend(procs.iter().map(|p| Ranked {
                pid: p.pid().as_u32(),
                cpu: f64::from(p.cpu_usage()),
                rss: p.memory(),
            }));
            let mem_total = sys.total_memory();
            for (i, rank_by) in select_top(&self.ranked, n, &mut self.order) {
                let (Some(r), Some(p)) = (self.ranked.get(i), procs.get(i)) else {
                    continue;
                };
                let name = p.name().to_string_lossy();
                points.push(top_point(r, &name, rank_by, mem_total, None, now));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(pid: u32, cpu: f64, rss: u64) -> Ranked {
        Ranked { pid, cpu, rss }
    }

    #[test]
    fn top_rows_are_deduplicated() {
        let list = [
            r(1, 0.0, 10),
            r(2, 50.0, 500),
            r(3, 20.0, 1),
            r(4, 20.0, 900),
            r(5, f64::NAN, 0),
            r(6, 0.0, 0),
        ];
        let mut order = Vec::new();
        let rows = select_top(&list, 2, &mut order);
        let got: Vec<(u32, &str)> = rows.iter().map(|(i, by)| (list[*i].pid, *by)).collect();
        assert_eq!(got, [(2, "cpu,mem"), (3, "cpu"), (4, "mem")]);
        assert!(select_top(&list, 0, &mut order).is_empty());
        let all = select_top(&list, 100, &mut order);
        // Only processes with CPU time or memory appear, each once.
        assert_eq!(all.len(), 4);
        assert!(select_top(&[], 3, &mut order).is_empty());
    }

    #[test]
    fn linux_state_letters() {
        let mut c = Counts::default();
        for s in b"RSSDZTtIXWP?" {
            c.add_linux_state(*s);
        }
        assert_eq!(
            (
                c.running, c.sleeping, c.blocked, c.zombies, c.stopped, c.idle
            ),
            (1, 2, 1, 1, 2, 1)
        );
        assert_eq!(
            (c.dead, c.paging, c.parked, c.unknown, c.total),
            (1, 1, 1, 1, 12)
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn pid_stat_lines() {
        let line = "1234 (my (odd) proc) S 1 1234 1234 0 -1 4194560 500 0 0 0 150 50 0 0 20 0 7 0 98765 \
                    123456789 2048 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 3 0 0 0 0 0\n";
        let s = parse_pid_stat(line).expect("parses");
        assert_eq!(s.pid, 1234);
        assert_eq!(s.comm, "my (odd) proc");
        assert_eq!(s.state, b'S');
        assert_eq!(s.ticks, 200);
        assert_eq!(s.num_threads, 7);
        assert_eq!(s.starttime, 98765);
        assert_eq!(s.rss_pages, 2048);
        let kthread = "2 (kthreadd) I 0 0 0 0 -1 2129984 0 0 0 0 0 3 0 0 20 0 1 0 1 0 0 18446744073709551615 \
                       0 0 0 0 0 0 0 2147483647 0 0 0 0 0 1 0 0 0 0 0";
        assert_eq!(
            parse_pid_stat(kthread).map(|s| (s.state, s.ticks)),
            Some((b'I', 3))
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn malformed_pid_stat_lines_are_none() {
        for bad in [
            "",
            "1234",
            "1234 (x",
            "1234 x) S 1",
            ") (",
            "abc (x) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22",
            "1 (x) S 1 2 3",
            "1 (x)  ",
            "1 (x) S 1 1 1 0 -1 0 0 0 0 0 x 5 0 0 20 0 1 0 5 0 9",
            "1 (x) S 1 1 1 0 -1 0 0 0 0 0 4 5 0 0 20 0 1 0 5 0 -9",
            "-1 (x) S 1 1 1 0 -1 0 0 0 0 0 4 5 0 0 20 0 1 0 5 0 9",
            "1 (\u{fffd}) \u{fffd}",
        ] {
            assert_eq!(parse_pid_stat(bad), None, "{bad:?}");
        }
        // Exactly up to rss is enough.
        assert!(parse_pid_stat("1 (x) S 1 1 1 0 -1 0 0 0 0 0 4 5 0 0 20 0 1 0 5 0 9").is_some());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn long_names_from_cmdline() {
        assert_eq!(full_name("bash", "/bin/bash\0-l\0"), "bash");
        assert_eq!(
            full_name("damselfly-agen", "/usr/bin/damselfly-agent\0--once"),
            "damselfly-agen"
        );
        assert_eq!(
            full_name("damselfly-agent", "/usr/bin/damselfly-agent-x\0--once"),
            "damselfly-agent-x"
        );
        assert_eq!(full_name("kworker/u8:3-ev", ""), "kworker/u8:3-ev");
        assert_eq!(
            full_name("java-long-name1", "/opt/java\0"),
            "java-long-name1"
        );
        let huge = format!("/x/damselfly-agent{}", "y".repeat(300));
        assert_eq!(full_name("damselfly-agent", &huge), "damselfly-agent");
    }
}
