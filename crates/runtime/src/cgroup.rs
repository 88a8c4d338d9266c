//! A workspace's cgroups. libcontainer creates them and applies the limits (through youki's
//! `libcgroups`, which reads the host's layout — v1, v2 or hybrid — at start); this module adds
//! what Warren needs around that: exec'd processes join them, their counters become `Stats`, the
//! workspace's root is given its own subtree (so Docker inside can make cgroups), and delete
//! removes every directory, including those made inside.

use std::os::unix::fs::chown;
use std::path::PathBuf;

use libcgroups::common::{AnyCgroupManager, CgroupConfig, CgroupManager, create_cgroup_manager};
use nix::unistd::Pid;

use crate::Error;
use crate::record::WorkspaceRecord;

fn manager(rec: &WorkspaceRecord) -> Result<AnyCgroupManager, Error> {
    create_cgroup_manager(CgroupConfig {
        cgroup_path: rec.cgroup_path(),
        systemd_cgroup: false,
        container_name: rec.container_id(),
    })
    .map_err(|e| Error::Sys(format!("cgroups of `{}`: {e}", rec.config.id)))
}

/// Moves `pid` into every cgroup of the workspace.
pub(crate) fn add(rec: &WorkspaceRecord, pid: i32) -> Result<(), Error> {
    manager(rec)?.add_task(Pid::from_raw(pid)).map_err(|e| {
        Error::Sys(format!(
            "cannot move process {pid} into `{}`: {e}",
            rec.config.id
        ))
    })
}

/// cpu, memory and pids counters.
pub(crate) fn stats(rec: &WorkspaceRecord) -> Result<crate::Stats, Error> {
    let s = manager(rec)?
        .stats()
        .map_err(|e| Error::Sys(format!("cgroup counters of `{}`: {e}", rec.config.id)))?;
    let limit = |l: u64| (l != 0 && l < i64::MAX as u64 / 2).then_some(l);
    Ok(crate::Stats {
        cpu_ns: s.cpu.usage.usage_total,
        memory_bytes: s.memory.memory.usage,
        memory_limit: limit(s.memory.memory.limit),
        pids: s.pids.current,
        pids_limit: limit(s.pids.limit),
        disk_bytes: 0,
        vm: None,
    })
}

/// The workspace's cgroup directory in every mounted hierarchy (v1 controllers, v2 unified).
pub(crate) fn dirs(rec: &WorkspaceRecord) -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let relative = rec.cgroup_path();
    let relative = relative.strip_prefix("/").unwrap_or(&relative);
    let mut found = Vec::new();
    for line in info.lines() {
        let Some((fields, fs)) = line.split_once(" - ") else {
            continue;
        };
        let fstype = fs.split(' ').next().unwrap_or("");
        if fstype != "cgroup" && fstype != "cgroup2" {
            continue;
        }
        let Some(mountpoint) = fields.split(' ').nth(4) else {
            continue;
        };
        let dir = PathBuf::from(mountpoint).join(relative);
        if dir.is_dir() && !found.contains(&dir) {
            found.push(dir);
        }
    }
    found
}

/// Every process in the workspace's cgroups, nested cgroups included (a tenant cannot move a
/// process out of its subtree).
pub(crate) fn processes(rec: &WorkspaceRecord) -> Vec<i32> {
    let mut pids = Vec::new();
    let mut stack = dirs(rec);
    while let Some(dir) = stack.pop() {
        if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            stack.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Hands the workspace's cgroups to its root (the files a delegated subtree needs), so a nested
/// engine can create and limit its own children. Limits set on these directories stay out of
/// reach: the limit files of the directory itself are not given away.
pub(crate) fn delegate(rec: &WorkspaceRecord) -> Result<(), Error> {
    let owner = Some(rec.uid_base);
    for dir in dirs(rec) {
        chown(&dir, owner, owner).map_err(Error::io("cannot delegate the cgroup", &dir))?;
        for file in [
            "cgroup.procs",
            "tasks",
            "cgroup.subtree_control",
            "cgroup.threads",
        ] {
            let path = dir.join(file);
            if path.exists() {
                chown(&path, owner, owner).map_err(Error::io("cannot delegate", &path))?;
            }
        }
    }
    Ok(())
}

/// Removes the workspace's cgroups, children first; returns those that remain.
pub(crate) fn remove(rec: &WorkspaceRecord) -> Vec<String> {
    if let Ok(m) = manager(rec) {
        let _ = m.remove();
    }
    let mut failed = Vec::new();
    for dir in dirs(rec) {
        if let Err(e) = remove_tree(&dir) {
            failed.push(format!("cgroup {} ({e})", dir.display()));
        }
    }
    failed
}

fn remove_tree(dir: &std::path::Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_tree(&entry.path())?;
        }
    }
    std::fs::remove_dir(dir)
}
