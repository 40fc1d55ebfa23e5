//! `rtt` and `mrtt`: network round-trip time in milliseconds, measured as the time of a TCP connect (SYN out,
//! SYN-ACK back: one round trip plus both kernels' work). No raw sockets or ICMP, so no privileges; the other side
//! only needs a listening port (the agent's pull port, sshd, ...). Nothing is sent: the connection is closed at once.
//!
//! Each `host:port` is resolved once, before timing (DNS is not the network's round trip). Then the targets are
//! connected to in turns, [`GAP`] apart, until each has [`SAMPLES`] attempts or the deadline comes; a connect
//! waits at most [`CONNECT_TIMEOUT`] (less near the deadline). A target that fails [`GIVE_UP_AFTER`] times without
//! one success is given up.
//!
//! The value is the median of the targets' medians (each reachable target counts once). `detail`: `p50` (the
//! value), `p99`, `min`, `max` and `samples` over every successful connect, `unreachable` (how many targets never
//! answered), and per target `<host:port>` (its median), `<host:port>.p99`, or `<host:port>.unreachable` = 1. The
//! result is an error only when no target answered.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use super::{Outcome, quantile};

/// Connect attempts per target.
pub const SAMPLES: usize = 20;
/// Pause between two rounds of connects: spreads the samples and keeps the load on the targets negligible.
pub const GAP: Duration = Duration::from_millis(20);
/// Longest wait for one connect.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Failures without a success after which a target is given up.
pub const GIVE_UP_AFTER: usize = 3;

/// Whether `s` looks like `host:port` (`[v6]:port` too), with a port from 1 to 65535.
pub(crate) fn is_host_port(s: &str) -> bool {
    match s.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0),
        None => false,
    }
}

/// One target's state.
struct Target<'a> {
    name: &'a str,
    addr: Option<SocketAddr>,
    samples: Vec<f64>,
    failures: usize,
    last_error: Option<String>,
}

impl Target<'_> {
    /// Whether it should be tried again.
    fn active(&self) -> bool {
        self.addr.is_some()
            && self.samples.len() + self.failures < SAMPLES
            && !(self.samples.is_empty() && self.failures >= GIVE_UP_AFTER)
    }

    fn fail(&mut self, error: String) {
        self.failures += 1;
        self.last_error = Some(error);
    }
}

/// Connect times to `targets` until each has its samples or the deadline comes.
pub(crate) async fn rtt(targets: &[String], deadline: Instant) -> Outcome {
    let deadline = tokio::time::Instant::from_std(deadline);
    let mut state: Vec<Target<'_>> = Vec::with_capacity(targets.len());
    for name in targets {
        let mut t = Target {
            name,
            addr: None,
            samples: Vec::new(),
            failures: 0,
            last_error: None,
        };
        match tokio::time::timeout_at(deadline, tokio::net::lookup_host(name.as_str())).await {
            Ok(Ok(mut addrs)) => match addrs.next() {
                Some(a) => t.addr = Some(a),
                None => t.last_error = Some("the name has no address".into()),
            },
            Ok(Err(e)) => t.last_error = Some(format!("cannot resolve: {e}")),
            Err(_) => t.last_error = Some("time limit reached while resolving".into()),
        }
        state.push(t);
    }

    'rounds: loop {
        let mut tried = false;
        for t in state.iter_mut().filter(|t| t.active()) {
            let Some(addr) = t.addr else { continue };
            let now = tokio::time::Instant::now();
            if now >= deadline {
                break 'rounds;
            }
            tried = true;
            let near_deadline = deadline - now < CONNECT_TIMEOUT;
            let t0 = Instant::now();
            match tokio::time::timeout(
                CONNECT_TIMEOUT.min(deadline - now),
                TcpStream::connect(addr),
            )
            .await
            {
                Ok(Ok(stream)) => {
                    t.samples.push(t0.elapsed().as_secs_f64() * 1e3);
                    drop(stream);
                }
                Ok(Err(e)) => t.fail(format!("connect to {addr}: {e}")),
                // A connect cut short by the deadline says nothing about the target.
                Err(_) if near_deadline => break 'rounds,
                Err(_) => t.fail(format!(
                    "connect to {addr}: no answer in {CONNECT_TIMEOUT:?}"
                )),
            }
        }
        if !tried {
            break;
        }
        tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + GAP)).await;
    }
    summarize(&state)
}

/// The value and detail from every target's samples.
fn summarize(state: &[Target<'_>]) -> Outcome {
    let mut detail = BTreeMap::new();
    let mut medians = Vec::new();
    let mut all = Vec::new();
    let mut unreachable = Vec::new();
    for t in state {
        if t.samples.is_empty() {
            detail.insert(format!("{}.unreachable", t.name), 1.0);
            let why = t
                .last_error
                .as_deref()
                .unwrap_or("no answer before the time limit");
            tracing::warn!(target_addr = t.name, error = why, "rtt target unreachable");
            unreachable.push(format!("{} ({why})", t.name));
            continue;
        }
        let mut sorted = t.samples.clone();
        sorted.sort_by(f64::total_cmp);
        let median = quantile(&sorted, 0.5);
        detail.insert(t.name.to_owned(), median);
        detail.insert(format!("{}.p99", t.name), quantile(&sorted, 0.99));
        medians.push(median);
        all.extend(sorted);
    }
    if medians.is_empty() {
        return Err(format!("unreachable: {}", unreachable.join(", ")));
    }
    medians.sort_by(f64::total_cmp);
    all.sort_by(f64::total_cmp);
    let value = quantile(&medians, 0.5);
    detail.insert("p50".into(), value);
    detail.insert("p99".into(), quantile(&all, 0.99));
    detail.insert("min".into(), all[0]);
    detail.insert("max".into(), all[all.len() - 1]);
    detail.insert("samples".into(), all.len() as f64);
    detail.insert("unreachable".into(), unreachable.len() as f64);
    Ok((value, detail))
}
