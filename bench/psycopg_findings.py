"""Measures what the psycopg findings changed, with psycopg as the client (bench/psycopg_findings.sh).

  pipeline DIRECT_DSN CHORUS_DSN ROUNDS
      1,000 inserts through psycopg's pipeline mode and the same 1,000 without it, directly and
      through Chorus, the four interleaved in every round; prints the medians, each target's
      speed-up and the ratio of Chorus's speed-up to the direct one (target >= 0.5).
  ddl DSN SECONDS SESSIONS
      SESSIONS sessions each running CREATE TABLE; INSERT; DROP TABLE in transactions on a
      table of its own for SECONDS; prints transactions per second.
"""

import statistics
import sys
import threading
import time

import psycopg


def inserts(dsn, table, pipeline, n=1000):
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(f"drop table if exists {table}")
        c.execute(f"create table {table} (id int primary key, v text)")
        t0 = time.perf_counter()
        with c.cursor() as cur:
            if pipeline:
                with c.pipeline():
                    for i in range(n):
                        cur.execute(f"insert into {table} (id, v) values (%s, %s)", (i, "v"))
            else:
                for i in range(n):
                    cur.execute(f"insert into {table} (id, v) values (%s, %s)", (i, "v"))
        elapsed = time.perf_counter() - t0
        got = c.execute(f"select count(*) from {table}").fetchone()[0]
        assert got == n, (table, got)
        c.execute(f"drop table {table}")
        return elapsed


def pipeline(direct, chorus, rounds):
    times = {k: [] for k in ["direct plain", "direct pipeline", "chorus plain", "chorus pipeline"]}
    for _ in range(rounds):
        times["direct plain"].append(inserts(direct, "bench_pipe_direct", False))
        times["chorus plain"].append(inserts(chorus, "bench_pipe_chorus", False))
        times["direct pipeline"].append(inserts(direct, "bench_pipe_direct", True))
        times["chorus pipeline"].append(inserts(chorus, "bench_pipe_chorus", True))
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:16s} median {v * 1000:8.1f} ms  rounds {' '.join(f'{x * 1000:.0f}' for x in times[k])}")
    d = med["direct plain"] / med["direct pipeline"]
    c = med["chorus plain"] / med["chorus pipeline"]
    print(f"speed-up of the pipeline: direct {d:.2f}x, through Chorus {c:.2f}x; ratio {c / d:.2f} (target >= 0.5)")


def ddl(dsn, seconds, sessions):
    done = [0] * sessions
    errors = []
    stop = time.time() + seconds

    def worker(i):
        try:
            with psycopg.connect(dsn) as c:
                c.execute(f"drop table if exists bench_ddl_{i}")
                c.commit()
                while time.time() < stop:
                    c.execute(f"create table bench_ddl_{i} (id int primary key, v text)")
                    c.execute(f"insert into bench_ddl_{i} select g, 'v' from generate_series(1, 10) g")
                    c.execute(f"drop table bench_ddl_{i}")
                    c.commit()
                    done[i] += 1
        except psycopg.Error as x:
            errors.append(x.sqlstate)

    t0 = time.time()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tps = sum(done) / (time.time() - t0)
    print(f"ddl transactions per second {tps:.1f} errors {len(errors)} {sorted(set(errors))}")


if __name__ == "__main__":
    if sys.argv[1] == "pipeline":
        pipeline(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        ddl(sys.argv[2], float(sys.argv[3]), int(sys.argv[4]))
