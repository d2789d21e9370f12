//! CPU time: the client's own (getrusage) and a server's, summed over a process and all its
//! descendants from /proc.
//!
//! /proc's utime and stime tick at 10 ms, too coarse for a short window, so each live task's
//! time comes from `/proc/PID/task/TID/schedstat` (nanoseconds) where the kernel provides it,
//! and from `stat` otherwise. A child that exits and is reaped during the window moves its time
//! into its parent's cutime+cstime, so those are added too (at tick resolution): the sum stays
//! continuous when workers are replaced.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::time::Duration;

/// CPU time (user + system) this process used so far, all threads included.
pub fn client_cpu() -> Duration {
    use nix::sys::resource::{getrusage, UsageWho};
    // RUSAGE_SELF cannot fail; zero if it somehow does.
    use nix::sys::time::TimeValLike;
    let micros =
        |t: nix::sys::time::TimeVal| Duration::from_micros(t.num_microseconds().max(0) as u64);
    getrusage(UsageWho::RUSAGE_SELF).map_or(Duration::ZERO, |usage| {
        micros(usage.user_time()) + micros(usage.system_time())
    })
}

/// The fields of `/proc/PID/stat` used here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub ppid: u32,
    /// Own user and system time, in clock ticks.
    pub utime: u64,
    pub stime: u64,
    /// Reaped children's user and system time, in clock ticks.
    pub cutime: u64,
    pub cstime: u64,
}

/// Parses a `/proc/PID/stat` line. The command name is in parentheses and may itself contain
/// spaces and parentheses, so fields are counted from the last `)`.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let after = &text[text.rfind(')')? + 1..];
    // After the name: state(3) ppid(4) ... utime(14) stime(15) cutime(16) cstime(17).
    let fields: Vec<&str> = after.split_ascii_whitespace().take(15).collect();
    let num = |i: usize| fields.get(i - 3)?.parse::<u64>().ok();
    Some(Stat {
        ppid: u32::try_from(num(4)?).ok()?,
        utime: num(14)?,
        stime: num(15)?,
        cutime: num(16)?,
        cstime: num(17)?,
    })
}

/// Parses `/proc/.../schedstat`: the first field is the time spent running, in nanoseconds.
pub fn parse_schedstat(text: &str) -> Option<u64> {
    text.split_ascii_whitespace().next()?.parse().ok()
}

/// One sample of a process tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TreeSample {
    pub cpu: Duration,
    /// Processes in the tree (the root included).
    pub processes: usize,
}

/// The clock tick of /proc's times (`sysconf(_SC_CLK_TCK)`, 100 on Linux if unknown).
fn ticks_per_second() -> u64 {
    use nix::unistd::{sysconf, SysconfVar};
    sysconf(SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|hz| u64::try_from(hz).ok())
        .filter(|&hz| hz > 0)
        .unwrap_or(100)
}

/// The processes of a tree, as one scan of /proc found them. The scan reads every process's
/// stat (milliseconds on a busy host); [`Tree::sample`] reads only the tree's own files, so it
/// can be taken right at the edge of a short window.
#[derive(Debug, Clone)]
pub struct Tree {
    pids: Vec<u32>,
}

/// Finds every root and its live descendants (several roots: several servers, e.g. instances
/// sharing one ledger; a process under two roots counts once). Fails when a root does not
/// exist.
pub fn find_tree(roots: &[u32]) -> io::Result<Tree> {
    let stats = all_stats()?;
    if let Some(root) = roots.iter().find(|root| !stats.contains_key(root)) {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no process {root}"),
        ));
    }
    Ok(Tree {
        pids: descendants(roots, &stats),
    })
}

impl Tree {
    /// CPU time used so far by the processes found (plus reaped children's, see the module
    /// docs). One that exited since is skipped: its time is in its parent's reaped-children
    /// time. One started since is not counted (it had used nothing when the tree was found).
    pub fn sample(&self) -> TreeSample {
        let hz = ticks_per_second();
        let ticks = |t: u64| Duration::from_nanos(t.saturating_mul(1_000_000_000) / hz);
        let mut sample = TreeSample {
            cpu: Duration::ZERO,
            processes: 0,
        };
        for &pid in &self.pids {
            let Some(s) = read_stat(pid) else { continue };
            sample.cpu += own_cpu(pid).unwrap_or_else(|| ticks(s.utime + s.stime));
            sample.cpu += ticks(s.cutime + s.cstime);
            sample.processes += 1;
        }
        sample
    }
}

