//! The history's home in every database: schema `chorus`, owned by Chorus's own login.
//!
//! Clients cannot read or change it: the table and the key are private to the owner, and the
//! one way in is `chorus.record`, a SECURITY DEFINER function that inserts an entry only when
//! given the key that Chorus keeps in its data directory. The key travels as a bind parameter,
//! so it never shows in `pg_stat_activity`; without it a client could forge entries that
//! Chorus would later apply as another user.

/// Installs (or brings up to date) the schema; `$1` is the key. Runs in one transaction.
pub const INSTALL: &str = "\
CREATE SCHEMA IF NOT EXISTS chorus;
REVOKE ALL ON SCHEMA chorus FROM PUBLIC;
GRANT USAGE ON SCHEMA chorus TO PUBLIC;
CREATE TABLE IF NOT EXISTS chorus.history (
  serial bigint PRIMARY KEY,
  at timestamptz NOT NULL DEFAULT now(),
  unit bytea NOT NULL
);
CREATE TABLE IF NOT EXISTS chorus.key (key text NOT NULL);
CREATE TABLE IF NOT EXISTS chorus.pruned (one bool PRIMARY KEY DEFAULT true CHECK (one), upto bigint NOT NULL);
ALTER TABLE chorus.history ADD COLUMN IF NOT EXISTS epoch bigint NOT NULL DEFAULT 0;
CREATE TABLE IF NOT EXISTS chorus.fence ();
CREATE SEQUENCE IF NOT EXISTS chorus.epoch MINVALUE 0 START 0;
SELECT setval('chorus.epoch', 0, true) WHERE pg_sequence_last_value('chorus.epoch') IS NULL;
REVOKE ALL ON chorus.history, chorus.key, chorus.pruned, chorus.fence, chorus.epoch FROM PUBLIC;
DROP FUNCTION IF EXISTS chorus.record(bigint, bytea, text);
CREATE OR REPLACE FUNCTION chorus.record(s bigint, u bytea, k text, e bigint) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $f$
DECLARE
  now_epoch bigint;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM chorus.key WHERE key = k) THEN
    RAISE EXCEPTION 'chorus.record is for Chorus alone' USING ERRCODE = '42501';
  END IF;
  -- Held to the unit's end: a raise of the epoch waits for this unit, or this unit for it.
  LOCK TABLE chorus.fence IN ACCESS SHARE MODE;
  -- Read past the unit's snapshot: a sequence's value is not versioned.
  now_epoch := pg_sequence_last_value('chorus.epoch');
  IF now_epoch IS DISTINCT FROM e THEN
    RAISE EXCEPTION 'chorus: this unit belongs to leadership epoch %, the backend is at epoch %', e, now_epoch
      USING ERRCODE = '57C01';
  END IF;
  INSERT INTO chorus.history (serial, unit, epoch) VALUES (s, u, e);
END $f$;
REVOKE ALL ON FUNCTION chorus.record(bigint, bytea, text, bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION chorus.record(bigint, bytea, text, bigint) TO PUBLIC;";

/// The SQLSTATE of a record refused because its epoch is not the backend's: a newer leader
/// raised the epoch, and this Chorus is deposed.
pub const FENCED: &str = "57C01";

/// Raises the epoch to `$1` in this database (run by a new leader, in a transaction that
/// holds `chorus.fence` exclusively); returns the epoch the backend is at afterwards.
pub const RAISE: &str = "SELECT CASE WHEN pg_sequence_last_value('chorus.epoch') < $1 \
  THEN setval('chorus.epoch', $1, true) ELSE pg_sequence_last_value('chorus.epoch') END";

/// The server sessions that hold `chorus.fence` (units past their record) in this database,
/// ended before a raise: they belong to the epoch being replaced.
pub const END_FENCE_HOLDERS: &str = "SELECT count(pg_terminate_backend(l.pid)) FROM pg_locks l \
  WHERE l.locktype = 'relation' AND l.relation = 'chorus.fence'::regclass AND l.pid <> pg_backend_pid() \
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())";

/// The databases of a server that may hold a history (recovery and the fence visit each).
pub const DATABASES: &str = "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1";

/// Whether the schema is there (and so whether this database has a history at all).
pub const EXISTS: &str = "SELECT to_regclass('chorus.history') IS NOT NULL";

/// Whether the schema is there as this version of Chorus installs it.
pub const CURRENT: &str = "SELECT to_regclass('chorus.fence') IS NOT NULL";

/// The serials held, as runs without a gap: `(first, last)` per run, in order.
pub const RUNS: &str = "SELECT min(serial), max(serial) FROM \
  (SELECT serial, serial - row_number() OVER (ORDER BY serial) AS run FROM chorus.history) held \
  GROUP BY run ORDER BY 1";

/// The serials held above `$1` and inside the gaps `$2[i]..=$3[i]`: what can have been added
/// since runs were read (index range scans only).
pub const SINCE: &str = "SELECT serial FROM chorus.history WHERE serial > $1 UNION ALL \
  SELECT h.serial FROM unnest($2::int8[], $3::int8[]) AS gap(lo, hi) \
  CROSS JOIN LATERAL (SELECT serial FROM chorus.history WHERE serial BETWEEN gap.lo AND gap.hi) h";

/// The newest serial pruning removed (0: none): a backend that lacks units up to it cannot
/// be caught up from this history.
pub const PRUNED: &str = "SELECT coalesce((SELECT upto FROM chorus.pruned), 0)";

/// Deletes entries older than `$1` seconds, the newest kept and none above serial `$2`, and
/// notes the newest deleted.
pub const PRUNE: &str = "WITH gone AS (
  DELETE FROM chorus.history WHERE at < now() - make_interval(secs => $1) AND serial <= $2
    AND serial < (SELECT max(serial) FROM chorus.history) RETURNING serial
), noted AS (
  INSERT INTO chorus.pruned (upto) SELECT max(serial) FROM gone HAVING count(*) > 0
  ON CONFLICT (one) DO UPDATE SET upto = greatest(chorus.pruned.upto, excluded.upto)
)
SELECT count(*) FROM gone";

/// As `PRUNE`, and also the oldest entries beyond the newest `$3` bytes of entries.
pub const PRUNE_BYTES: &str = "WITH sized AS (
  SELECT serial, at, sum(pg_column_size(unit)) OVER (ORDER BY serial DESC) AS newer FROM chorus.history
), gone AS (
  DELETE FROM chorus.history h USING sized s
  WHERE h.serial = s.serial AND (s.at < now() - make_interval(secs => $1) OR s.newer > $3) AND h.serial <= $2
    AND h.serial < (SELECT max(serial) FROM chorus.history) RETURNING h.serial
), noted AS (
  INSERT INTO chorus.pruned (upto) SELECT max(serial) FROM gone HAVING count(*) > 0
  ON CONFLICT (one) DO UPDATE SET upto = greatest(chorus.pruned.upto, excluded.upto)
)
SELECT count(*) FROM gone";

/// The history's size on disk: table, index and TOAST.
pub const SIZE: &str = "SELECT pg_total_relation_size('chorus.history')";

/// What a unit's record sends: one statement, run with four parameters (serial, entry, key,
/// the leadership epoch).
pub const RECORD: &str = "SELECT chorus.record($1, $2, $3, $4)";
