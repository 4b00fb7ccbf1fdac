//! Backend states and their file in the data directory.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::ClusterError;

/// The contract's backend states. Only `InSync` takes client traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum BackendState {
    Joining = 0,
    InSync = 1,
    Down = 2,
    Diverged = 3,
    Detached = 4,
    Removed = 5,
    /// A donor whose join failed in a way that its copy cannot be trusted: only a join
    /// brings it back.
    NeedsRebuild = 6,
}

impl BackendState {
    pub fn from_u8(v: u8) -> BackendState {
        match v {
            0 => BackendState::Joining,
            1 => BackendState::InSync,
            2 => BackendState::Down,
            3 => BackendState::Diverged,
            4 => BackendState::Detached,
            5 => BackendState::Removed,
            _ => BackendState::NeedsRebuild,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            BackendState::Joining => "joining",
            BackendState::InSync => "in_sync",
            BackendState::Down => "down",
            BackendState::Diverged => "diverged",
            BackendState::Detached => "detached",
            BackendState::Removed => "removed",
            BackendState::NeedsRebuild => "needs_rebuild",
        }
    }

    pub const ALL: [BackendState; 7] = [
        BackendState::Joining,
        BackendState::InSync,
        BackendState::Down,
        BackendState::Diverged,
        BackendState::Detached,
        BackendState::Removed,
        BackendState::NeedsRebuild,
    ];

    pub fn parse(s: &str) -> Option<BackendState> {
        BackendState::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

impl std::fmt::Display for BackendState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateRecord {
    pub state: BackendState,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// Set for a backend that joined through the admin API and is not in the config file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<(String, u16)>,
    /// It left the in-sync set as `down` and holds every unit up to where it left, so the
    /// update history can bring it back (false for a newcomer whose join did not finish).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub catch_up: bool,
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    version: u32,
    backends: BTreeMap<String, StateRecord>,
}

/// Where the states are shared beyond this instance (etcd with `[ha]`): written before the
/// file, so before the change takes effect.
pub trait StateMirror: Send + Sync {
    fn save(&self, backends: &BTreeMap<String, StateRecord>) -> Result<(), String>;
}

/// `<data_dir>/backends.json`, replaced atomically (write, fsync, rename, fsync the directory),
/// and the mirror when there is one.
pub struct StateStore {
    dir: PathBuf,
    path: PathBuf,
    mirror: Option<Box<dyn StateMirror>>,
}

impl StateStore {
    pub fn open(dir: &Path) -> Result<StateStore, ClusterError> {
        std::fs::create_dir_all(dir).map_err(|source| ClusterError::DataDir { path: dir.into(), source })?;
        // Private to Chorus's user, also when it was made before with a looser mask.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|source| ClusterError::DataDir { path: dir.into(), source })?;
        Ok(StateStore { dir: dir.into(), path: dir.join("backends.json"), mirror: None })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved states, or None when the cluster has never run from this directory.
    pub fn load(&self) -> Result<Option<BTreeMap<String, StateRecord>>, ClusterError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(ClusterError::StateFile { path: self.path.clone(), message: e.to_string() }),
        };
        let file: StateFile = serde_json::from_str(&text)
            .map_err(|e| ClusterError::StateFile { path: self.path.clone(), message: e.to_string() })?;
        Ok(Some(file.backends))
    }

    pub fn set_mirror(&mut self, mirror: Box<dyn StateMirror>) {
        self.mirror = Some(mirror);
    }

    pub fn save(&self, backends: &BTreeMap<String, StateRecord>) -> Result<(), ClusterError> {
        if let Some(m) = &self.mirror {
            m.save(backends).map_err(ClusterError::SharedStates)?;
        }
        let err = |e: std::io::Error| ClusterError::StateFile { path: self.path.clone(), message: e.to_string() };
        let file = StateFile { version: 1, backends: backends.clone() };
        let text = serde_json::to_string_pretty(&file).map_err(|e| err(std::io::Error::other(e)))?;
        let tmp = self.dir.join("backends.json.tmp");
        let mut f = std::fs::File::create(&tmp).map_err(err)?;
        f.write_all(text.as_bytes()).map_err(err)?;
        f.write_all(b"\n").map_err(err)?;
        f.sync_all().map_err(err)?;
        std::fs::rename(&tmp, &self.path).map_err(err)?;
        if let Ok(d) = std::fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        assert_eq!(store.load().unwrap(), None);
        let mut m = BTreeMap::new();
        m.insert(
            "pg1".to_string(),
            StateRecord { state: BackendState::InSync, reason: String::new(), address: None, catch_up: false },
        );
        m.insert(
            "pg2".to_string(),
            StateRecord {
                state: BackendState::Diverged,
                reason: "UPDATE 1 vs UPDATE 2".into(),
                address: Some(("h".into(), 5)),
                catch_up: true,
            },
        );
        store.save(&m).unwrap();
        assert_eq!(store.load().unwrap(), Some(m));
        let text = std::fs::read_to_string(store.path()).unwrap();
        assert!(text.contains("\"diverged\"") && text.contains("\"in_sync\""), "{text}");
    }

    #[test]
    fn names_and_numbers_agree() {
        for v in 0..7u8 {
            let s = BackendState::from_u8(v);
            assert_eq!(s as u8, v);
            assert_eq!(BackendState::parse(s.as_str()), Some(s));
        }
    }
}
