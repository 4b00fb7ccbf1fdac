//! The diff log: every unit of work the sessions complete while a backend joins, in commit
//! order, on disk.
//!
//! Sessions append a unit when it reaches an idle point and before they release their write
//! locks, so conflicting transactions appear in the order they committed. The file grows with
//! the disk, not with memory; readers (the join's replayers) follow it from their own file
//! handle up to the length the writer has published. One log exists per join and is deleted
//! when the join ends.

mod record;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::sync::Notify;

pub use record::{LoggedRequest, Malformed, Record};

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Where sessions find the log of the join under way, if any. Checked once per unit of work.
#[derive(Default)]
pub struct Slot {
    on: std::sync::atomic::AtomicBool,
    log: std::sync::RwLock<Option<std::sync::Arc<DiffLog>>>,
}

impl Slot {
    #[inline]
    pub fn active(&self) -> bool {
        self.on.load(Ordering::Acquire)
    }

    pub fn current(&self) -> Option<std::sync::Arc<DiffLog>> {
        if !self.active() {
            return None;
        }
        self.log.read().ok().and_then(|l| l.clone())
    }

    /// Starts (Some) or stops (None) logging. Called while the join holds every write back.
    pub fn set(&self, log: Option<std::sync::Arc<DiffLog>>) {
        let on = log.is_some();
        if let Ok(mut l) = self.log.write() {
            *l = log;
        }
        self.on.store(on, Ordering::Release);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("diff log {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Malformed(#[from] Malformed),
    #[error("the diff log failed: {0}")]
    Failed(String),
}

pub struct DiffLog {
    /// Unique per log, so a session knows whether it has opened itself in this one.
    pub id: u64,
    path: PathBuf,
    file: Mutex<std::fs::File>,
    /// Bytes written and visible to readers.
    len: AtomicU64,
    /// Units appended.
    units: AtomicU64,
    /// The first write error: the join that owns the log fails with it.
    failed: Mutex<Option<String>>,
    grew: Notify,
}

impl DiffLog {
    pub fn create(path: &Path) -> Result<DiffLog, LogError> {
        let io = |source| LogError::Io { path: path.into(), source };
        let file = std::fs::OpenOptions::new().create(true).truncate(true).write(true).open(path).map_err(io)?;
        Ok(DiffLog {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            path: path.into(),
            file: Mutex::new(file),
            len: AtomicU64::new(0),
            units: AtomicU64::new(0),
            failed: Mutex::new(None),
            grew: Notify::new(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends encoded records (one write, so records of different sessions never interleave).
    /// A failure is remembered for the join rather than returned to a client: the client's
    /// transaction has committed on the in-sync backends already.
    pub fn append(&self, bytes: &[u8], units: u64) {
        let Ok(mut f) = self.file.lock() else { return };
        if self.failed().is_some() {
            return;
        }
        match f.write_all(bytes) {
            Ok(()) => {
                self.len.fetch_add(bytes.len() as u64, Ordering::AcqRel);
                self.units.fetch_add(units, Ordering::AcqRel);
                metrics::counter!("chorus_difflog_units_total").increment(units);
                metrics::counter!("chorus_difflog_bytes_total").increment(bytes.len() as u64);
            }
            Err(e) => self.fail(format!("cannot append to {}: {e}", self.path.display())),
        }
        drop(f);
        self.grew.notify_waiters();
    }

    pub fn fail(&self, why: String) {
        if let Ok(mut f) = self.failed.lock() {
            if f.is_none() {
                tracing::error!(reason = %why, "diff log failed; the join will stop");
                *f = Some(why);
            }
        }
        self.grew.notify_waiters();
    }

    pub fn failed(&self) -> Option<String> {
        self.failed.lock().ok().and_then(|f| f.clone())
    }

    /// Bytes appended so far (the head readers chase).
    pub fn len(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn units(&self) -> u64 {
        self.units.load(Ordering::Acquire)
    }

    pub async fn reader(&self) -> Result<LogReader<'_>, LogError> {
        let file = tokio::fs::File::open(&self.path).await.map_err(|source| LogError::Io { path: self.path.clone(), source })?;
        Ok(LogReader { log: self, file, buf: BytesMut::with_capacity(64 << 10), read: 0, consumed: 0 })
    }
}

impl Drop for DiffLog {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A replayer's position in the log.
pub struct LogReader<'a> {
    log: &'a DiffLog,
    file: tokio::fs::File,
    buf: BytesMut,
    /// Bytes read from the file; bytes handed out as records.
    read: u64,
    consumed: u64,
}

impl LogReader<'_> {
    /// Bytes of the log already handed out as records.
    pub fn position(&self) -> u64 {
        self.consumed
    }

    /// The next record, waiting for one to be appended when at the head. None once the head
    /// is reached and `stop` is cancelled.
    pub async fn next(&mut self, stop: &tokio_util::sync::CancellationToken) -> Result<Option<Record>, LogError> {
        loop {
            let before = self.buf.len();
            if let Some(r) = Record::decode(&mut self.buf)? {
                self.consumed += (before - self.buf.len()) as u64;
                return Ok(Some(r));
            }
            if let Some(why) = self.log.failed() {
                return Err(LogError::Failed(why));
            }
            // Registered before the length is read, so an append in between is not missed.
            let notified = self.log.grew.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let head = self.log.len();
            if self.read < head {
                let want = ((head - self.read) as usize).min(1 << 20);
                self.buf.reserve(want);
                let n = (&mut self.file)
                    .take(want as u64)
                    .read_buf(&mut self.buf)
                    .await
                    .map_err(|source| LogError::Io { path: self.log.path.clone(), source })?;
                if n == 0 {
                    return Err(LogError::Failed("the diff log file is shorter than written".into()));
                }
                self.read += n as u64;
                continue;
            }
            if stop.is_cancelled() {
                return Ok(None);
            }
            tokio::select! {
                _ = notified => {}
                _ = stop.cancelled() => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_reader_follows_the_writer_and_stops_at_the_head() {
        let dir = tempfile::tempdir().unwrap();
        let log = DiffLog::create(&dir.path().join("diff.log")).unwrap();
        let mut b = BytesMut::new();
        Record::Close { session: 1 }.encode(&mut b);
        log.append(&b, 0);
        let mut r = log.reader().await.unwrap();
        let stopped = tokio_util::sync::CancellationToken::new();
        stopped.cancel();
        let running = tokio_util::sync::CancellationToken::new();
        assert_eq!(r.next(&stopped).await.unwrap(), Some(Record::Close { session: 1 }));
        assert_eq!(r.next(&stopped).await.unwrap(), None);
        assert_eq!(r.position(), log.len());
        // A reader waiting at the head wakes for the next append.
        let waiting = async { r.next(&running).await.unwrap() };
        let mut b = BytesMut::new();
        Record::Unit { session: 2, requests: vec![], locks: vec![] }.encode(&mut b);
        let (got, ()) = tokio::join!(waiting, async { log.append(&b, 1) });
        assert_eq!(got, Some(Record::Unit { session: 2, requests: vec![], locks: vec![] }));
        assert_eq!(log.units(), 1);
        log.fail("disk full".into());
        assert!(matches!(r.next(&running).await, Err(LogError::Failed(_))));
    }
}
