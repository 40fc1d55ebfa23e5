//! `diskio`: cumulative I/O counters per block device (tag `name`), Telegraf's field names, all u64.
//!
//! Linux (`/proc/diskstats`): `reads`, `writes`, `merged_reads`, `merged_writes` (operations), `read_bytes`,
//! `write_bytes` (sectors × 512, the kernel's fixed unit there), `read_time`, `write_time`, `io_time`,
//! `weighted_io_time` (ms) and the gauge `iops_in_progress`. Partitions are reported like whole disks (as Telegraf
//! does); `ram*` and `loop*` devices and devices whose counters are all 0 are skipped.
//!
//! Elsewhere sysinfo has only byte totals per mounted disk: `read_bytes` and `write_bytes`, per device name.

#[cfg(target_os = "linux")]
pub(super) use linux::*;
#[cfg(not(target_os = "linux"))]
pub(super) use other::*;

#[cfg(target_os = "linux")]
mod linux {
    use damselfly_proto::v1::Point;

    use super::super::{point, procfs, u64_field};

    /// Field names of the first 11 statistics columns of `/proc/diskstats`, in order.
    const COLUMNS: [&str; 11] = [
        "reads",
        "merged_reads",
        "read_bytes",
        "read_time",
        "writes",
        "merged_writes",
        "write_bytes",
        "write_time",
        "iops_in_progress",
        "io_time",
        "weighted_io_time",
    ];

    /// One device line of `/proc/diskstats`.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(in super::super) struct DiskStat<'a> {
        pub(in super::super) name: &'a str,
        /// The first 11 statistics, sectors already converted to bytes.
        pub(in super::super) values: [u64; 11],
    }

    /// Parses one line; `None` for a malformed line or one with fewer than 11 statistics (the short partition
    /// lines of pre-2.6.25 kernels).
    pub(in super::super) fn parse_diskstats_line(line: &str) -> Option<DiskStat<'_>> {
        let mut parts = line.split_ascii_whitespace();
        parts.next()?.parse::<u64>().ok()?; // major
        parts.next()?.parse::<u64>().ok()?; // minor
        let name = parts.next()?;
        let mut values = [0u64; 11];
        for slot in &mut values {
            *slot = parts.next()?.parse().ok()?;
        }
        // Columns 3 and 7 count 512-byte sectors, whatever the device's sector size.
        for i in [2, 6] {
            if let Some(v) = values.get_mut(i) {
                *v = v.saturating_mul(512);
            }
        }
        Some(DiskStat { name, values })
    }

    /// The devices to report.
    pub(in super::super) fn parse_diskstats(text: &str) -> impl Iterator<Item = DiskStat<'_>> {
        text.lines().filter_map(parse_diskstats_line).filter(|d| {
            !d.name.starts_with("ram")
                && !d.name.starts_with("loop")
                && d.values.iter().any(|v| *v != 0)
        })
    }

    #[derive(Debug, Default)]
    pub(in super::super) struct DiskIoProbe {}

    impl DiskIoProbe {
        pub(in super::super) fn collect(
            &mut self,
            buf: &mut String,
            now: i64,
            points: &mut Vec<Point>,
        ) {
            if !procfs::read_into("/proc/diskstats", buf) {
                return;
            }
            for d in parse_diskstats(buf) {
                let fields = COLUMNS
                    .iter()
                    .zip(d.values)
                    .map(|(k, v)| u64_field(k, v))
                    .collect();
                points.push(point("diskio", &[("name", d.name)], fields, now));
            }
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod other {
    use damselfly_proto::v1::Point;
    use sysinfo::Disks;

    use super::super::{point, u64_field};

    #[derive(Debug, Default)]
    pub(in super::super) struct DiskIoProbe {}

    impl DiskIoProbe {
        /// Byte totals of the disks sysinfo listed (the caller refreshed them with I/O usage), once per device.
        pub(in super::super) fn collect(
            &mut self,
            disks: &Disks,
            now: i64,
            points: &mut Vec<Point>,
        ) {
            let mut seen: Vec<String> = Vec::new();
            for d in disks.iter() {
                let name = d.name().to_string_lossy();
                let name = name.strip_prefix("/dev/").unwrap_or(&name).to_owned();
                let usage = d.usage();
                if seen.contains(&name)
                    || (usage.total_read_bytes == 0 && usage.total_written_bytes == 0)
                {
                    continue;
                }
                points.push(point(
                    "diskio",
                    &[("name", &name)],
                    vec![
                        u64_field("read_bytes", usage.total_read_bytes),
                        u64_field("write_bytes", usage.total_written_bytes),
                    ],
                    now,
                ));
                seen.push(name);
            }
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::linux::*;

    const SAMPLE: &str = "   7       0 loop0 5 0 10 0 0 0 0 0 0 0 0 0 0 0 0 0 0\n\
         1       0 ram0 0 0 0 0 0 0 0 0 0 0 0\n\
       254       0 vda 172957 7011 11899850 626963 29388 47640 14953352 49151 2 29120 684716 13951 54 3133008 5069 4350 3532\n\
       254       1 vda1 100 1 200 3 4 5 6 7 0 8 9\n\
       253       0 zram0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0\n\
       259       0 nvme0n1 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15\n";

    #[test]
    fn diskstats_devices_and_units() {
        let got: Vec<DiskStat<'_>> = parse_diskstats(SAMPLE).collect();
        let names: Vec<&str> = got.iter().map(|d| d.name).collect();
        assert_eq!(names, ["vda", "vda1", "nvme0n1"]);
        assert_eq!(
            got[0].values,
            [
                172_957,
                7011,
                11_899_850 * 512,
                626_963,
                29388,
                47640,
                14_953_352 * 512,
                49151,
                2,
                29120,
                684_716
            ]
        );
        // An 11-column line (kernels before 4.18) parses too.
        assert_eq!(got[1].values[10], 9);
    }

    #[test]
    fn malformed_diskstats_lines_are_skipped() {
        let text = "garbage\n\n8 0 sda 1 2 3\n8 0 sda x 2 3 4 5 6 7 8 9 10 11\nx 0 sdb 1 2 3 4 5 6 7 8 9 10 11\n\
                    8 0\n8 0 sdc -1 2 3 4 5 6 7 8 9 10 11\n\
                    8 16 sdd 18446744073709551615 0 18446744073709551615 0 0 0 0 0 0 0 0\n";
        let got: Vec<DiskStat<'_>> = parse_diskstats(text).collect();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].name, "sdd");
        assert_eq!(got[0].values[2], u64::MAX, "sector bytes saturate");
        assert!(parse_diskstats("").next().is_none());
    }
}
