//! Three promises psycopg's own test suite found broken, kept: a pid means one session, a
//! pipeline is answered as it arrives, DDL locks what it names. Each scenario runs with psycopg
//! from PyPI as the client (`testkit/py/psycopg_findings.py`, the logic of psycopg's tests
//! written for Chorus), states what the client saw, what the backends hold, and ends with
//! `chorus verify` equal and every backend still in sync.

mod common;

use chorus_testkit::python_json;
use common::{ChorusOptions, PgOptions, PgServer, Setup, APP_USER};
use serde_json::{json, Value};

fn run(mode: &str, dsn: &str, extra: &[&str]) -> Value {
    let mut args = vec![mode, dsn];
    args.extend_from_slice(extra);
    python_json("psycopg_findings.py", &args)
}

async fn assert_in_sync_and_equal(s: &Setup) {
    let states = s.chorus.states();
    assert!(states.values().all(|v| v == "in_sync"), "{states:?}\n{}", s.chorus.log());
    assert!(!s.chorus.log().contains("backend ejected"), "{}", s.chorus.log());
    let (ok, out) = s.chorus.verify();
    assert!(ok, "{out}");
}

/// On every backend directly: the first column of `sql`'s one row.
async fn on_each(s: &Setup, sql: &str) -> Vec<i64> {
    let mut out = Vec::new();
    for srv in &s.servers {
        out.push(srv.local_client("postgres").await.unwrap().query_one(sql, &[]).await.unwrap().get(0));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelines_are_answered_as_a_direct_server_answers_them() {
    let s = Setup::new(2).await;
    let reference = PgServer::start(PgOptions::default()).await.expect("reference server");
    let direct = run("pipelines", &reference.conn_str(APP_USER, "postgres"), &[]);
    let through = run("pipelines", &s.chorus.conn_str(APP_USER, "postgres"), &[]);
    // psycopg's test_executemany, test_executemany_trace_returning, test_outer_transaction,
    // test_outer_transaction_error and test_concurrency, and the pipeline shapes beside them.
    assert_eq!(through["executemany"], json!([1, [1], true, [2], null, [[10, 20]]]), "{through}");
    assert_eq!(through["executemany_trace_returning"], json!([[10, 20, 30, 40]]));
    assert_eq!(through["outer_transaction"], json!([[1], [1]]));
    assert_eq!(through["outer_transaction_error"], json!(["UndefinedColumn", [0]]));
    assert_eq!(through["concurrency"], json!([45, 45, true]));
    assert_eq!(through["aborted_then_synced"], json!(["42P01", "PipelineAborted", [1], [2]]));
    assert_eq!(through["error_on_commit"], json!(["23503", [1], [2], [0]]));
    assert_eq!(through["rollback_transaction"], json!(["22012", [0]]));
    assert_eq!(through["writes_in_one_pipeline_transaction"], json!([50, 51225]));
    assert_eq!(through, direct, "Chorus answered otherwise than a direct server");
    assert_eq!(on_each(&s, "SELECT count(*) FROM execmanypipeline").await, [52, 52]);
    assert_in_sync_and_equal(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pid_means_one_session_on_every_backend() {
    let s = Setup::new(2).await;
    let r = run("pids", &s.chorus.conn_str(APP_USER, "postgres"), &[]);
    // Ten sessions end themselves by the pid they were given, five inside a transaction that
    // wrote: each ends with 57P01, and what the open transactions wrote is nowhere.
    assert_eq!(r["self_terminations"], json!(vec!["57P01"; 10]), "{r}");
    // The pid read in pg_stat_activity through Chorus is the one the client was given; ending
    // it ends that client (57P01 at its next request) and nobody else.
    assert_eq!(r["operator_terminates"], json!([true, true, "57P01", "still here"]), "{r}");
    // Cancel by pid cancels exactly that query (57014), in autocommit and in a transaction;
    // the session goes on, and another session's query runs to its end.
    assert_eq!(r["operator_cancels"], json!([["57014", "rested", "goes on"], ["57014", "rested", "goes on"]]), "{r}");
    assert_eq!(on_each(&s, "SELECT count(*) FROM pid_log").await, [0, 0], "rolled back everywhere");
    assert!(s.chorus.log().contains("terminated by pid through Chorus"), "{}", s.chorus.log());
    // No process of either server is left in a transaction or running a statement of them.
    let busy = "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' \
                AND (query LIKE '%pg_sleep(20)%' OR state = 'idle in transaction') AND pid <> pg_backend_pid()";
    assert_eq!(on_each(&s, busy).await, [0, 0]);
    assert_in_sync_and_equal(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_locks_what_it_names() {
    let pg = PgOptions { max_connections: 300, ..PgOptions::default() };
    let mut servers = Vec::new();
    for _ in 0..2 {
        servers.push(PgServer::start(pg.clone()).await.expect("start postgres"));
    }
    let refs: Vec<&PgServer> = servers.iter().collect();
    let chorus = common::ChorusProcess::start(common::chorus_bin(), &refs, ChorusOptions::default()).await.unwrap();
    let s = Setup { servers, chorus };
    let r = run("ddl", &s.chorus.conn_str(APP_USER, "postgres"), &["200"]);
    // Two open transactions each create a table; one copies into the other (psycopg's
    // test_copy_table_across): it completes instead of waiting for the other's lock.
    assert_eq!(r["copy_table_across"], json!([500, 125250]), "{r}");
    // 200 sessions each create, fill and drop their own table, twice, then keep one: 0 errors.
    assert_eq!(r["own_tables"], json!([]), "{r}");
    // Two ALTERs of one table still order; a cycle of two ends in 40P01, never a hang.
    assert_eq!(r["conflicts"], json!([["b waits while a holds the table", true], "ok", ["40P01", "ok"]]), "{r}");
    let columns = "SELECT count(*) FROM (SELECT attname, attnum FROM pg_attribute WHERE attrelid = 'shared_t'::regclass \
                   AND attnum > 0 AND NOT attisdropped ORDER BY attnum) c WHERE (attnum, attname) IN ((2, 'from_a'), (3, 'from_b'))";
    assert_eq!(on_each(&s, columns).await, [2, 2], "the columns in the order the lock gave");
    let kept = "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'kept\\_%'";
    assert_eq!(on_each(&s, kept).await, [200, 200]);
    let own = "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'own\\_%'";
    assert_eq!(on_each(&s, own).await, [0, 0]);
    assert_in_sync_and_equal(&s).await;
}
