//! Applies one history entry to a backend that lacks it: logged in as the unit's user with its
//! startup parameters, its settings and named statements rebuilt, the unit's requests run in a
//! transaction together with the same record, so the backend ends up holding the unit and
//! knowing it does, as the others do.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::{begin_frame, commit_frame, History, HistoryUnit, Shape};
use crate::cluster::Backend;
use crate::config::Config;
use crate::fanout::{self, Outcome};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The backend could not be reached or failed along the way: it may be tried again.
    #[error("{0}")]
    Failed(String),
    /// The backend answered the unit differently from where it committed: it is not
    /// identical to the others.
    #[error("{0}")]
    Differs(String),
}

/// Applies entry `serial` (`raw`, as stored) to `target`.
pub async fn apply(cfg: &Config, history: &History, target: Arc<Backend>, serial: u64, raw: &[u8]) -> Result<(), ApplyError> {
    let unit = HistoryUnit::decode(raw).map_err(|e| ApplyError::Differs(format!("unit {serial}: {e}")))?;
    let password = cfg.user(&unit.user).map(|u| u.password.clone()).unwrap_or_default();
    let name = target.name.clone();
    let login = fanout::connect(target, &unit.params, &unit.user, &password, cfg.connect_timeout)
        .await
        .map_err(|e| ApplyError::Failed(format!("log in to {name} as {} to apply unit {serial}: {e}", unit.user)))?;
    let mut conn = login.conn;
    fanout::conn::run_script(&mut conn, &unit.restore, cfg.backend_timeout).await.map_err(ApplyError::Failed)?;
    // (frames, rows compared, the outcome it must have where known)
    let mut plan: Vec<(Bytes, bool, Option<Outcome>)> = Vec::with_capacity(unit.requests.len() + 3);
    if unit.shape == Shape::Autocommit {
        plan.push((begin_frame(), false, None));
    }
    for r in &unit.requests {
        let known = (unit.shape == Shape::Transaction).then_some(r.outcome);
        plan.push((r.frames.clone(), r.hash_rows, known));
    }
    let mut rec = BytesMut::new();
    history.record_frames(serial, raw, &mut rec);
    plan.push((rec.freeze(), false, None));
    if unit.shape != Shape::Standalone {
        plan.push((commit_frame(), false, None));
    }
    let reqs: Vec<(&[u8], bool)> = plan.iter().map(|(f, h, _)| (&f[..], *h)).collect();
    let got = fanout::conn::run_requests(&mut conn, &reqs, cfg.backend_timeout).await.map_err(ApplyError::Failed)?;
    for ((frames, _, want), o) in plan.iter().zip(&got) {
        let fine = match want {
            // Success or the same error: row counts of reads of per-server facts may differ.
            Some(w) => o.error == w.error,
            None => o.error.is_none(),
        };
        if !fine {
            let sql = crate::session::statement_text(frames);
            let want = want.map(|w| w.to_string()).unwrap_or_else(|| "success".into());
            return Err(ApplyError::Differs(format!("unit {serial} on {name}: {sql:?} gave {o}, where it committed: {want}")));
        }
    }
    if unit.shape != Shape::Standalone && got.last().map(|o| o.last_tag()) != Some(b"COMMIT") {
        return Err(ApplyError::Differs(format!("unit {serial} on {name} did not commit")));
    }
    Ok(())
}
