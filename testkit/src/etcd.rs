//! Real etcd members on loopback for the standby's tests: Debian's `etcd` binary, one process
//! per member, each with its own data directory, removed after (as the unprivileged user when
//! the tests run as root, like the PostgreSQL servers).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{as_server_user, chown_r, err, free_port, server_user, signal, Result};

/// A group of etcd members forming one etcd cluster.
pub struct Etcd {
    dir: tempfile::TempDir,
    members: Vec<EtcdMember>,
}

struct EtcdMember {
    name: String,
    client: u16,
    peer: u16,
    child: Option<Child>,
}

impl Etcd {
    /// Starts `n` members and waits until the cluster answers.
    pub async fn start(n: usize) -> Result<Etcd> {
        let dir = tempfile::Builder::new().prefix("chorus-etcd-").tempdir()?;
        let mut members = Vec::new();
        for i in 0..n {
            members.push(EtcdMember { name: format!("e{}", i + 1), client: free_port()?, peer: free_port()?, child: None });
        }
        chown_r(dir.path(), server_user()?)?;
        let mut e = Etcd { dir, members };
        for i in 0..n {
            e.spawn(i)?;
        }
        for i in 0..n {
            e.wait_healthy(i, Duration::from_secs(20)).await?;
        }
        Ok(e)
    }

    fn spawn(&mut self, i: usize) -> Result<()> {
        let initial: Vec<String> = self.members.iter().map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer)).collect();
        let m = &self.members[i];
        let data = self.dir.path().join(&m.name);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join(format!("{}.log", m.name)))?;
        let client = format!("http://127.0.0.1:{}", m.client);
        let peer = format!("http://127.0.0.1:{}", m.peer);
        let mut cmd = Command::new("etcd");
        cmd.arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&data)
            .arg("--listen-client-urls")
            .arg(&client)
            .arg("--advertise-client-urls")
            .arg(&client)
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(initial.join(","))
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--initial-cluster-token")
            .arg(self.dir.path().file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default())
            .env("ETCD_UNSUPPORTED_ARCH", std::env::consts::ARCH)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        as_server_user(&mut cmd, server_user()?);
        self.members[i].child = Some(cmd.spawn()?);
        Ok(())
    }

    async fn wait_healthy(&mut self, i: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let url = format!("http://127.0.0.1:{}/health", self.members[i].client);
        loop {
            if let Some(c) = self.members[i].child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    return Err(err(format!("etcd {} exited with {st}: {}", self.members[i].name, self.log(i))));
                }
            }
            if let Ok(body) = http_get(&url).await {
                if body.contains("\"health\":\"true\"") || body.contains("\"health\": \"true\"") {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(err(format!("etcd {} not healthy within {timeout:?}: {}", self.members[i].name, self.log(i))));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every member's client URL, as `[ha] etcd_endpoints` takes them (TOML array body).
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| format!("http://127.0.0.1:{}", m.client)).collect()
    }

    /// The `[ha]` line for `etcd_endpoints` over the members `which`.
    pub fn endpoints_toml(&self, which: &[usize]) -> String {
        let urls: Vec<String> = which.iter().map(|&i| format!("\"http://127.0.0.1:{}\"", self.members[i].client)).collect();
        format!("etcd_endpoints = [{}]", urls.join(", "))
    }

    /// Stops member `i` at once (SIGKILL), as a crash or a cut cable.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again on its data directory and waits until it answers.
    pub async fn restart(&mut self, i: usize) -> Result<()> {
        self.kill(i);
        // Rejoins the cluster it was a member of.
        // --initial-cluster-state is ignored once the data directory holds a member.
        self.spawn(i)?;
        self.wait_healthy(i, Duration::from_secs(20)).await
    }

    pub fn log(&self, i: usize) -> String {
        let p: PathBuf = self.dir.path().join(format!("{}.log", self.members[i].name));
        let s = std::fs::read_to_string(p).unwrap_or_default();
        s.lines().rev().take(20).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(mut c) = m.child.take() {
                signal(c.id() as i32, libc::SIGKILL);
                let _ = c.wait();
            }
        }
    }
}

/// A plain HTTP/1.0 GET on loopback: etcd's /health, Chorus's admin API without a token.
pub async fn http_get(url: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").ok_or_else(|| err("http:// only"))?;
    let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}"))).unwrap_or((rest, "/".into()));
    let mut s = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(host))
        .await
        .map_err(|_| err("connect timed out"))??;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes()).await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut out)).await.map_err(|_| err("read timed out"))??;
    Ok(String::from_utf8_lossy(&out).into_owned())
}
