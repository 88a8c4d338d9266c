//! The syscalls no workspace process makes. The user namespace already keeps a workspace's
//! root from the host's devices, modules, clock and disks; this filter is the defence in depth
//! Docker's default profile gives containers, cut to what a system container running its own
//! Docker, mounts and debuggers still needs: it refuses the calls that reach kernel state shared
//! with the host or other tenants (keyrings, eBPF, perf events, io_uring, userfaultfd) or that
//! belong to the host alone (modules, kexec, swap, the clock, accounting, port I/O). Mounts,
//! namespaces, `ptrace` and `unshare` stay allowed: nested engines and debuggers need them,
//! and the user namespace bounds them.
//!
//! Applied to a container's init (and so to all it starts) through libcontainer, and to every
//! process exec'd into a workspace (sessions, commands, tasks, build steps), which do not
//! descend from init.

/// Refused as "not implemented", so programs fall back (runc without a session keyring, an
/// event loop without io_uring).
const ABSENT: &[&str] = &[
    "add_key",
    "keyctl",
    "request_key",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "userfaultfd",
];

/// Refused as "not permitted".
const REFUSED: &[&str] = &[
    "bpf",
    "perf_event_open",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "create_module",
    "query_module",
    "get_kernel_syms",
    "open_by_handle_at",
    "lookup_dcookie",
    "nfsservctl",
    "uselib",
    "iopl",
    "ioperm",
    "swapon",
    "swapoff",
    "acct",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
];

/// The filter as an OCI `linux.seccomp` object.
pub(crate) fn profile() -> serde_json::Value {
    let architectures: &[&str] = if cfg!(target_arch = "x86_64") {
        &["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    } else if cfg!(target_arch = "aarch64") {
        &["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]
    } else {
        &[]
    };
    serde_json::json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": architectures,
        "syscalls": [
            {"names": ABSENT, "action": "SCMP_ACT_ERRNO", "errnoRet": libc::ENOSYS},
            {"names": REFUSED, "action": "SCMP_ACT_ERRNO", "errnoRet": libc::EPERM},
        ],
    })
}

/// Loads the filter into this process, which then passes it to everything it runs. Needs
/// CAP_SYS_ADMIN in its user namespace (an exec'd process has it until it becomes its user).
pub(crate) fn install() -> Result<(), String> {
    let seccomp: libcontainer::oci_spec::runtime::LinuxSeccomp =
        serde_json::from_value(profile()).map_err(|e| format!("seccomp profile: {e}"))?;
    libcontainer::seccomp::initialize_seccomp(&seccomp)
        .map(|_| ())
        .map_err(|e| format!("cannot load the seccomp filter: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_profile_reads_as_oci_and_refuses_what_it_names() {
        let parsed: libcontainer::oci_spec::runtime::LinuxSeccomp =
            serde_json::from_value(profile()).expect("an OCI seccomp object");
        let names: Vec<String> = parsed
            .syscalls()
            .iter()
            .flatten()
            .flat_map(|s| s.names().to_vec())
            .collect();
        for name in ["keyctl", "bpf", "io_uring_setup", "kexec_load"] {
            assert!(names.iter().any(|n| n == name), "{name}");
        }
        // What a system container running Docker needs stays allowed.
        for name in ["mount", "unshare", "setns", "clone", "ptrace", "pivot_root"] {
            assert!(!names.iter().any(|n| n == name), "{name}");
        }
    }
}
