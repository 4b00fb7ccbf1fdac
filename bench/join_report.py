"""One round's report for bench/join.sh, or the summary of all rounds.

    python3 bench/join_report.py WORK ROUND J0 J1 RATE IDLE IDLE_CPU LOADED LOADED_CPU
    python3 bench/join_report.py WORK summary
"""
import datetime
import glob
import json
import re
import statistics
import sys

work = sys.argv[1]
if sys.argv[2] == "summary":
    rounds = [json.loads(l) for l in open(f"{work}/rounds.jsonl")]
    med = lambda k: statistics.median(r[k] for r in rounds)
    print(f"\nmedians of {len(rounds)} rounds:")
    print(f"  reference idle {med('idle'):.1f} s, under load {med('loaded'):.1f} s; join {med('join'):.1f} s")
    print(f"  join / idle reference: {med('ratio_idle'):.2f} (target <= 1.3); join / reference under the same load: {med('ratio_loaded'):.2f}")
    print(f"  largest write pause at attach: {max(r['attach_ms'] for r in rounds):.1f} ms (target <= 200)")
    print(f"  lowest throughput during a join: {min(r['throughput'] for r in rounds):.2f} of the rate (target >= 0.80)")
    print(f"  failed transactions: {sum(r['failed'] for r in rounds)}")
    sys.exit(0)

r = sys.argv[2]
j0, j1, rate, idle, idle_cpu, loaded, loaded_cpu = map(float, sys.argv[3:10])
st = json.load(open(f"{work}/r{r}/status.json"))["join"]
# Per-transaction log: client tx_no latency_us script epoch_s epoch_us [lag]
lat, done = [], 0
for f in glob.glob(f"{work}/r{r}/tx*"):
    for line in open(f):
        p = line.split()
        if len(p) < 6:
            continue
        t = int(p[4]) + int(p[5]) / 1e6
        if j0 <= t <= j1 + 0.5:
            lat.append(int(p[2]) / 1000.0)
            if t <= j1:
                done += 1
lat.sort()
join = j1 - j0
tps = done / join if join > 0 else 0
failed = sum(int(m) for m in re.findall(r"number of failed transactions: (\d+)", open(f"{work}/r{r}/failed.txt").read()))
print(f"\nround {r}: reference idle {idle:.1f} s ({idle_cpu:.1f} core-s), under load {loaded:.1f} s ({loaded_cpu:.1f} core-s); "
      f"join {join:.1f} s: {join / idle:.2f} of the idle reference, {join / loaded:.2f} of the loaded one")
print(f"  pauses detach {st['detach_pause_ms']:.1f} ms, attach {st['attach_pause_ms']:.1f} ms; units logged {st['log_units']}; "
      f"throughput {tps:.0f} TPS = {tps / rate:.2f} of the rate; failed transactions {failed}")
if lat:
    print(f"  transactions during the join: {len(lat)}, latency p50 {lat[len(lat) // 2]:.1f} ms, "
          f"p99 {lat[int(len(lat) * 0.99)]:.1f} ms, max {lat[-1]:.1f} ms")

# Where the CPU went, step by step, from the samples and the join's log lines.
STEP = {"Detaching": "detach", "Dumping": "dump (schema, small)", "Restoring": "restore schema",
        "restored the schema": "copy rows", "loaded the rows": "indexes, constraints",
        "built indexes": "sequences", "Replaying": "replay", "Attaching": "attach", "Verifying": "check",
        "Done": "done", "Starting": "start", "Failed": "failed"}
samples = [list(map(float, l.split())) for l in open(f"{work}/cpu.txt") if len(l.split()) == 6]
marks = [(j0 - 5, "load only")]
for l in open(f"{work}/chorus.log"):
    l = re.sub(r"\x1b\[[0-9;]*m", "", l)
    m = re.match(r"(\S+Z) .*join (phase .*phase=(\w+)|(restored the schema|loaded the rows|built indexes))", l)
    if m:
        t = datetime.datetime.fromisoformat(m.group(1).replace("Z", "+00:00")).timestamp()
        if j0 <= t <= j1:
            marks.append((t, STEP[m.group(3) or m.group(4)]))
marks.append((j1, "end"))
at = lambda t: min(samples, key=lambda s: abs(s[0] - t))
print(f"  {'step':<22}{'secs':>6}{'pg1':>7}{'pg2':>7}{'pg3':>7}{'chorus':>8}{'other':>7}   core-s")
for (t0, name), (t1, _) in zip(marks, marks[1:]):
    # Durations from the log; CPU from the nearest samples (half a second apart).
    a, b, d = at(t0), at(t1), t1 - t0
    if d < 0.3:
        continue
    used = [y - x for x, y in zip(a[1:], b[1:])]
    print(f"  {name:<22}{d:>6.1f}" + "".join(f"{u:>{8 if i == 3 else 7}.1f}" for i, u in enumerate(used))
          + f"   ({sum(used) / d:.2f} cores)")
with open(f"{work}/rounds.jsonl", "a") as out:
    out.write(json.dumps({"idle": idle, "loaded": loaded, "join": join, "ratio_idle": join / idle,
                          "ratio_loaded": join / loaded, "attach_ms": st["attach_pause_ms"],
                          "throughput": tps / rate, "failed": failed}) + "\n")
