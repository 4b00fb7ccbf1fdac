"""What psycopg's own test suite found, as scenarios run with psycopg (from PyPI) as the client.

Usage: psycopg_findings.py pipelines|pids|ddl DSN [...]

Each mode prints one JSON object: scenario name -> what the client saw (values, SQLSTATEs).
The Rust tests run `pipelines` against a direct server and through Chorus and compare the two;
`pids` and `ddl` state their own expectations and the tests check them. A scenario that does
not answer within its bound prints what it has with "hang" and exits 3: a hang is a finding,
never a wait without end.
"""

import concurrent.futures
import json
import os
import sys
import threading
import time

import psycopg
from psycopg import errors as e

BOUND = 30.0


def code(x):
    return x.sqlstate or type(x).__name__


def bounded(results, name, f, *args):
    """Runs f(*args) into results[name], or ends the process when it hangs."""
    done = threading.Event()

    def watch():
        if not done.wait(BOUND):
            results[name] = "hang"
            print(json.dumps(results), flush=True)
            os._exit(3)

    threading.Thread(target=watch, daemon=True).start()
    try:
        results[name] = f(*args)
    except psycopg.Error as x:
        results[name] = {"error": code(x)}
    done.set()


# ---- pipelines (the logic of psycopg's test_pipeline.py, written for Chorus) -----------------


def executemany(dsn):
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("drop table if exists execmanypipeline")
        conn.execute("create table execmanypipeline (id serial primary key, num integer)")
        with conn.pipeline(), conn.cursor() as cur:
            cur.executemany("insert into execmanypipeline(num) values (%s) returning id", [(10,), (20,)], returning=True)
            out = [cur.rowcount, cur.fetchone(), cur.nextset(), cur.fetchone(), cur.nextset()]
        out.append(conn.execute("select array_agg(num order by id) from execmanypipeline").fetchone())
        return out


def executemany_trace_returning(dsn):
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.cursor()
        cur.execute("create temp table trace (id int)")
        with conn.pipeline():
            cur.executemany("insert into trace (id) values (%s)", [(10,), (20,)], returning=True)
            cur.executemany("insert into trace (id) values (%s)", [(30,), (40,)], returning=True)
        return conn.execute("select array_agg(id order by id) from trace").fetchone()


def outer_transaction(dsn):
    with psycopg.connect(dsn) as conn:
        with conn.transaction():
            with conn.pipeline():
                conn.execute("drop table if exists outertx")
                conn.execute("create table outertx as (select 1 as one)")
                cur = conn.execute("select * from outertx")
        out = [cur.fetchone()]
        out.append(conn.execute("select count(*) from pg_tables where tablename = 'outertx'").fetchone())
        conn.commit()
        return out


def outer_transaction_error(dsn):
    with psycopg.connect(dsn) as conn:
        conn.execute("drop table if exists voila")
        conn.commit()
        seen = None
        try:
            with conn.transaction():
                with conn.pipeline():
                    conn.execute("select error")
                    conn.execute("create table voila ()")
        except (e.UndefinedColumn, e.OperationalError) as x:
            seen = type(x).__name__
        left = conn.execute("select count(*) from pg_tables where tablename = 'voila'").fetchone()
        conn.commit()
        return [seen, left]


def concurrency(dsn):
    with psycopg.connect(dsn) as conn:
        with conn.transaction():
            conn.execute("drop table if exists pipeline_concurrency")
            conn.execute("create table pipeline_concurrency (id serial primary key, value integer)")
            conn.execute("drop table if exists accessed")
            conn.execute("create table accessed as (select now() as value)")

        def update(value):
            cur = conn.execute("insert into pipeline_concurrency(value) values (%s) returning id", (value,))
            conn.execute("update accessed set value = now()")
            return cur

        conn.autocommit = True
        (before,) = conn.execute("select value from accessed").fetchone()
        values = range(1, 10)
        with conn.pipeline():
            with concurrent.futures.ThreadPoolExecutor() as ex:
                cursors = ex.map(update, values, timeout=len(values))
                ids = sum(cur.fetchone()[0] for cur in cursors)
        (s,) = conn.execute("select sum(value) from pipeline_concurrency").fetchone()
        (after,) = conn.execute("select value from accessed").fetchone()
        return [ids, s, after > before]


def aborted_then_synced(dsn):
    with psycopg.connect(dsn, autocommit=True) as conn:
        out = []
        with conn.pipeline() as p:
            c1 = conn.execute("select 1")
            try:
                conn.execute("select * from doesnotexist").fetchone()
            except psycopg.Error as x:
                out.append(code(x))
            try:
                conn.execute("select 'aborted'").fetchone()
            except psycopg.Error as x:
                out.append(type(x).__name__)
            p.sync()
            c2 = conn.execute("select 2")
        out += [c1.fetchone(), c2.fetchone()]
        return out


