//! `disk`: space per mounted file system, like Telegraf's disk input. Tags `path`, `device` (without `/dev/`),
//! `fstype`; fields `total`, `used`, `free` in bytes and `inodes_total`, `inodes_used`, `inodes_free` (u64), and
//! `used_percent` (f64).
//!
//! From `statvfs` as `df` computes them: `free` is the space available to unprivileged users, `used` the blocks in
//! use, so blocks reserved for root are in neither, and `used_percent` = `used / (used + free)`. File systems that
//! do not count inodes (`f_files` = 0, e.g. btrfs) have no inode fields; on Windows (sysinfo only) there are none
//! either and `used` = `total` - `free`.
//!
//! Which mounts: on Linux the entries of `/proc/self/mounts` whose type is a block-device file system in
//! `/proc/filesystems` (so no proc, sysfs, cgroup, nfs, fuse...; zfs counts as real), like Telegraf's default;
//! then, everywhere, Telegraf's default `ignore_fs` (tmpfs, devtmpfs, devfs, iso9660, overlay, aufs, squashfs) is
//! dropped, and so are file systems of size 0. A mount point listed twice is reported once (the later mount, the
//! one statvfs sees).

use damselfly_proto::v1::{Field, Point};

use super::{f64_field, percent, point, u64_field};

/// Telegraf's default `ignore_fs`.
pub(super) const IGNORED_FS: [&str; 7] = [
    "tmpfs", "devtmpfs", "devfs", "iso9660", "overlay", "aufs", "squashfs",
];

/// The numbers of one `statvfs` call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(unix), allow(dead_code))]
struct Space {
    frsize: u64,
    blocks: u64,
    bfree: u64,
    bavail: u64,
    files: u64,
    ffree: u64,
}

/// The disk fields from `statvfs` numbers; `None` for a file system of size 0 (a pseudo file system).
#[cfg_attr(not(unix), allow(dead_code))]
fn space_fields(s: Space) -> Option<Vec<Field>> {
    let total = s.blocks.saturating_mul(s.frsize);
    if total == 0 {
        return None;
    }
    let free = s.bavail.min(s.blocks).saturating_mul(s.frsize);
    let used = s.blocks.saturating_sub(s.bfree).saturating_mul(s.frsize);
    let mut fields = vec![
        u64_field("total", total),
        u64_field("used", used),
        u64_field("free", free),
        f64_field(
            "used_percent",
            percent(used as f64, used as f64 + free as f64),
        ),
    ];
    if s.files > 0 {
        let ffree = s.ffree.min(s.files);
        fields.extend([
            u64_field("inodes_total", s.files),
            u64_field("inodes_used", s.files - ffree),
            u64_field("inodes_free", ffree),
        ]);
    }
    Some(fields)
}

#[cfg(unix)]
fn statvfs(path: &std::path::Path) -> Option<Space> {
    match rustix::fs::statvfs(path) {
        Ok(s) => Some(Space {
            frsize: if s.f_frsize > 0 {
                s.f_frsize
            } else {
                s.f_bsize
            },
            blocks: s.f_blocks,
            bfree: s.f_bfree,
            bavail: s.f_bavail,
            files: s.f_files,
            ffree: s.f_ffree,
        }),
        Err(e) => {
            tracing::debug!(path = %path.display(), error = %e, "statvfs failed");
            None
        }
    }
}

fn disk_point(path: &str, device: &str, fstype: &str, fields: Vec<Field>, now: i64) -> Point {
    let device = device.strip_prefix("/dev/").unwrap_or(device);
    point(
        "disk",
        &[("path", path), ("device", device), ("fstype", fstype)],
        fields,
        now,
    )
}

#[cfg(target_os = "linux")]
pub(super) use linux::*;
#[cfg(not(target_os = "linux"))]
pub(super) use other::*;

#[cfg(target_os = "linux")]
mod linux {
    use std::borrow::Cow;
    use std::collections::HashSet;

    use damselfly_proto::v1::Point;

    use super::super::procfs;
    use super::{IGNORED_FS, disk_point, space_fields, statvfs};

