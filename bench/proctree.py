"""A process tree read from /proc, for the benchmark scripts: the pids of a process and its
descendants, and the CPU they spent."""

import os

TICK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid):
    """The fields of /proc/PID/stat after the command name (state is [0], ppid [1])."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def children(pid):
    """The live children of pid."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if int(_stat_fields(entry)[1]) == pid:
                    kids.append(int(entry))
            except OSError:
                pass
    return kids


def tree(root):
    """Pids of root and its live descendants."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents.setdefault(int(_stat_fields(entry)[1]), []).append(int(entry))
            except OSError:
                pass
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(parents.get(pid, []))
    return out


def cpu_ns(root):
    """Run time in ns of every live thread of root's process tree (schedstat)."""
    total = 0
    for pid in tree(root):
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
        except OSError:
            pass
    return total


def cpu_seconds(root):
    """CPU of the tree: live tasks from schedstat, reaped children from cutime/cstime."""
    total = cpu_ns(root) / 1e9
    for pid in tree(root):
        try:
            fields = _stat_fields(pid)
            total += (int(fields[13]) + int(fields[14])) / TICK
        except OSError:
            pass
    return total