def error_on_commit(dsn):
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "drop table if exists selfref; create table selfref ("
            " x serial primary key, y int references selfref (x) deferrable initially deferred)"
        )
        conn.commit()
        out = []
        with conn.pipeline():
            conn.execute("insert into selfref (y) values (-1)")
            try:
                conn.commit()
            except psycopg.Error as x:
                out.append(code(x))
            cur1 = conn.execute("select 1")
        cur2 = conn.execute("select 2")
        out += [cur1.fetchone(), cur2.fetchone()]
        out.append(conn.execute("select count(*) from selfref").fetchone())
        conn.commit()
        return out


def rollback_transaction(dsn):
    with psycopg.connect(dsn, autocommit=True) as conn:
        out = []
        try:
            with conn.pipeline():
                with conn.transaction():
                    conn.execute("insert into execmanypipeline (num) values (99)")
                    conn.execute("select 1 / %s", [0]).fetchone()
        except psycopg.Error as x:
            out.append(code(x))
        out.append(conn.execute("select count(*) from execmanypipeline where num = 99").fetchone())
        return out


def writes_in_one_pipeline_transaction(dsn):
    with psycopg.connect(dsn) as conn:
        with conn.pipeline():
            for i in range(50):
                conn.execute("insert into execmanypipeline (num) values (%s)", [1000 + i])
            conn.commit()
        return conn.execute("select count(*), sum(num) from execmanypipeline where num >= 1000").fetchone()


def pipelines(dsn):
    results = {}
    for f in [
        executemany,
        executemany_trace_returning,
        outer_transaction,
        outer_transaction_error,
        concurrency,
        aborted_then_synced,
        error_on_commit,
        rollback_transaction,
        writes_in_one_pipeline_transaction,
    ]:
        bounded(results, f.__name__, f, dsn)
    return results


# ---- pids ----------------------------------------------------------------------------------


def self_terminations(dsn):
    """Ten sessions end themselves by the pid they were given, half in transactions."""
    out = []

    def one(i):
        conn = psycopg.connect(dsn, autocommit=(i % 2 == 0))
        try:
            if i % 2:
                conn.execute("insert into pid_log (what) values ('in a transaction')")
            conn.execute("select pg_terminate_backend(%s)" % conn.pgconn.backend_pid)
            out.append("no error")
        except psycopg.Error as x:
            out.append(code(x))
        finally:
            conn.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(out)


def wait_for(conn, sql, args=()):
    deadline = time.time() + 20
    while time.time() < deadline:
        row = conn.execute(sql, args).fetchone()
        if row is not None:
            return row[0]
        time.sleep(0.01)
    raise RuntimeError("never: " + sql)


def operator_terminates(dsn):
    """An operator reads the client's pid in pg_stat_activity through Chorus and ends it."""
    victim = psycopg.connect(dsn + " application_name=victim", autocommit=True)
    bystander = psycopg.connect(dsn + " application_name=bystander", autocommit=True)
    with psycopg.connect(dsn, autocommit=True) as op:
        pid = wait_for(op, "select pid from pg_stat_activity where application_name = 'victim'")
        same = pid == victim.pgconn.backend_pid
        done = op.execute("select pg_terminate_backend(%s)", [pid]).fetchone()[0]
    try:
        victim.execute("select 1")
        seen = "no error"
    except psycopg.Error as x:
        seen = code(x)
    alive = bystander.execute("select 'still here'").fetchone()[0]
    bystander.close()
    return [same, done, seen, alive]


def operator_cancels(dsn):
    """Cancel by pid cancels exactly that query, in autocommit and inside a transaction."""
    out = []
    for in_tx in [False, True]:
        victim = psycopg.connect(dsn + " application_name=sleeper", autocommit=not in_tx)
        bystander = psycopg.connect(dsn + " application_name=bystander", autocommit=True)
        seen = {}

        def sleep():
            try:
                if in_tx:
                    victim.execute("insert into pid_log (what) values ('before the cancel')")
                victim.execute("select pg_sleep(20)")
                seen["victim"] = "no error"
            except psycopg.Error as x:
                seen["victim"] = code(x)

        def nap():
            try:
                seen["bystander"] = bystander.execute("select pg_sleep(1.5), 'rested'").fetchone()[1]
            except psycopg.Error as x:
                seen["bystander"] = code(x)

        t, b = threading.Thread(target=sleep), threading.Thread(target=nap)
        t.start()
        b.start()
        with psycopg.connect(dsn, autocommit=True) as op:
            pid = wait_for(
                op,
                "select pid from pg_stat_activity where application_name = 'sleeper' and query like %s and state = 'active'",
                ["select pg_sleep(20)%"],
            )
            op.execute("select pg_cancel_backend(%s)" % pid)
            t.join(BOUND)
        b.join(BOUND)
        if in_tx:
            victim.rollback()
        again = victim.execute("select 'goes on'").fetchone()[0]
        out.append([seen.get("victim"), seen.get("bystander"), again])
        victim.close()
        bystander.close()
    return out


