//! Host facts for registration: what the VM is, read once (not a measurement).

/// Static facts about the host, sent when the agent registers.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HostFacts {
    /// Logical CPUs.
    pub vcpus: u32,
    /// Total RAM in bytes.
    pub memory_bytes: u64,
    /// OS name, e.g. `Debian GNU/Linux`, `Darwin`, `Windows` (empty when unknown, as are the other strings).
    pub os_name: String,
    /// OS version, e.g. `13`, `24.04`.
    pub os_version: String,
    /// Kernel version, e.g. `6.12.48+deb13-amd64`.
    pub kernel_version: String,
    /// CPU brand string of the first CPU.
    pub cpu_model: String,
    /// CPU architecture, e.g. `x86_64`, `aarch64`.
    pub arch: String,
    /// This agent's version.
    pub agent_version: String,
}

/// Reads the host facts (a few small files on Linux; cheap, but call it once, not per round).
pub fn host_facts() -> HostFacts {
    let mut vcpus = 0u32;
    let mut memory_bytes = 0u64;
    let mut cpu_model = String::new();
    match sysinfo::System::new() {
        Ok(mut sys) => {
            sys.refresh_cpu_list(sysinfo::CpuRefreshKind::nothing());
            sys.refresh_memory_specifics(sysinfo::MemoryRefreshKind::nothing().with_ram());
            vcpus = u32::try_from(sys.cpus().len()).unwrap_or(u32::MAX);
            memory_bytes = sys.total_memory();
            cpu_model = sys
                .cpus()
                .first()
                .map(|c| c.brand().trim().to_owned())
                .unwrap_or_default();
        }
        Err(e) => tracing::debug!(error = %e, "no sysinfo for host facts"),
    }
    if vcpus == 0 {
        vcpus = std::thread::available_parallelism()
            .map_or(0, |n| u32::try_from(n.get()).unwrap_or(u32::MAX));
    }
    HostFacts {
        vcpus,
        memory_bytes,
        os_name: sysinfo::System::name().unwrap_or_default(),
        os_version: sysinfo::System::os_version().unwrap_or_default(),
        kernel_version: sysinfo::System::kernel_version().unwrap_or_default(),
        cpu_model,
        arch: sysinfo::System::cpu_arch(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn facts_of_this_host() {
        let f = super::host_facts();
        assert!(f.vcpus >= 1, "{f:?}");
        assert!(f.memory_bytes > 0, "{f:?}");
        assert!(!f.arch.is_empty(), "{f:?}");
        assert_eq!(f.agent_version, env!("CARGO_PKG_VERSION"));
        #[cfg(target_os = "linux")]
        assert!(!f.kernel_version.is_empty(), "{f:?}");
        let json = serde_json::to_value(&f).expect("serialises");
        assert_eq!(json["vcpus"], f.vcpus);
    }
}