/// CPU time used so far by the roots and every live descendant (plus reaped children's, see
/// the module docs). Fails when a root does not exist.
pub fn sample_tree(roots: &[u32]) -> io::Result<TreeSample> {
    Ok(find_tree(roots)?.sample())
}

/// The roots and their descendants, each once, from a pid -> stat table.
pub fn descendants(roots: &[u32], stats: &HashMap<u32, Stat>) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for (&pid, s) in stats {
        children.entry(s.ppid).or_default().push(pid);
    }
    let mut tree = roots.to_vec();
    tree.sort_unstable();
    tree.dedup();
    let mut i = 0;
    while i < tree.len() {
        if let Some(kids) = children.get(&tree[i]) {
            tree.extend(kids.iter().filter(|k| !roots.contains(k)));
        }
        i += 1;
    }
    tree
}

/// Every process's stat; processes that vanish while being read are skipped.
fn all_stats() -> io::Result<HashMap<u32, Stat>> {
    let mut stats = HashMap::new();
    for entry in fs::read_dir("/proc")? {
        let Some(pid) = entry?
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(s) = read_stat(pid) {
            stats.insert(pid, s);
        }
    }
    Ok(stats)
}

/// `/proc/PID/stat`, or `None` if the process is gone.
fn read_stat(pid: u32) -> Option<Stat> {
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Sum of the schedstat run times of every thread of `pid`, if the kernel provides them.
fn own_cpu(pid: u32) -> Option<Duration> {
    let mut ns = 0u64;
    for task in fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let path = task.ok()?.path().join("schedstat");
        ns += parse_schedstat(&fs::read_to_string(path).ok()?)?;
    }
    Some(Duration::from_nanos(ns))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        let line = "4242 (wei)rd name) S 17 4242 4242 0 -1 4194560 100 0 0 0 \
                    250 40 7 3 20 0 1 0 12345 1000000 100 18446744073709551615";
        assert_eq!(
            parse_stat(line),
            Some(Stat {
                ppid: 17,
                utime: 250,
                stime: 40,
                cutime: 7,
                cstime: 3
            })
        );
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) S 0 1"), None);
    }

    #[test]
    fn schedstat_gives_nanoseconds() {
        assert_eq!(parse_schedstat("753844 79469 2\n"), Some(753_844));
        assert_eq!(parse_schedstat(""), None);
    }

    #[test]
    fn descendants_follow_parent_links_transitively() {
        let st = |ppid| Stat {
            ppid,
            utime: 0,
            stime: 0,
            cutime: 0,
            cstime: 0,
        };
        let stats: HashMap<u32, Stat> = [
            (1, st(0)),
            (10, st(1)),
            (11, st(10)),
            (12, st(10)),
            (13, st(12)),
            (20, st(1)),
        ]
        .into();
        let mut tree = descendants(&[10], &stats);
        tree.sort();
        assert_eq!(tree, [10, 11, 12, 13]);
        let mut trees = descendants(&[20, 12, 10], &stats);
        trees.sort();
        assert_eq!(
            trees,
            [10, 11, 12, 13, 20],
            "a process under two roots counts once"
        );
    }

    #[test]
    fn a_busy_child_shows_up_in_its_parents_tree() {
        let me = std::process::id();
        let before = sample_tree(&[me]).expect("own process exists");
        let mut child = std::process::Command::new("sh")
            .args(["-c", "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done"])
            .spawn()
            .expect("sh runs");
        let during = sample_tree(&[me]).expect("own process exists");
        assert!(during.processes >= 2, "{during:?}");
        child.wait().expect("child exits");
        let after = sample_tree(&[me]).expect("own process exists");
        assert!(after.cpu > before.cpu, "{before:?} {after:?}");
        assert!(sample_tree(&[me, u32::MAX]).is_err());
    }
}
