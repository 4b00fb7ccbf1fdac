//! chorusctl: the operator's command line for a running Chorus, over its admin API.
//!
//! Human tables by default, `--json` for scripts. Exit code 0 on success; on failure one line
//! on stderr saying why and a non-zero code.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(name = "chorusctl", version, about = "Drive a running Chorus: backends, joins, removal, verify")]
struct Cli {
    /// The admin API's address.
    #[arg(long, global = true, env = "CHORUS_ADMIN", default_value = "http://127.0.0.1:6433")]
    admin: String,
    /// The admin token (or CHORUS_ADMIN_TOKEN).
    #[arg(long, global = true, env = "CHORUS_ADMIN_TOKEN", hide_env_values = true, default_value = "")]
    token: String,
    /// CA certificate(s) (PEM) to check an https:// admin API's certificate against.
    #[arg(long, global = true, env = "CHORUS_CACERT")]
    cacert: Option<std::path::PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List backends with their state, version and lag.
    Backends,
    /// Chorus's own state: sessions, backends in sync, the last join.
    Status,
    /// Bring a backend into the cluster online and wait until it is in sync.
    Join {
        name: String,
        #[arg(long)]
        host: String,
        #[arg(long)]
        port: u16,
        /// detach (default with two or more in-sync backends) or snapshot.
        #[arg(long)]
        method: Option<String>,
        /// The in-sync backend to copy from (default: the lowest-priority one).
        #[arg(long)]
        donor: Option<String>,
        /// Restore into databases that already hold tables.
        #[arg(long)]
        force: bool,
        /// Attach without comparing checksums with the lead first.
        #[arg(long)]
        skip_verify: bool,
        /// Return once the join has started.
        #[arg(long)]
        no_wait: bool,
    },
    /// Take a backend out of the cluster (gracefully: after the writes in flight).
    Remove {
        name: String,
        /// At once, without waiting for writes in flight.
        #[arg(long)]
        now: bool,
    },
    /// Bring a `down` backend back from the update history (no copy), then into the in-sync set.
    CatchUp { name: String },
    /// The group on etcd (`[ha]`): which member leads, the epoch, this member's lease, every
    /// member with a live lease.
    Ha,
    /// Hand the leadership to a standby (`[ha]`): the leader lets open transactions end, ends
    /// each session at a transaction boundary, and the standby serves; run it against the
    /// leader's admin API. Waits until the new leader serves.
    Switchover {
        /// The member to hand over to (default: any other member with a live lease).
        #[arg(long)]
        to: Option<String>,
    },
    /// Compare per-table checksums of every in-sync backend at one point.
    Verify {
        #[arg(long)]
        database: Vec<String>,
    },
}

struct Api {
    base: String,
    token: String,
    agent: ureq::Agent,
}

impl Api {
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<(u16, Value), String> {
        let url = format!("{}{}", self.base.trim_end_matches('/'), path);
        let auth = format!("Bearer {}", self.token);
        let res = match (method, body) {
            ("GET", _) => self.agent.get(&url).header("Authorization", &auth).call(),
            ("DELETE", _) => self.agent.delete(&url).header("Authorization", &auth).call(),
            (_, Some(b)) => self.agent.post(&url).header("Authorization", &auth).send_json(&b),
            (_, None) => self.agent.post(&url).header("Authorization", &auth).send_empty(),
        };
        let mut res = res.map_err(|e| format!("cannot reach the admin API at {}: {e}", self.base))?;
        let status = res.status().as_u16();
        let text = res.body_mut().read_to_string().map_err(|e| format!("reading the answer: {e}"))?;
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, value))
    }

    /// Calls and turns an error status into its message.
    fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let (status, v) = self.call(method, path, body)?;
        if (200..300).contains(&status) {
            return Ok(v);
        }
        let msg = v.get("error").and_then(Value::as_str).map(str::to_string).unwrap_or_else(|| v.to_string());
        Err(format!("{msg} (HTTP {status})"))
    }
}

/// The HTTP agent: an https:// admin API is checked against `--cacert` (the web's roots
/// without it).
fn agent(cacert: Option<&std::path::Path>) -> Result<ureq::Agent, String> {
    let mut config = ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(600)));
    if let Some(path) = cacert {
        let pem = std::fs::read(path).map_err(|e| format!("cannot read --cacert {}: {e}", path.display()))?;
        let certs: Vec<ureq::tls::Certificate<'static>> = ureq::tls::parse_pem(&pem)
            .filter_map(|item| match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => Some(Ok(c)),
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            })
            .collect::<Result<_, _>>()
            .map_err(|e| format!("--cacert {}: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!("--cacert {} holds no certificate", path.display()));
        }
        let tls = ureq::tls::TlsConfig::builder().root_certs(ureq::tls::RootCerts::Specific(std::sync::Arc::new(certs))).build();
        config = config.tls_config(tls);
    }
    Ok(config.build().into())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = agent(cli.cacert.as_deref()).and_then(|agent| {
        let api = Api { base: cli.admin.clone(), token: cli.token.clone(), agent };
        run(&cli, &api)
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chorusctl: {e}");
            ExitCode::FAILURE
        }
    }
}