    /// One line of `/proc/self/mounts`.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(in super::super) struct Mount<'a> {
        pub(in super::super) device: &'a str,
        pub(in super::super) path: Cow<'a, str>,
        pub(in super::super) fstype: &'a str,
    }

    /// The file system types the kernel knows, from `/proc/filesystems`: read at start-up and again when a mount
    /// has a type missing from it (a file system module loaded later, e.g. xfs on its first mount).
    #[derive(Debug, Default)]
    pub(in super::super) struct DiskProbe {
        /// The real (block-device) types; `None`: `/proc/filesystems` unreadable, keep every type not known to be
        /// virtual.
        real_fs: Option<HashSet<String>>,
        /// Every type listed, real or not.
        known_fs: HashSet<String>,
        fs_buf: String,
    }

    impl DiskProbe {
        pub(in super::super) fn init(&mut self) {
            if procfs::read_into("/proc/filesystems", &mut self.fs_buf) {
                self.real_fs = Some(parse_real_filesystems(&self.fs_buf));
                self.known_fs = self
                    .fs_buf
                    .lines()
                    .filter_map(|l| l.split_ascii_whitespace().last())
                    .map(str::to_owned)
                    .collect();
            }
        }

        pub(in super::super) fn collect(
            &mut self,
            buf: &mut String,
            now: i64,
            points: &mut Vec<Point>,
        ) {
            if !procfs::read_into("/proc/self/mounts", buf) {
                return;
            }
            if self.real_fs.is_some()
                && parse_mounts(buf).any(|m| !self.known_fs.contains(m.fstype))
            {
                self.init();
                // Types still unknown (`fuse.sshfs` is listed as `fuse`) are not real file systems: remember them,
                // so the next rounds do not read /proc/filesystems again.
                for m in parse_mounts(buf) {
                    if !self.known_fs.contains(m.fstype) {
                        self.known_fs.insert(m.fstype.to_owned());
                    }
                }
            }
            let mounts = select_mounts(parse_mounts(buf), self.real_fs.as_ref());
            for m in mounts {
                let Some(space) = statvfs(std::path::Path::new(m.path.as_ref())) else {
                    continue;
                };
                if let Some(fields) = space_fields(space) {
                    points.push(disk_point(&m.path, m.device, m.fstype, fields, now));
                }
            }
        }
    }

    /// The non-`nodev` types of `/proc/filesystems`, plus zfs (nodev, yet a real disk), like gopsutil.
    pub(in super::super) fn parse_real_filesystems(text: &str) -> HashSet<String> {
        let mut set: HashSet<String> = text
            .lines()
            .filter(|l| !l.starts_with("nodev"))
            .filter_map(|l| l.split_ascii_whitespace().next())
            .map(str::to_owned)
            .collect();
        set.insert("zfs".to_owned());
        set
    }

    /// Mount table lines (`device path fstype options dump pass`); lines with fewer than three fields are skipped.
    pub(in super::super) fn parse_mounts(text: &str) -> impl Iterator<Item = Mount<'_>> {
        text.lines().filter_map(|line| {
            let mut parts = line.split_ascii_whitespace();
            let device = parts.next()?;
            let path = parts.next()?;
            let fstype = parts.next()?;
            Some(Mount {
                device,
                path: unescape_octal(path),
                fstype,
            })
        })
    }

    /// The mounts to report: real file systems not ignored by default, one per mount point (the last listed).
    pub(in super::super) fn select_mounts<'a>(
        mounts: impl Iterator<Item = Mount<'a>>,
        real_fs: Option<&HashSet<String>>,
    ) -> Vec<Mount<'a>> {
        const VIRTUAL: [&str; 22] = [
            "proc",
            "sysfs",
            "cgroup",
            "cgroup2",
            "devpts",
            "mqueue",
            "hugetlbfs",
            "pstore",
            "debugfs",
            "tracefs",
            "securityfs",
            "configfs",
            "fusectl",
            "bpf",
            "binfmt_misc",
            "rpc_pipefs",
            "autofs",
            "nsfs",
            "efivarfs",
            "selinuxfs",
            "ramfs",
            "rootfs",
        ];
        let mut out: Vec<Mount<'a>> = Vec::new();
        for m in mounts {
            let keep = m.device != "none"
                && !IGNORED_FS.contains(&m.fstype)
                && match real_fs {
                    Some(real) => real.contains(m.fstype),
                    None => !VIRTUAL.contains(&m.fstype),
                };
            if !keep {
                continue;
            }
            out.retain(|o| o.path != m.path);
            out.push(m);
        }
        out
    }

    /// Undoes the kernel's `\ooo` escapes of spaces, tabs, newlines and backslashes in mount paths.
    pub(in super::super) fn unescape_octal(s: &str) -> Cow<'_, str> {
        if !s.contains('\\') {
            return Cow::Borrowed(s);
        }
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while let Some(&b) = bytes.get(i) {
            if b == b'\\'
                && let Some(oct) = bytes.get(i + 1..i + 4)
                && oct.iter().all(|c| (b'0'..=b'7').contains(c))
            {
                let v = oct
                    .iter()
                    .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
                if let Ok(v) = u8::try_from(v) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
            out.push(b);
            i += 1;
        }
        Cow::Owned(String::from_utf8_lossy(&out).into_owned())
    }
}

#[cfg(not(target_os = "linux"))]
mod other {
    use damselfly_proto::v1::Point;
    use sysinfo::Disks;

    use super::{IGNORED_FS, disk_point};
    #[cfg(not(unix))]
    use super::{f64_field, percent, u64_field};
    #[cfg(unix)]
    use super::{space_fields, statvfs};

    #[derive(Debug, Default)]
    pub(in super::super) struct DiskProbe {}

    impl DiskProbe {
        pub(in super::super) fn init(&mut self) {}

