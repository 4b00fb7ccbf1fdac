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
REVOKE ALL ON chorus.history, chorus.key, chorus.pruned FROM PUBLIC;
CREATE OR REPLACE FUNCTION chorus.record(s bigint, u bytea, k text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $f$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM chorus.key WHERE key = k) THEN
    RAISE EXCEPTION 'chorus.record is for Chorus alone' USING ERRCODE = '42501';
  END IF;
  INSERT INTO chorus.history (serial, unit) VALUES (s, u);
END $f$;
REVOKE ALL ON FUNCTION chorus.record(bigint, bytea, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION chorus.record(bigint, bytea, text) TO PUBLIC;";

/// Whether the schema is there (and so whether this database has a history at all).
pub const EXISTS: &str = "SELECT to_regclass('chorus.history') IS NOT NULL";

/// Whether the schema is there as this version of Chorus installs it.
pub const CURRENT: &str = "SELECT to_regclass('chorus.pruned') IS NOT NULL";

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

/// What a unit's record sends: one statement, prepared unnamed, run with three parameters.
pub const RECORD: &str = "SELECT chorus.record($1, $2, $3)";