def pids(dsn):
    results = {}
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("create table if not exists pid_log (id serial primary key, what text)")
    bounded(results, "self_terminations", self_terminations, dsn)
    bounded(results, "operator_terminates", operator_terminates, dsn)
    bounded(results, "operator_cancels", operator_cancels, dsn)
    return results


# ---- ddl -----------------------------------------------------------------------------------


def copy_table_across(dsn):
    """psycopg's test_copy_table_across: two transactions each create a table, then copy."""
    with psycopg.connect(dsn) as c1, psycopg.connect(dsn) as c2:
        c1.execute("drop table if exists copy_src")
        c1.commit()
        c2.execute("drop table if exists copy_tgt")
        c2.commit()
        c1.execute("create table copy_src (a int, b text)")
        c1.execute("insert into copy_src select g, 'row ' || g from generate_series(1, 500) g")
        c2.execute("create table copy_tgt (a int, b text)")
        with c1.cursor().copy("copy copy_src to stdout") as src:
            with c2.cursor().copy("copy copy_tgt from stdin") as tgt:
                for data in src:
                    tgt.write(data)
        n = c2.execute("select count(*), sum(a) from copy_tgt").fetchone()
        c1.commit()
        c2.commit()
        return list(n)


def own_tables(dsn, sessions):
    """Many sessions each create, fill and drop their own table in a transaction."""
    errors = []

    def worker(i):
        try:
            with psycopg.connect(dsn) as c:
                for round in range(2):
                    c.execute(f"create table own_{i} (id serial primary key, v text)")
                    c.execute(f"insert into own_{i} (v) select 'v' || g from generate_series(1, 20) g")
                    c.execute(f"drop table own_{i}")
                    c.commit()
                c.execute(f"create table kept_{i % 4}_{i} (id int primary key)")
                c.execute(f"insert into kept_{i % 4}_{i} select generate_series(1, {i + 1})")
                c.commit()
        except psycopg.Error as x:
            errors.append(code(x))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(errors)


def conflicts(dsn):
    """Two ALTERs of one table order; two that wait for each other end in 40P01, no hang."""
    out = []
    with psycopg.connect(dsn) as a, psycopg.connect(dsn) as b:
        a.execute("drop table if exists shared_t, other_t")
        a.execute("create table shared_t (id int)")
        a.execute("create table other_t (id int)")
        a.commit()
        a.execute("alter table shared_t add column from_a int")
        seen = {}

        def second():
            try:
                b.execute("alter table shared_t add column from_b int")
                b.commit()
                seen["b"] = "ok"
            except psycopg.Error as x:
                seen["b"] = code(x)

        t = threading.Thread(target=second)
        t.start()
        t.join(1.0)
        out.append(["b waits while a holds the table", t.is_alive()])
        a.commit()
        t.join(BOUND)
        out.append(seen.get("b"))
        # A cycle: each holds one table and wants the other's.
        a.execute("alter table shared_t add column a2 int")
        b.execute("alter table other_t add column b2 int")
        res = {}

        def cross(conn, name, sql):
            try:
                conn.execute(sql)
                conn.commit()
                res[name] = "ok"
            except psycopg.Error as x:
                res[name] = code(x)
                conn.rollback()

        ta = threading.Thread(target=cross, args=(a, "a", "alter table other_t add column a3 int"))
        tb = threading.Thread(target=cross, args=(b, "b", "alter table shared_t add column b3 int"))
        ta.start()
        time.sleep(0.2)
        tb.start()
        ta.join(BOUND)
        tb.join(BOUND)
        out.append(sorted(res.values()))
    return out


def ddl(dsn, sessions):
    results = {}
    bounded(results, "copy_table_across", copy_table_across, dsn)
    bounded(results, "own_tables", own_tables, dsn, sessions)
    bounded(results, "conflicts", conflicts, dsn)
    return results


if __name__ == "__main__":
    mode, dsn = sys.argv[1], sys.argv[2]
    if mode == "pipelines":
        r = pipelines(dsn)
    elif mode == "pids":
        r = pids(dsn)
    else:
        r = ddl(dsn, int(sys.argv[3]) if len(sys.argv) > 3 else 200)
    print(json.dumps(r, default=str), flush=True)
