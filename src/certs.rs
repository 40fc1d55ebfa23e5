//! `damselfly certs init`: a small CA and the certificates of one deployment, for the collector's `[tls]` and the
//! agents' `tls_ca_file` (and client certificates for mutual TLS). Keys are ECDSA P-256, written owner-only.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create ca.pem/ca-key.pem, collector.pem/collector-key.pem (for the given hosts) and agent.pem/agent-key.pem
    /// (a client certificate for mutual TLS) in a directory.
    Init(InitArgs),
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Where to write the files (created if missing; existing files are not overwritten).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Names and addresses the collector is reached by (repeat or comma-separate) [default: localhost,127.0.0.1].
    #[arg(long = "host", value_name = "NAME|IP", value_delimiter = ',')]
    hosts: Vec<String>,
    /// Days the certificates are valid.
    #[arg(long, value_name = "DAYS", default_value_t = 825)]
    days: u32,
}

pub fn main(command: CertsCommand) -> ExitCode {
    let CertsCommand::Init(args) = command;
    match init(&args) {
        Ok(files) => {
            for f in files {
                println!("{}", f.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("damselfly certs init: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init(args: &InitArgs) -> Result<Vec<PathBuf>, String> {
    let hosts = if args.hosts.is_empty() {
        vec!["localhost".to_string(), "127.0.0.1".to_string()]
    } else {
        args.hosts.iter().map(|h| h.trim().to_string()).collect()
    };
    let names = [
        "ca.pem",
        "ca-key.pem",
        "collector.pem",
        "collector-key.pem",
        "agent.pem",
        "agent-key.pem",
    ];
    for name in names {
        let path = args.out.join(name);
        if path.exists() {
            return Err(format!(
                "{} exists; not overwriting a deployment's keys (choose another --out)",
                path.display()
            ));
        }
    }
    let rcgen_err = |e: rcgen::Error| format!("cannot make the certificates: {e}");
    let now = time::OffsetDateTime::now_utc();
    let validity = |params: &mut CertificateParams| {
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(i64::from(args.days));
    };

    let ca_key = KeyPair::generate().map_err(rcgen_err)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(rcgen_err)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name
        .push(DnType::CommonName, "Damselfly deployment CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut ca);
    let ca_cert = ca.self_signed(&ca_key).map_err(rcgen_err)?;
    let issuer = Issuer::new(ca, &ca_key);

    let server_key = KeyPair::generate().map_err(rcgen_err)?;
    let mut server = CertificateParams::new(hosts.clone())
        .map_err(|e| format!("bad --host among {hosts:?}: {e}"))?;
    server
        .distinguished_name
        .push(DnType::CommonName, "Damselfly collector");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    validity(&mut server);
    let server_cert = server.signed_by(&server_key, &issuer).map_err(rcgen_err)?;

    let agent_key = KeyPair::generate().map_err(rcgen_err)?;
    let mut agent =
        CertificateParams::new(vec!["damselfly-agent".to_string()]).map_err(rcgen_err)?;
    agent
        .distinguished_name
        .push(DnType::CommonName, "Damselfly agent");
    agent.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    validity(&mut agent);
    let agent_cert = agent.signed_by(&agent_key, &issuer).map_err(rcgen_err)?;

    std::fs::create_dir_all(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?;
    let contents = [
        ca_cert.pem(),
        ca_key.serialize_pem(),
        server_cert.pem(),
        server_key.serialize_pem(),
        agent_cert.pem(),
        agent_key.serialize_pem(),
    ];
    let mut written = Vec::new();
    for (name, text) in names.iter().zip(contents) {
        let path = args.out.join(name);
        write_private(&path, text.as_bytes(), name.ends_with("-key.pem"))?;
        written.push(path);
    }
    Ok(written)
}

fn write_private(path: &Path, bytes: &[u8], secret: bool) -> Result<(), String> {
    damselfly_collector::fsutil::write_atomically(path, bytes)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    #[cfg(not(unix))]
    let _ = secret;
    Ok(())
}
