//! The compose cluster: `docker-compose.yml` parses and describes the topology that
//! `scripts/cluster.sh` runs with local processes (same services, ports and config), and that
//! script's cluster takes pgbench, a join of its PostgreSQL 18 server and the removal of a 15
//! with no client error and equal backends.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The compose file as docker-compose itself resolves it (anchors, defaults), as JSON.
fn compose() -> Value {
    let out = Command::new("docker-compose").current_dir(root()).args(["-f", "docker-compose.yml", "config"]).output();
    let out = out.expect("docker-compose (scripts/setup.sh installs it)");
    assert!(out.status.success(), "docker-compose config: {}", String::from_utf8_lossy(&out.stderr));
    let mut py = Command::new("python3")
        .args(["-c", "import json, sys, yaml; print(json.dumps(yaml.safe_load(sys.stdin)))"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    py.stdin.take().unwrap().write_all(&out.stdout).unwrap();
    let json = py.wait_with_output().unwrap();
    assert!(json.status.success());
    serde_json::from_slice(&json.stdout).unwrap()
}

fn port_of(addr: &str) -> u64 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

#[test]
fn the_compose_file_describes_what_cluster_sh_runs() {
    let c = compose();
    let services: BTreeSet<&str> = c["services"].as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(
        services,
        BTreeSet::from(["chorus-a", "chorus-b", "etcd1", "etcd2", "etcd3", "load", "pg1", "pg18", "pg2", "pg3", "prometheus"])
    );
    let cfg = chorus::config::Config::parse(&read("deploy/chorus.toml")).unwrap();
    let svc = |n: &str| &c["services"][n];
    let members: Vec<&str> = chorus::local::MEMBERS.iter().map(|(m, _)| *m).collect();

    // The backends of the config are the PostgreSQL 15 services, each with a health check
    // the members wait for, and a named volume.
    let backends: Vec<&str> = cfg.backends.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(backends, ["pg1", "pg2", "pg3"]);
    for b in &cfg.backends {
        assert_eq!((b.host.as_str(), b.port), (b.name.as_str(), 5432));
        assert_eq!(svc(&b.name)["image"], "postgres:15");
        assert!(svc(&b.name)["healthcheck"]["test"].to_string().contains("pg_isready"));
        for m in &members {
            assert_eq!(svc(m)["depends_on"][&b.name]["condition"], "service_healthy");
        }
        assert!(c["volumes"].get(&b.name).is_some(), "a named volume for {}", b.name);
    }
    // The spare: PostgreSQL 18, not a backend, the one cluster.sh starts with --spare.
    assert_eq!(svc("pg18")["image"], "postgres:18");
    assert!(read("scripts/cluster.sh").contains("--spare pg18:18"));

    // etcd: the config's endpoints are the three etcd services, which form one cluster, each
    // with its data on a named volume (cluster.sh starts three local members).
    let ha = cfg.ha.as_ref().expect("[ha] in deploy/chorus.toml");
    assert_eq!(ha.etcd_endpoints, ["http://etcd1:2379", "http://etcd2:2379", "http://etcd3:2379"]);
    for e in ["etcd1", "etcd2", "etcd3"] {
        let cmd = svc(e)["command"].to_string();
        assert!(cmd.contains(&format!("--advertise-client-urls=http://{e}:2379")), "{cmd}");
        assert!(
            cmd.contains("--initial-cluster=etcd1=http://etcd1:2380,etcd2=http://etcd2:2380,etcd3=http://etcd3:2380"),
            "{cmd}"
        );
        assert!(svc(e)["volumes"].to_string().contains(&format!("{e}:/etcd-data")));
        assert!(c["volumes"].get(e).is_some());
    }

    // The members: the same config file mounted where the image reads it, each its host name
    // as its node name, its state on a named volume of its own, its two ports published where
    // cluster.sh puts them, its secrets from the environment only.
    assert!(read("Dockerfile").contains("\"--config\", \"/etc/chorus/chorus.toml\""));
    let (pg, admin) = (port_of(&cfg.listen), port_of(&cfg.admin_listen));
    for (m, up) in chorus::local::MEMBERS {
        assert_eq!(svc(m)["hostname"], m, "node_name is the host name");
        let vols = svc(m)["volumes"].to_string();
        assert!(vols.contains("deploy/chorus.toml:/etc/chorus/chorus.toml:ro"), "{vols}");
        assert!(vols.contains(&format!("{m}:{}", cfg.data_dir.display())), "{vols}");
        assert!(c["volumes"].get(m).is_some());
        let ports: BTreeSet<(u64, u64)> = svc(m)["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p["published"].as_u64().unwrap(), p["target"].as_u64().unwrap()))
            .collect();
        assert_eq!(ports, BTreeSet::from([(pg + u64::from(up), pg), (admin + u64::from(up), admin)]));
        let env = &svc(m)["environment"];
        assert!(env.get("CHORUS_ADMIN_TOKEN").is_some() && env.get("CHORUS_PASSWORD_POSTGRES").is_some());
        for e in ["etcd1", "etcd2", "etcd3"] {
            assert!(svc(m)["depends_on"].get(e).is_some(), "{m} starts after {e}");
        }
    }
    assert!(cfg.admin_token.is_empty() && cfg.users.iter().all(|u| u.password.is_empty()), "no secret in the file");

    // The load goes through both members (libpq finds the leader); Prometheus scrapes both.
    assert!(svc("load")["command"].to_string().contains(&format!("host=chorus-a,chorus-b port={pg},{pg}")));
    let prom = read("deploy/prometheus.yml");
    assert!(
        prom.contains(&format!("[\"chorus-a:{admin}\", \"chorus-b:{admin}\"]")) && prom.contains("metrics_path: /metrics"),
        "{prom}"
    );
}

fn sh(cmd: &mut Command) -> String {
    let (ok, out) = common::sh(cmd);
    assert!(ok, "{out}");
    out
}

#[test]
fn cluster_sh_up_pgbench_join_remove_verify_down() {
    let dir = tempfile::tempdir().unwrap();
    let bin = common::chorus_bin();
    let ctl = bin.with_file_name("chorusctl");
    let script = |arg: &str| {
        let mut c = Command::new("bash");
        c.arg(root().join("scripts/cluster.sh"))
            .arg(arg)
            .env("CHORUS_CLUSTER_DIR", dir.path())
            .env("CHORUS_BIN", bin)
            .env("CHORUSCTL_BIN", &ctl);
        c
    };
    // A failed assertion below (or a failed start) still takes the cluster down (its load
    // runs for a day), and shows what its members logged.
    struct Down<'a>(&'a dyn Fn(&str) -> Command, bool, &'a Path);
    impl Drop for Down<'_> {
        fn drop(&mut self) {
            if !self.1 {
                let _ = (self.0)("down").output();
                for log in ["chorus.log", "chorus-a.log", "chorus-b.log"] {
                    let text = std::fs::read_to_string(self.2.join(log)).unwrap_or_default();
                    eprintln!("--- {log}:\n{text}");
                }
            }
        }
    }
    let mut guard = Down(&script, false, dir.path());
    let up = sh(&mut script("up"));
    assert!(up.contains("The cluster is up"), "{up}");
    let env = std::fs::read_to_string(dir.path().join("cluster.env")).unwrap();
    let var = |k: &str| env.lines().find_map(|l| l.strip_prefix(&format!("{k}="))).unwrap().to_string();
    let addr = var("CHORUS_ADDR");
    let (host, port) = addr.rsplit_once(':').unwrap();
    let chorusctl = |args: &[&str]| {
        let mut c = Command::new(&ctl);
        c.args(args).env("CHORUS_ADMIN", var("CHORUS_ADMIN")).env("CHORUS_ADMIN_TOKEN", var("CHORUS_ADMIN_TOKEN"));
        sh(&mut c)
    };
    let bench = Command::new(chorus_testkit::default_bin_dir().unwrap().join("pgbench"))
        .args(["-n", "-b", "tpcb-like", "-c", "4", "-R", "100", "-T", "20", "-h", host, "-p", port, "-U", "postgres", "postgres"])
        .env("PGPASSWORD", "postgres")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let joined = chorusctl(&["join", &var("SPARE_NAME"), "--host", "127.0.0.1", "--port", &var("SPARE_PORT")]);
    assert!(joined.contains("pg18 is in sync"), "{joined}");
    assert!(chorusctl(&["remove", "pg3"]).contains("pg3 removed"));
    let out = bench.wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("number of failed transactions: 0"), "{text}");
    let verified = chorusctl(&["verify"]);
    assert!(verified.contains("every table equal on every in-sync backend"), "{verified}");
    let backends = chorusctl(&["--json", "backends"]);
    let list: Value = serde_json::from_str(&backends).unwrap();
    let states: Vec<(String, String)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["name"].as_str().unwrap().into(), b["state"].as_str().unwrap().into()))
        .collect();
    let want = [("pg1", "in_sync"), ("pg2", "in_sync"), ("pg3", "removed"), ("pg18", "in_sync")];
    assert_eq!(states, want.map(|(a, b)| (a.to_string(), b.to_string())));
    assert!(list[3]["version"].as_str().unwrap().starts_with("18"), "{backends}");
    guard.1 = true;
    let down = sh(&mut script("down"));
    assert!(down.contains("load: no client error") && down.contains("cluster.sh: down"), "{down}");
    assert!(!Path::new(&dir.path().join("cluster.env")).exists());
}

/// Every metric the Grafana dashboard queries is one docs/operations.md documents, and every
/// documented metric has a panel.
#[test]
fn the_grafana_dashboard_uses_the_documented_metrics() {
    let names = |text: &str| -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for (i, _) in text.match_indices("chorus_") {
            let name: String = text[i..].chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect();
            let base =
                ["_bucket", "_sum", "_count"].iter().fold(name.clone(), |n, s| n.strip_suffix(s).map_or(n.clone(), String::from));
            out.insert(base);
        }
        out
    };
    let dashboard: Value = serde_json::from_str(&read("docs/grafana-dashboard.json")).unwrap();
    let queried = names(&dashboard["panels"].to_string());
    let ops = read("docs/operations.md");
    let table = &ops[ops.find("## Metrics").unwrap()..];
    let documented = names(&table[..table[3..].find("\n## ").unwrap()]);
    assert_eq!(queried, documented);
}
