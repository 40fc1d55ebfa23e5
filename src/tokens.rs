//! `damselfly tokens create|list|revoke`: the collector's token file, edited where the collector runs (the file
//! holds only the tokens' hashes; a token is shown once, when created). A running collector picks up changes.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use damselfly_collector::auth::{Role, Tokens};

#[derive(Debug, Subcommand)]
pub enum TokensCommand {
    /// Create a token and print it (only its hash is kept: store it now).
    Create(CreateArgs),
    /// List the tokens (ids, names, roles, namespaces; never secrets).
    List(FileArgs),
    /// Revoke a token by id; requests with it are refused from then on.
    Revoke {
        /// The token's id (the 12 hex digits after `dfy_`).
        id: String,
        #[command(flatten)]
        file: FileArgs,
    },
}

#[derive(Debug, Args)]
pub struct FileArgs {
    /// The collector's data directory (the file is `<dir>/tokens.json`) [default: ./damselfly-data].
    #[arg(long, value_name = "DIR", env = "DAMSELFLY_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// The token file itself (the collector's `tokens_file`), instead of --data-dir.
    #[arg(long, value_name = "FILE", conflicts_with = "data_dir")]
    tokens_file: Option<PathBuf>,
}

impl FileArgs {
    fn tokens(&self) -> Tokens {
        let path = self.tokens_file.clone().unwrap_or_else(|| {
            self.data_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from("damselfly-data"))
                .join("tokens.json")
        });
        Tokens::new(path)
    }
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// agent (writes one namespace), read, write or admin.
    #[arg(long, value_name = "ROLE")]
    role: String,
    /// A namespace the token is limited to (repeat for several; exactly one for an agent token).
    #[arg(long = "ns", value_name = "NS")]
    namespaces: Vec<String>,
    /// How long the token works, e.g. 90d or 12h (units s, m, h, d); from then on it is refused with a message
    /// saying it expired [default: never].
    #[arg(long, value_name = "DURATION")]
    expires_in: Option<String>,
    /// A name to recognise it by in listings.
    #[arg(long, value_name = "TEXT", default_value = "")]
    name: String,
    /// Print only the token (for scripts).
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    file: FileArgs,
}

pub fn main(command: TokensCommand) -> ExitCode {
    match run(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("damselfly tokens: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: TokensCommand) -> Result<(), String> {
    match command {
        TokensCommand::Create(args) => {
            let role = Role::parse(&args.role).map_err(|e| e.to_string())?;
            let tokens = args.file.tokens();
            let expires_unix = args
                .expires_in
                .as_deref()
                .map(|text| {
                    let d = damselfly_collector::alerts::rules::parse_duration(text)
                        .map_err(|e| format!("--expires-in: {e}"))?;
                    if d.as_secs() == 0 {
                        return Err("--expires-in: give at least 1s".to_string());
                    }
                    Ok(damselfly_collector::model::unix_ms_now() / 1000 + d.as_secs())
                })
                .transpose()?;
            let (record, token) = tokens
                .create(&args.name, role, args.namespaces, expires_unix)
                .map_err(|e| e.to_string())?;
            if args.quiet {
                println!("{token}");
            } else {
                println!("{token}");
                eprintln!(
                    "created token {} (role {}, namespaces {}, {}) in {}; it is not shown again",
                    record.id,
                    record.role.name(),
                    namespaces_text(&record.namespaces),
                    record.expires_unix.map_or_else(
                        || "never expires".to_string(),
                        |t| format!("expires {}", damselfly_collector::auth::unix_text(t))
                    ),
                    tokens.path().display()
                );
            }
            Ok(())
        }
        TokensCommand::List(file) => {
            let records = file.tokens().records().map_err(|e| e.to_string())?;
            println!(
                "{:<12}  {:<6}  {:<20}  {:<8}  {:<20}  NAME",
                "ID", "ROLE", "NAMESPACES", "STATE", "EXPIRES"
            );
            let now = damselfly_collector::model::unix_ms_now() / 1000;
            for r in records {
                let state = if r.revoked {
                    "revoked"
                } else if r.expires_unix.is_some_and(|t| now >= t) {
                    "expired"
                } else {
                    "active"
                };
                println!(
                    "{:<12}  {:<6}  {:<20}  {:<8}  {:<20}  {}",
                    r.id,
                    r.role.name(),
                    namespaces_text(&r.namespaces),
                    state,
                    r.expires_unix
                        .map_or_else(|| "never".to_string(), damselfly_collector::auth::unix_text),
                    r.name
                );
            }
            Ok(())
        }
        TokensCommand::Revoke { id, file } => {
            if file.tokens().revoke(&id).map_err(|e| e.to_string())? {
                eprintln!("revoked token {id}");
                Ok(())
            } else {
                Err(format!("no active token with id {id:?}"))
            }
        }
    }
}

fn namespaces_text(namespaces: &[String]) -> String {
    if namespaces.is_empty() {
        "(all)".into()
    } else {
        namespaces.join(",")
    }
}