fn s(v: &Value, k: &str) -> String {
    match v.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

/// Left-aligned columns, as wide as their widest cell.
fn table(head: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{:<width$}", c, width = w[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = line(head.iter().map(|h| h.to_string()).collect());
    for r in rows {
        out.push('\n');
        out.push_str(&line(r.clone()));
    }
    out
}

/// Starts the switchover on the leader, then follows `GET /ha` on the same admin API (which
/// goes quiet while the old leader starts again as a standby) until the target leads.
fn switchover(api: &Api, to: Option<&str>, json: bool) -> Result<(), String> {
    let started = api.ok("POST", "/switchover", Some(serde_json::json!({ "to": to })))?;
    let target = s(&started, "to");
    let epoch = started.get("epoch").and_then(Value::as_u64).unwrap_or(0);
    let timeout = Duration::from_millis(started.get("timeout_ms").and_then(Value::as_u64).unwrap_or(5000));
    if !json {
        println!("switchover from {} to {target}: draining (open transactions get {timeout:?})", s(&started, "from"));
    }
    let began = std::time::Instant::now();
    let deadline = began + timeout + Duration::from_secs(15);
    loop {
        if let Ok((200, v)) = api.call("GET", "/ha", None) {
            let now = v.get("epoch").and_then(Value::as_u64).unwrap_or(0);
            let leader = s(&v, "leader");
            if now > epoch && !leader.is_empty() {
                if json {
                    println!(
                        "{}",
                        serde_json::json!({ "leader": leader, "epoch": now, "took_ms": began.elapsed().as_millis() as u64 })
                    );
                } else {
                    println!("{leader} leads now (epoch {now}), {} ms after the drain began", began.elapsed().as_millis());
                }
                return if leader == target {
                    Ok(())
                } else {
                    Err(format!("the handover to {target} failed: {leader} won the leadership"))
                };
            }
        }
        if std::time::Instant::now() >= deadline {
            return Err(format!("no new leader after {:?}: see `chorusctl ha` and the members' logs", deadline - began));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn mib(n: u64) -> String {
    format!("{:.1} MiB", n as f64 / (1024.0 * 1024.0))
}

fn run(cli: &Cli, api: &Api) -> Result<(), String> {
    if api.token.is_empty() {
        return Err("no admin token: pass --token or set CHORUS_ADMIN_TOKEN".into());
    }
    match &cli.command {
        Command::Ha => {
            let v = api.ok("GET", "/ha", None)?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                return Ok(());
            }
            println!("cluster {}: this member {} is {}", s(&v, "cluster"), s(&v, "node"), s(&v, "role"));
            let leader = s(&v, "leader");
            if leader.is_empty() {
                println!("leader: none now");
            } else {
                println!("leader: {leader} at {} (epoch {})", s(&v, "leader_address"), s(&v, "epoch"));
            }
            println!("this member's lease: {} ms left", s(&v, "lease_left_ms"));
            let rows: Vec<Vec<String>> = v
                .get("members")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .map(|m| {
                            let node = s(m, "node");
                            let role = if node == leader { "leader" } else { "standby" };
                            vec![node, role.to_string(), s(m, "address"), s(m, "admin")]
                        })
                        .collect()
                })
                .unwrap_or_default();
            println!("{}", table(&["MEMBER", "ROLE", "CLIENTS", "ADMIN"], &rows));
            Ok(())
        }
        Command::Switchover { to } => switchover(api, to.as_deref(), cli.json),
        Command::Backends => {
            let v = api.ok("GET", "/backends", None)?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                return Ok(());
            }
            let rows: Vec<Vec<String>> = v
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|b| {
                            let mut state = s(b, "state");
                            if b.get("serves_reads") == Some(&Value::Bool(false)) && state == "in_sync" {
                                state.push_str(" (writes only, being checked)");
                            }
                            vec![
                                s(b, "name"),
                                s(b, "address"),
                                state,
                                s(b, "version"),
                                s(b, "inflight"),
                                s(b, "serial"),
                                s(b, "lag_units"),
                                s(b, "lag_bytes"),
                                s(b, "reason"),
                            ]
                        })
                        .collect()
                })
                .unwrap_or_default();
            println!(
                "{}",
                table(&["NAME", "ADDRESS", "STATE", "VERSION", "INFLIGHT", "SERIAL", "LAG UNITS", "LAG BYTES", "REASON"], &rows)
            );
            Ok(())
        }
        Command::Status => {
            let v = api.ok("GET", "/status", None)?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                return Ok(());
            }
            println!("Chorus {} up {}s, listening on {}", s(&v, "version"), s(&v, "uptime_seconds"), s(&v, "listen"));
            println!("sessions: {}; backends in sync: {} of {}", s(&v, "sessions"), s(&v, "in_sync"), s(&v, "backends"));
            if let Some(j) = v.get("join").filter(|j| !j.is_null()) {
                let running = v.get("join_running") == Some(&Value::Bool(true));
                println!(
                    "join of {} ({}, donor {}): {}{}",
                    s(j, "name"),
                    s(j, "method"),
                    s(j, "donor"),
                    s(j, "phase"),
                    if running { " (running)" } else { "" }
                );
                if !s(j, "error").is_empty() {
                    println!("  error: {}", s(j, "error"));
                }
            }
            Ok(())
        }
        Command::Join { name, host, port, method, donor, force, skip_verify, no_wait } => {
            let body = json!({
                "name": name, "host": host, "port": port, "method": method, "donor": donor,
                "force": force, "skip_verify": skip_verify,
            });
            api.ok("POST", "/backends", Some(body))?;
            if *no_wait {
                println!("join of {name} started");
                return Ok(());
            }
            wait_for_join(cli, api, name)
        }
        Command::Remove { name, now } => {
            let path = format!("/backends/{name}{}", if *now { "?now=true" } else { "" });
            let v = api.ok("DELETE", &path, None)?;
            if cli.json {
                println!("{v}");
            } else {
                println!("{name} removed");
            }
            Ok(())
        }
        Command::CatchUp { name } => {
            let v = api.ok("POST", &format!("/backends/{name}/catch-up"), None)?;
            if cli.json {
                println!("{v}");
            } else {
                println!(
                    "{name} caught up from the update history: {} units in {:.1}s, write pause {:.1} ms; in sync",
                    s(&v, "units"),
                    v.get("seconds").and_then(Value::as_f64).unwrap_or_default(),
                    v.get("attach_pause_ms").and_then(Value::as_f64).unwrap_or_default()
                );
            }
            Ok(())
        }
        Command::Verify { database } => {
            let v = api.ok("POST", "/verify", Some(json!({ "databases": database })))?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                print!("{}", s(&v, "report"));
            }
            if v.get("equal") == Some(&Value::Bool(true)) {
                if !cli.json {
                    println!("verify: every table equal on every in-sync backend");
                }
                Ok(())
            } else {
                Err(format!("tables differ between backends: {}", v.get("unequal").cloned().unwrap_or_default()))
            }
        }
    }
}

