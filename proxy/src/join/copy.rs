//! The largest tables' rows, straight from the donor into the newcomer.
//!
//! A directory dump is complete only when pg_dump has written its table of contents, last, so
//! pg_restore could only start once the whole dump was on disk: the join paid for the dump and
//! then for the restore. The rows of the largest tables are instead copied by COPY from a
//! donor connection (in the join's snapshot, or on the frozen donor) into the newcomer, on
//! `join_jobs` connection pairs: the donor reads while the newcomer loads. Each table is
//! truncated and loaded in one transaction with COPY FREEZE, so its rows arrive frozen and
//! marked visible: neither the newcomer's first scans (the join's check) nor its autovacuum
//! rewrite every page afterwards. pg_dump still takes everything else (the schema, sequences,
//! large objects, the small tables, tables it treats specially), restored by pg_restore.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use bytes::BytesMut;
use futures::{SinkExt, StreamExt};
use tokio_postgres::Client;

use super::{connect, db_err, quote_ident, JoinError};
use crate::cluster::Backend;
use crate::shared::Shared;

/// Tables smaller than this go through pg_dump: for them two round trips cost more than
/// the copy saves.
const MIN_BYTES: i64 = 1 << 20;
/// At most this many tables are copied (the largest): each is named to pg_dump on its
/// command line, and pg_dump looks up each name with a query of its own.
const MAX_TABLES: i64 = 256;
/// Rows are sent to the newcomer in chunks of about this size.
const CHUNK: usize = 256 << 10;

/// One table whose rows are copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// Schema-qualified and quoted: for SQL, and as a pg_dump pattern (inside double quotes
    /// pg_dump takes `*`, `?` and `.` literally and `""` as one quote).
    pub name: String,
    /// The stored columns, quoted, in order (generated columns are computed by the newcomer).
    pub columns: String,
}

/// Ordinary tables (leaf partitions included) of 1 MiB or more that belong to no extension,
/// largest first; their stored columns. Generated columns (`attgenerated`) exist since
/// PostgreSQL 12: an older donor gets no list, and pg_dump copies everything.
const TABLES: &str = "SELECT n.nspname::text, c.relname::text, \
       string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum) \
     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
     JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' \
     WHERE c.relkind = 'r' AND c.relpersistence IN ('p', 'u') \
       AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_toast%' \
       AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e') \
       AND pg_table_size(c.oid) >= $1 \
     GROUP BY n.nspname, c.relname, c.oid ORDER BY pg_table_size(c.oid) DESC, 1, 2 LIMIT $2";

/// The tables of the database `c` is connected to whose rows are copied.
pub async fn tables(c: &Client) -> Result<Vec<Table>, JoinError> {
    if super::version(c).await? < 12 {
        return Ok(Vec::new());
    }
    let rows = c.query(TABLES, &[&MIN_BYTES, &MAX_TABLES]).await.map_err(db_err("list the tables to copy"))?;
    Ok(rows.iter().map(|r| table(r.get(0), r.get(1), r.get(2))).collect())
}

fn table(schema: &str, name: &str, columns: String) -> Table {
    Table { name: format!("{}.{}", quote_ident(schema), quote_ident(name)), columns }
}

/// Copies every table in `tables` (created empty on the newcomer) on `jobs` connection
/// pairs, largest first; `copied` counts the bytes sent.
#[allow(clippy::too_many_arguments)]
pub async fn copy_tables(
    shared: &Shared,
    donor: &Backend,
    newcomer: &Backend,
    db: &str,
    snapshot: Option<&str>,
    tables: &[Table],
    jobs: usize,
    copied: &AtomicU64,
) -> Result<(), JoinError> {
    let next = AtomicUsize::new(0);
    let worker = || async {
        let src = connect(shared, donor, db).await?;
        // One REPEATABLE READ transaction reads every table this worker takes from the same
        // point: the exported snapshot, or the detached donor's frozen state.
        let mut begin =
            format!("{}; SET row_security = off; BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY;", crate::verify::SETTINGS);
        if let Some(s) = snapshot {
            begin.push_str(&format!(" SET TRANSACTION SNAPSHOT '{}';", s.replace('\'', "''")));
        }
        src.batch_execute(&begin).await.map_err(db_err(format!("open the copy snapshot of {db} on {}", donor.name)))?;
        let dst = connect(shared, newcomer, db).await?;
        dst.batch_execute(crate::verify::SETTINGS).await.map_err(db_err(format!("settings on {}", newcomer.name)))?;
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(t) = tables.get(i) else { return Ok::<_, JoinError>(()) };
            copy_one(&src, &dst, t, copied).await.map_err(|e| match e {
                Side::Donor(e) => db_err(format!("copy {} from {}", t.name, donor.name))(e),
                Side::Newcomer(e) => db_err(format!("copy {} into {}", t.name, newcomer.name))(e),
                Side::Count(sent, loaded) => {
                    JoinError::Setup(format!("copy {} into {}: {sent} rows sent, {loaded} loaded", t.name, newcomer.name))
                }
            })?;
        }
    };
    let n = jobs.clamp(1, tables.len().max(1));
    futures::future::try_join_all((0..n).map(|_| worker())).await.map(|_| ())
}

/// Which end a copy failed at.
enum Side {
    Donor(tokio_postgres::Error),
    Newcomer(tokio_postgres::Error),
    Count(u64, u64),
}

async fn copy_one(src: &Client, dst: &Client, t: &Table, copied: &AtomicU64) -> Result<(), Side> {
    // FREEZE needs the table truncated in the loading transaction. ONLY: an inheritance
    // parent's children are tables of their own, copied on their own.
    dst.batch_execute(&format!("BEGIN; TRUNCATE ONLY {}", t.name)).await.map_err(Side::Newcomer)?;
    let sink = dst.copy_in(&format!("COPY {} ({}) FROM STDIN (FREEZE)", t.name, t.columns)).await.map_err(Side::Newcomer)?;
    let rows = src.copy_out(&format!("COPY {} ({}) TO STDOUT", t.name, t.columns)).await.map_err(Side::Donor)?;
    futures::pin_mut!(sink, rows);
    let mut buf = BytesMut::with_capacity(CHUNK + (8 << 10));
    let mut sent = 0u64;
    // The server sends one row per CopyData message; rows are gathered into chunks.
    while let Some(row) = rows.next().await {
        let row = row.map_err(Side::Donor)?;
        sent += 1;
        buf.extend_from_slice(&row);
        if buf.len() >= CHUNK {
            copied.fetch_add(buf.len() as u64, Ordering::Relaxed);
            sink.send(buf.split().freeze()).await.map_err(Side::Newcomer)?;
        }
    }
    if !buf.is_empty() {
        copied.fetch_add(buf.len() as u64, Ordering::Relaxed);
        sink.send(buf.split().freeze()).await.map_err(Side::Newcomer)?;
    }
    let loaded = sink.as_mut().finish().await.map_err(Side::Newcomer)?;
    if loaded != sent {
        return Err(Side::Count(sent, loaded));
    }
    dst.batch_execute("COMMIT").await.map_err(Side::Newcomer)?;
    tracing::info!(table = %t.name, rows = loaded, "join copied a table's rows");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_quoted_for_sql_and_for_pg_dump_patterns() {
        let t = table("s p", "Odd \"name\".*?", "a, \"B\"".into());
        assert_eq!(t.name, "\"s p\".\"Odd \"\"name\"\".*?\"");
        assert_eq!(t.columns, "a, \"B\"");
    }
}
