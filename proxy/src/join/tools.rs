//! pg_dump, pg_restore and psql: finding the right version and running them.
//!
//! A dump must be restored by a pg_restore at least as new as the newer server, so a join
//! between major versions uses the newer version's tools for both ends. Chorus finds them in
//! `pg_tools` or the usual Debian places and asks each `pg_dump --version`.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Command;

use super::JoinError;
use crate::cluster::Backend;
use crate::config::Config;

/// Where one major version's client tools live.
#[derive(Debug, Clone)]
pub struct Tools {
    pub dir: PathBuf,
    pub major: u32,
}

fn candidate_dirs(cfg: &Config) -> Vec<PathBuf> {
    if !cfg.pg_tools.is_empty() {
        return cfg.pg_tools.clone();
    }
    let mut dirs = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/usr/lib/postgresql") {
        for e in rd.flatten() {
            dirs.push(e.path().join("bin"));
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    dirs
}

/// "pg_dump (PostgreSQL) 18.1" → 18
fn major_of(version_line: &str) -> Option<u32> {
    let v = version_line.split_whitespace().nth(2)?;
    v.split(['.', 'b', 'r', 'd']).next()?.parse().ok()
}

/// The tools of version `want` or, failing that, the oldest newer one.
pub async fn find(cfg: &Config, want: u32) -> Result<Tools, JoinError> {
    let mut found: Vec<Tools> = Vec::new();
    for dir in candidate_dirs(cfg) {
        let exe = dir.join("pg_dump");
        if !exe.is_file() || !dir.join("pg_restore").is_file() {
            continue;
        }
        let Ok(out) = Command::new(&exe).arg("--version").output().await else { continue };
        if let Some(major) = major_of(&String::from_utf8_lossy(&out.stdout)) {
            found.push(Tools { dir, major });
        }
    }
    found.sort_by_key(|t| t.major);
    found.into_iter().find(|t| t.major >= want).ok_or_else(|| {
        JoinError::Setup(format!(
            "no pg_dump/pg_restore of PostgreSQL {want} or newer found; set pg_tools to the directory holding them"
        ))
    })
}

/// Connection options for a tool run against `b` as the join user.
fn conn_args(cmd: &mut Command, cfg: &Config, b: &Backend) {
    let user = cfg.health_user();
    cmd.arg("-h").arg(&b.host).arg("-p").arg(b.port.to_string()).arg("-U").arg(&user.name).arg("--no-password");
    // The password goes through the environment, never the command line (ps shows that).
    cmd.env("PGPASSWORD", &user.password).env("PGCONNECT_TIMEOUT", cfg.connect_timeout.as_secs().max(1).to_string());
    // The backend's TLS settings, as libpq reads them.
    cmd.envs(crate::tls::backend::tool_env(&b.tls));
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).kill_on_drop(true);
}

async fn run(mut cmd: Command, what: &str) -> Result<String, JoinError> {
    let out = cmd.output().await.map_err(|e| JoinError::Tool(format!("{what}: cannot start: {e}")))?;
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if !out.status.success() {
        let tail: String = stderr.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join(" | ");
        return Err(JoinError::Tool(format!("{what} failed ({}): {tail}", out.status)));
    }
    Ok(stderr)
}

/// pg_dump of one database in directory format with parallel jobs, from a snapshot if given,
/// leaving out the rows of the tables `copy` takes.
pub async fn dump(
    t: &Tools,
    cfg: &Config,
    donor: &Backend,
    db: &str,
    dir: &Path,
    snapshot: Option<&str>,
    copied: &[super::copy::Table],
) -> Result<(), JoinError> {
    let mut cmd = Command::new(t.dir.join("pg_dump"));
    conn_args(&mut cmd, cfg, donor);
    cmd.arg("-Fd").arg("-j").arg(cfg.join_jobs.to_string()).arg("-f").arg(dir).arg("-d").arg(dbname_conninfo(db));
    if let Some(s) = snapshot {
        cmd.arg(format!("--snapshot={s}"));
    }
    for table in copied {
        cmd.arg(format!("--exclude-table-data={}", table.name));
    }
    run(cmd, &format!("pg_dump of database {db} from {}", donor.name)).await.map(|_| ())
}

/// pg_restore of one section (pre-data, data or post-data) of a dumped database into the
/// newcomer, with parallel jobs.
pub async fn restore(t: &Tools, cfg: &Config, newcomer: &Backend, db: &str, dir: &Path, section: &str) -> Result<(), JoinError> {
    let mut cmd = Command::new(t.dir.join("pg_restore"));
    conn_args(&mut cmd, cfg, newcomer);
    cmd.arg("-j").arg(cfg.join_jobs.to_string()).arg(format!("--section={section}")).arg("--exit-on-error");
    cmd.arg("-d").arg(dbname_conninfo(db)).arg(dir);
    run(cmd, &format!("pg_restore ({section}) of database {db} into {}", newcomer.name)).await.map(|_| ())
}

/// Copies the donor's roles to the newcomer (those that exist there already stay as they are).
pub async fn copy_roles(t: &Tools, cfg: &Config, donor: &Backend, newcomer: &Backend, work: &Path) -> Result<(), JoinError> {
    let file = work.join("roles.sql");
    let mut cmd = Command::new(t.dir.join("pg_dumpall"));
    conn_args(&mut cmd, cfg, donor);
    cmd.arg("--roles-only").arg("-f").arg(&file).arg("-l").arg(dbname_conninfo(&cfg.health_check_database));
    run(cmd, &format!("pg_dumpall --roles-only from {}", donor.name)).await?;
    let mut cmd = Command::new(t.dir.join("psql"));
    conn_args(&mut cmd, cfg, newcomer);
    // "role already exists" errors are expected for the roles both servers have.
    cmd.arg("-X").arg("-q").arg("-d").arg(dbname_conninfo(&cfg.health_check_database)).arg("-f").arg(&file);
    run(cmd, &format!("loading roles into {}", newcomer.name)).await.map(|_| ())
}

/// A database name as a connection string that holds nothing but it: libpq reads a `-d` value
/// holding `=` (or starting with `postgresql://`) as a connection string, so a database named
/// `host=elsewhere` would otherwise send the tools to another server.
pub fn dbname_conninfo(db: &str) -> String {
    format!("dbname='{}'", db.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// Total size of the files under `dir` (bytes dumped so far).
pub fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_names_stay_names() {
        assert_eq!(dbname_conninfo("bench"), "dbname='bench'");
        assert_eq!(dbname_conninfo("host=evil port=1"), "dbname='host=evil port=1'");
        assert_eq!(dbname_conninfo(r"it's\"), r"dbname='it\'s\\'");
    }

    #[test]
    fn reads_major_versions() {
        assert_eq!(major_of("pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"), Some(15));
        assert_eq!(major_of("pg_dump (PostgreSQL) 18.1"), Some(18));
        assert_eq!(major_of("pg_dump (PostgreSQL) 19beta1"), Some(19));
        assert_eq!(major_of("garbage"), None);
    }
}
