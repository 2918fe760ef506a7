#!/usr/bin/env python3
"""How much CPU processes outside the benchmark used during a load run.

Usage: foreign.py snapshot FILE ROOT_PID
       foreign.py share FILE ROOT_PID  -> prints two percentages of the machine's CPU time since
                                          the snapshot: used by processes outside the benchmark,
                                          and stolen by the hypervisor (steal in /proc/stat)

"Outside" means every user-space process that does not descend from ROOT_PID (the bench/run
shell). Kernel threads are left out. For each process the script counts utime+stime plus
cutime+cstime (fields 14-17 of /proc/PID/stat), so a short-lived child, such as a test binary
or rustc under cargo, is counted through its parent once it has been reaped. A process
started during the run counts from zero. The figure is a detector, not an accounting.
"""
import json
import os
import sys
import time


def processes():
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                line = f.read()
        except OSError:
            continue
        fields = line[line.rindex(")") + 2:].split()
        # fields[0] is field 3 (state): field N is fields[N - 3].
        ppid, flags = int(fields[1]), int(fields[6])
        if flags & 0x00200000:  # PF_KTHREAD
            continue
        ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))
        out[int(name)] = (ppid, int(fields[19]), ticks)  # parent, start time, CPU ticks
    return out


def foreign(procs, root):
    """{(pid, start): ticks} of the processes that do not descend from root."""
    result = {}
    for pid, (ppid, start, ticks) in procs.items():
        p, seen = pid, 0
        while p not in (0, 1, root) and p in procs and seen < 64:
            p, seen = procs[p][0], seen + 1
        if p != root:
            result[f"{pid}:{start}"] = ticks
    return result


def steal_and_total():
    """Steal and total ticks of all CPUs, from the first line of /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return v[7], sum(v)


def main():
    cmd, path, root = sys.argv[1], sys.argv[2], int(sys.argv[3])
    now = time.monotonic()
    cur = foreign(processes(), root)
    steal, total = steal_and_total()
    if cmd == "snapshot":
        with open(path, "w") as f:
            json.dump({"t": now, "procs": cur, "steal": steal, "total": total}, f)
        return
    with open(path) as f:
        prev = json.load(f)
    used = sum(max(0, t - prev["procs"].get(k, 0)) for k, t in cur.items())
    capacity = (now - prev["t"]) * os.sysconf("SC_CLK_TCK") * os.cpu_count()
    stolen = 100 * (steal - prev["steal"]) / max(total - prev["total"], 1)
    print(round(100 * used / max(capacity, 1)), round(stolen))


if __name__ == "__main__":
    main()