/// Follows the join with a progress bar until it is done or failed.
fn wait_for_join(cli: &Cli, api: &Api, name: &str) -> Result<(), String> {
    let bar = if cli.json { ProgressBar::hidden() } else { ProgressBar::new_spinner() };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}").unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    loop {
        let v = api.ok("GET", "/join", None)?;
        let p = v.get("progress").cloned().unwrap_or(Value::Null);
        if s(&p, "name") != name {
            return Err(format!("another join ({}) is reported; {name}'s is gone", s(&p, "name")));
        }
        let phase = s(&p, "phase");
        bar.set_message(format!(
            "{phase}: dumped {}, restored {}, written since {} units, applied {}, lag {} units",
            mib(p.get("bytes_dumped").and_then(Value::as_u64).unwrap_or(0)),
            mib(p.get("bytes_restored").and_then(Value::as_u64).unwrap_or(0)),
            s(&p, "log_units"),
            s(&p, "replayed_units"),
            s(&p, "replay_lag_units"),
        ));
        match phase.as_str() {
            "done" => {
                bar.finish_and_clear();
                if cli.json {
                    println!("{}", serde_json::to_string_pretty(&p).unwrap_or_default());
                } else {
                    println!(
                        "{name} is in sync after {:.1}s (write pauses: detach {:.1} ms, attach {:.1} ms)",
                        p.get("elapsed_seconds").and_then(Value::as_f64).unwrap_or(0.0),
                        p.get("detach_pause_ms").and_then(Value::as_f64).unwrap_or(0.0),
                        p.get("attach_pause_ms").and_then(Value::as_f64).unwrap_or(0.0)
                    );
                }
                return Ok(());
            }
            "failed" => {
                bar.finish_and_clear();
                if cli.json {
                    println!("{}", serde_json::to_string_pretty(&p).unwrap_or_default());
                }
                let donor = s(&p, "donor_outcome");
                return Err(format!(
                    "join of {name} failed: {}{}",
                    s(&p, "error"),
                    if donor.is_empty() { String::new() } else { format!(" ({donor})") }
                ));
            }
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}
