"""CPU seconds per process group, every half second, for bench/join.sh: each PostgreSQL server
(postmaster, its children, and the children it reaped), Chorus (with the pg_dump and
pg_restore it ran), and everything else (pgbench, the reference's tools).

    python3 bench/join_cpu.py WORKDIR  >  lines of: epoch pg1 pg2 pg3 chorus other
"""
import os
import sys
import time

hz, work = os.sysconf("SC_CLK_TCK"), sys.argv[1]
servers = {int(open(f"{work}/pg{n}/postmaster.pid").readline()): f"pg{n}" for n in (1, 2, 3)}
while True:
    out = dict.fromkeys(["pg1", "pg2", "pg3", "chorus", "other"], 0)
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat, comm = open(f"/proc/{d}/stat").read(), open(f"/proc/{d}/comm").read().strip()
        except OSError:
            continue
        f = stat[stat.rindex(")") + 2 :].split()
        ppid, own, reaped = int(f[1]), int(f[11]) + int(f[12]), int(f[13]) + int(f[14])
        if int(d) in servers:
            out[servers[int(d)]] += own + reaped
        elif ppid in servers:
            out[servers[ppid]] += own
        elif comm == "chorus":
            out["chorus"] += own + reaped
        else:
            out["other"] += own
    print(time.time(), *(v / hz for v in out.values()), flush=True)
    time.sleep(0.5)