        /// Reports the disks sysinfo listed (the caller refreshed them with storage).
        pub(in super::super) fn collect(
            &mut self,
            disks: &Disks,
            now: i64,
            points: &mut Vec<Point>,
        ) {
            let mut seen: Vec<&std::path::Path> = Vec::new();
            for d in disks.iter() {
                let fstype = d.file_system().to_string_lossy();
                if IGNORED_FS.contains(&fstype.as_ref()) || seen.contains(&d.mount_point()) {
                    continue;
                }
                seen.push(d.mount_point());
                #[cfg(unix)]
                let fields = statvfs(d.mount_point()).and_then(space_fields);
                #[cfg(not(unix))]
                let fields = {
                    let total = d.total_space();
                    let free = d.available_space().min(total);
                    let used = total - free;
                    (total > 0).then(|| {
                        vec![
                            u64_field("total", total),
                            u64_field("used", used),
                            u64_field("free", free),
                            f64_field("used_percent", percent(used as f64, total as f64)),
                        ]
                    })
                };
                let Some(fields) = fields else { continue };
                let path = d.mount_point().to_string_lossy();
                let device = d.name().to_string_lossy();
                points.push(disk_point(&path, &device, &fstype, fields, now));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use damselfly_proto::v1::field::Value;

    fn get(fields: &[Field], key: &str) -> Option<Value> {
        fields
            .iter()
            .find(|f| f.key == key)
            .and_then(|f| f.value.clone())
    }

    #[test]
    fn df_formulas() {
        let f = space_fields(Space {
            frsize: 4096,
            blocks: 1000,
            bfree: 300,
            bavail: 250,
            files: 100,
            ffree: 40,
        })
        .expect("fields");
        assert_eq!(get(&f, "total"), Some(Value::U64(4_096_000)));
        assert_eq!(get(&f, "used"), Some(Value::U64(700 * 4096)));
        assert_eq!(get(&f, "free"), Some(Value::U64(250 * 4096)));
        assert_eq!(
            get(&f, "used_percent"),
            Some(Value::F64(100.0 * 700.0 / 950.0))
        );
        assert_eq!(get(&f, "inodes_used"), Some(Value::U64(60)));
        assert_eq!(get(&f, "inodes_free"), Some(Value::U64(40)));
        let no_inodes = Space {
            files: 0,
            ffree: 0,
            ..Space {
                frsize: 512,
                blocks: 10,
                bfree: 20,
                bavail: 30,
                files: 0,
                ffree: 0,
            }
        };
        let f = space_fields(no_inodes).expect("fields");
        assert_eq!(get(&f, "inodes_total"), None);
        // Odd numbers never underflow.
        assert_eq!(get(&f, "used"), Some(Value::U64(0)));
        assert_eq!(get(&f, "free"), Some(Value::U64(5120)));
        let empty = Space {
            blocks: 0,
            ..no_inodes
        };
        assert!(space_fields(empty).is_none());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn mount_selection_like_telegraf() {
        let filesystems =
            "nodev\tsysfs\nnodev\ttmpfs\n\text3\n\text4\nnodev\toverlay\n\tsquashfs\nnodev\tnfs4\n";
        let real = parse_real_filesystems(filesystems);
        assert!(real.contains("ext4") && real.contains("zfs") && !real.contains("tmpfs"));
        let mounts = "sysfs /sys sysfs rw 0 0\n\
                      /dev/vda / ext4 rw 0 0\n\
                      tmpfs /run tmpfs rw 0 0\n\
                      overlay /var/lib/docker/x overlay rw 0 0\n\
                      /dev/loop0 /snap/core squashfs ro 0 0\n\
                      srv:/x /mnt/nfs nfs4 rw 0 0\n\
                      /dev/vdb /mnt/my\\040disk ext4 rw 0 0\n\
                      /dev/vdc /data ext4 rw 0 0\n\
                      /dev/vdd /data ext3 rw 0 0\n\
                      pool/home /home zfs rw 0 0\n\
                      garbage\n\
                      two fields\n\
                      \n";
        let picked = select_mounts(parse_mounts(mounts), Some(&real));
        let got: Vec<(&str, &str, &str)> = picked
            .iter()
            .map(|m| (m.device, m.path.as_ref(), m.fstype))
            .collect();
        assert_eq!(
            got,
            vec![
                ("/dev/vda", "/", "ext4"),
                ("/dev/vdb", "/mnt/my disk", "ext4"),
                ("/dev/vdd", "/data", "ext3"),
                ("pool/home", "/home", "zfs"),
            ]
        );
        // Without /proc/filesystems the known virtual types are still dropped.
        let picked = select_mounts(parse_mounts(mounts), None);
        assert!(
            picked
                .iter()
                .all(|m| m.fstype != "sysfs" && m.fstype != "tmpfs")
        );
        assert!(picked.iter().any(|m| m.path == "/"));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn octal_escapes() {
        assert_eq!(unescape_octal("/plain"), "/plain");
        assert_eq!(unescape_octal("/a\\040b\\011c\\134d"), "/a b\tc\\d");
        // Truncated, non-octal or out-of-range escapes stay as they are.
        assert_eq!(unescape_octal("/x\\04"), "/x\\04");
        assert_eq!(unescape_octal("/x\\089"), "/x\\089");
        assert_eq!(unescape_octal("/x\\777"), "/x\\777");
        assert_eq!(unescape_octal("\\"), "\\");
        assert_eq!(unescape_octal("/é\\040"), "/é ");
    }
}
