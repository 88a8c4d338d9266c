//! The OCI runtime configuration (`config.json`) of a workspace container. Pure: built from the
//! record, so the choices below are unit-tested without root.
//!
//! Choices: every namespace including user and cgroup; root inside maps to the workspace's
//! unprivileged range; all capabilities (they only count inside the user namespace); `/proc` and
//! `/sys` are not masked or made read-only, so nested engines (Docker, Podman) can mount their own
//! — the user namespace is the boundary, not masks. `/dev/fuse` and `/dev/net/tun` are passed
//! through for fuse-overlayfs, VPNs and slirp.

use serde_json::{Value, json};

use crate::record::{ID_RANGE, Layout, WorkspaceRecord};

/// `process.args[0]` of the container's first process: the marker that makes the shim's
/// executor run Warren's init (`init.rs`) instead of exec'ing a program from the image.
pub(crate) const INIT_MARKER: &str = "/.warren/init";

pub(crate) const DEFAULT_PATH: &str =
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

const CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

pub(crate) fn hostname(rec: &WorkspaceRecord) -> String {
    rec.config
        .hostname
        .clone()
        .unwrap_or_else(|| rec.config.id.to_string())
}

pub(crate) fn oci_config(rec: &WorkspaceRecord, layout: &Layout) -> Value {
    let mut env = vec![DEFAULT_PATH.to_owned()];
    env.extend(rec.config.env.iter().cloned());
    // Without HOME, libcontainer looks init's up in the workspace's /etc/passwd, which the
    // workspace's root may have made a FIFO: the start would hang on it.
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        env.push("HOME=/root".into());
    }
    let etc = layout.etc();
    let bind = |dest: &str, source: std::path::PathBuf| json!({"destination": dest, "type": "bind", "source": source, "options": ["rbind", "rw"]});
    let limits = &rec.config.limits;
    let mut resources = json!({ "devices": crate::cgroup::device_rules() });
    if let Some(memory) = limits.memory {
        resources["memory"] = json!({ "limit": memory });
    }
    if let Some(pids) = limits.pids {
        resources["pids"] = json!({ "limit": pids });
    }
    if let Some(cpus) = limits.cpus {
        let period = 100_000u64;
        resources["cpu"] =
            json!({ "quota": (cpus * period as f64).round() as i64, "period": period });
    }
    let char_dev = |path: &str, major: u32, minor: u32| json!({"path": path, "type": "c", "major": major, "minor": minor, "fileMode": 0o666, "uid": 0, "gid": 0});
    let map = json!([{ "containerID": 0, "hostID": rec.uid_base, "size": ID_RANGE }]);
    json!({
        "ociVersion": "1.0.2",
        "root": { "path": layout.rootfs(), "readonly": false },
        "hostname": hostname(rec),
        "process": {
            "args": [INIT_MARKER],
            "cwd": "/",
            "env": env,
            "user": { "uid": 0, "gid": 0 },
            "terminal": false,
            "noNewPrivileges": false,
            "capabilities": {
                "bounding": CAPABILITIES,
                "effective": CAPABILITIES,
                "permitted": CAPABILITIES,
            },
        },
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime"]},
            bind("/etc/resolv.conf", etc.join("resolv.conf")),
            bind("/etc/hosts", etc.join("hosts")),
            bind("/etc/hostname", etc.join("hostname")),
            bind("/var/lib/docker", layout.docker()),
        ],
        "linux": {
            "namespaces": [
                {"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"},
                {"type": "mount"}, {"type": "cgroup"}, {"type": "user"},
            ],
            "uidMappings": map,
            "gidMappings": map,
            "cgroupsPath": rec.cgroup_path(),
            "resources": resources,
            "devices": [char_dev("/dev/fuse", 10, 229), char_dev("/dev/net/tun", 10, 200)],
            "seccomp": crate::seccomp::profile(),
        },
    })
}

