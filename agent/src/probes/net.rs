//! `net`: traffic counters per interface (tag `interface`), as the kernel reports them: u64, monotonic until the
//! interface or host resets them; the agent never resets or differentiates them (SQL and rollups derive rates).
//! Fields: `bytes_sent`, `bytes_recv`, `packets_sent`, `packets_recv`, `err_in`, `err_out`, and on Linux `drop_in`,
//! `drop_out`.
//!
//! Linux: one read of `/proc/net/dev` (every interface, every counter, in the kernel's order). Elsewhere sysinfo.

#[cfg(target_os = "linux")]
pub(super) use linux::*;
#[cfg(not(target_os = "linux"))]
pub(super) use other::*;

#[cfg(target_os = "linux")]
mod linux {
    use damselfly_proto::v1::Point;

    use super::super::{point, procfs, u64_field};

    /// One interface of `/proc/net/dev`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(in super::super) struct NetDev<'a> {
        pub(in super::super) name: &'a str,
        pub(in super::super) bytes_recv: u64,
        pub(in super::super) packets_recv: u64,
        pub(in super::super) err_in: u64,
        pub(in super::super) drop_in: u64,
        pub(in super::super) bytes_sent: u64,
        pub(in super::super) packets_sent: u64,
        pub(in super::super) err_out: u64,
        pub(in super::super) drop_out: u64,
    }

    /// Parses `name: 8 receive counters 8 transmit counters`; the two header lines and malformed lines are skipped.
    pub(in super::super) fn parse_net_dev_line(line: &str) -> Option<NetDev<'_>> {
        let (name, rest) = line.rsplit_once(':')?;
        let name = name.trim();
        if name.is_empty() {
            return None;
        }
        let mut c = [0u64; 16];
        let mut parts = rest.split_ascii_whitespace();
        for slot in &mut c {
            *slot = parts.next()?.parse().ok()?;
        }
        let [
            bytes_recv,
            packets_recv,
            err_in,
            drop_in,
            _,
            _,
            _,
            _,
            bytes_sent,
            packets_sent,
            err_out,
            drop_out,
            ..,
        ] = c;
        Some(NetDev {
            name,
            bytes_recv,
            packets_recv,
            err_in,
            drop_in,
            bytes_sent,
            packets_sent,
            err_out,
            drop_out,
        })
    }

    #[derive(Debug, Default)]
    pub(in super::super) struct NetProbe {}

    impl NetProbe {
        pub(in super::super) fn new() -> Result<Self, sysinfo::Error> {
            Ok(Self {})
        }

        pub(in super::super) fn collect(
            &mut self,
            buf: &mut String,
            now: i64,
            points: &mut Vec<Point>,
        ) {
            if !procfs::read_into("/proc/net/dev", buf) {
                return;
            }
            for d in buf.lines().filter_map(parse_net_dev_line) {
                points.push(point(
                    "net",
                    &[("interface", d.name)],
                    vec![
                        u64_field("bytes_sent", d.bytes_sent),
                        u64_field("bytes_recv", d.bytes_recv),
                        u64_field("packets_sent", d.packets_sent),
                        u64_field("packets_recv", d.packets_recv),
                        u64_field("err_in", d.err_in),
                        u64_field("err_out", d.err_out),
                        u64_field("drop_in", d.drop_in),
                        u64_field("drop_out", d.drop_out),
                    ],
                    now,
                ));
            }
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod other {
    use damselfly_proto::v1::Point;
    use sysinfo::Networks;

    use super::super::{point, u64_field};

    #[derive(Debug, Default)]
    pub(in super::super) struct NetProbe {
        networks: Option<Networks>,
    }

    impl NetProbe {
        pub(in super::super) fn new() -> Result<Self, sysinfo::Error> {
            Ok(Self {
                networks: Some(Networks::new()?),
            })
        }

        pub(in super::super) fn collect(&mut self, now: i64, points: &mut Vec<Point>) {
            let Some(networks) = self.networks.as_mut() else {
                return;
            };
            // `true` forgets interfaces that disappeared.
            networks.refresh(true);
            let mut list: Vec<_> = networks.iter().collect();
            // Stable output order makes `--once` diffable.
            list.sort_by(|a, b| a.0.cmp(b.0));
            for (name, data) in list {
                let name = name.to_string_lossy();
                points.push(point(
                    "net",
                    &[("interface", &name)],
                    vec![
                        u64_field("bytes_sent", data.total_transmitted()),
                        u64_field("bytes_recv", data.total_received()),
                        u64_field("packets_sent", data.total_packets_transmitted()),
                        u64_field("packets_recv", data.total_packets_received()),
                        u64_field("err_in", data.total_errors_on_received()),
                        u64_field("err_out", data.total_errors_on_transmitted()),
                    ],
                    now,
                ));
            }
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::linux::*;

    #[test]
    fn net_dev_lines() {
        let text = "Inter-|   Receive                                                |  Transmit\n \
            face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
            lo: 1000 10 0 0 0 0 0 0 1000 10 0 0 0 0 0 0\n  \
            eth0:18446744073709551615 20 1 2 0 0 0 3 400 5 6 7 0 0 0 0\n\
            weird:name: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16\n";
        let got: Vec<NetDev<'_>> = text.lines().filter_map(parse_net_dev_line).collect();
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].name, "lo");
        let eth0 = got[1];
        assert_eq!(eth0.name, "eth0");
        assert_eq!(eth0.bytes_recv, u64::MAX);
        assert_eq!((eth0.packets_recv, eth0.err_in, eth0.drop_in), (20, 1, 2));
        assert_eq!(
            (
                eth0.bytes_sent,
                eth0.packets_sent,
                eth0.err_out,
                eth0.drop_out
            ),
            (400, 5, 6, 7)
        );
        assert_eq!(got[2].name, "weird:name");
        assert_eq!(got[2].drop_out, 12);
    }

    #[test]
    fn malformed_net_dev_lines_are_skipped() {
        for bad in [
            "",
            ":",
            ": 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16",
            "eth0: 1 2 3",
            "eth0: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 x",
            "eth0: -1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16",
            "no colon 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16",
        ] {
            assert_eq!(parse_net_dev_line(bad), None, "{bad:?}");
        }
    }
}