/// `/etc/resolv.conf`, `/etc/hosts` and `/etc/hostname` for the workspace.
pub(crate) fn etc_files(rec: &WorkspaceRecord) -> [(&'static str, String); 3] {
    let host = hostname(rec);
    let mut resolv = String::new();
    for ns in &rec.nameservers {
        resolv.push_str(&format!("nameserver {ns}\n"));
    }
    let hosts = format!(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{}\t{host}\n",
        rec.address
    );
    [
        ("resolv.conf", resolv),
        ("hosts", hosts),
        ("hostname", format!("{host}\n")),
    ]
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::{Limits, RootSource, WorkspaceConfig, WorkspaceId};

    fn record() -> WorkspaceRecord {
        WorkspaceRecord {
            config: WorkspaceConfig {
                id: WorkspaceId::new("dev").unwrap(),
                root: RootSource::Dir {
                    path: "/srv/root".into(),
                },
                hostname: None,
                limits: Limits {
                    cpus: Some(1.5),
                    memory: Some(512 << 20),
                    pids: Some(100),
                    disk: None,
                },
                env: vec!["LANG=C.UTF-8".into()],
                vm: None,
                owner: None,
                tenant: None,
            },
            slot: 3,
            uid_base: 1_000_196_608,
            address: "10.88.0.5".parse().unwrap(),
            prefix_len: 16,
            gateway: "10.88.0.1".parse().unwrap(),
            bridge: "warren0".into(),
            nameservers: vec!["192.0.2.53".parse().unwrap()],
            data: "/var/lib/warren".into(),
            helper: "/usr/bin/warren".into(),
            containers: "/var/lib/warren/runtime/containers".into(),
            vm: None,
            shared_mounts: None,
            no_passthrough: false,
        }
    }

    #[test]
    fn config_maps_root_to_the_workspace_range_and_sets_limits() {
        let layout = Layout {
            dir: "/w/dev".into(),
        };
        let c = oci_config(&record(), &layout);
        assert_eq!(c["linux"]["uidMappings"][0]["hostID"], 1_000_196_608);
        assert_eq!(c["linux"]["uidMappings"][0]["size"], 65536);
        assert_eq!(c["linux"]["gidMappings"], c["linux"]["uidMappings"]);
        let ns: Vec<_> = c["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        for wanted in ["pid", "network", "ipc", "uts", "mount", "cgroup", "user"] {
            assert!(ns.contains(&wanted), "{wanted} namespace");
        }
        assert_eq!(c["linux"]["resources"]["memory"]["limit"], 512 << 20);
        assert_eq!(c["linux"]["resources"]["pids"]["limit"], 100);
        assert_eq!(c["linux"]["resources"]["cpu"]["quota"], 150_000);
        assert_eq!(
            c["linux"]["cgroupsPath"], "/warren/dev-3b9d",
            "named by the uid range too"
        );
        assert!(c["linux"]["maskedPaths"].is_null(), "nothing is masked");
        assert_eq!(c["root"]["path"], "/w/dev/rootfs");
        assert_eq!(c["hostname"], "dev");
        assert_eq!(c["process"]["args"][0], INIT_MARKER);
        assert_eq!(c["process"]["env"][1], "LANG=C.UTF-8");
    }

    #[test]
    fn no_limits_means_only_the_device_rules() {
        let mut rec = record();
        rec.config.limits = Limits::default();
        let c = oci_config(&rec, &Layout { dir: "/w".into() });
        assert_eq!(
            c["linux"]["resources"],
            json!({ "devices": crate::cgroup::device_rules() })
        );
        // Every device is refused first; FUSE and TUN are among those allowed after.
        let rules = &c["linux"]["resources"]["devices"];
        assert_eq!(
            rules[0],
            json!({"allow": false, "type": "a", "access": "rwm"})
        );
        for (major, minor) in [(10, 229), (10, 200)] {
            assert!(
                rules.as_array().unwrap().iter().any(|r| r["allow"] == true
                    && r["type"] == "c"
                    && r["major"] == major
                    && r["minor"] == minor),
                "{rules}"
            );
        }
    }

    #[test]
    fn etc_files_name_the_workspace_and_its_resolvers() {
        let files = etc_files(&record());
        assert_eq!(files[0].1, "nameserver 192.0.2.53\n");
        assert!(files[1].1.contains("10.88.0.5\tdev\n"));
        assert_eq!(files[2].1, "dev\n");
    }
}
