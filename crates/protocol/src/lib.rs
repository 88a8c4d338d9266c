//! What Warren's parts say to each other, with no machinery of their own: the jobs the
//! control plane gives a host's agent and the reports it gets back, the workspace settings both
//! sides read (tasks, VM options, resource use), the host tunnel's names, and the image names
//! reserved to Warren. The server, the agent, the runtime and the build all share these, so
//! the control plane links none of the host's machinery.

pub mod build_log;
pub mod gateway;
mod jobs;
pub mod relay;

pub use jobs::*;

use serde::{Deserialize, Serialize};

/// The smallest disk limit a workspace may have: ext4 with a journal needs room for its own
/// metadata.
pub const MIN_DISK: u64 = 64 << 20;

/// The host tunnel (see `warren_agent::tunnel`).
pub mod tunnel {
    use std::time::Duration;

    /// The protocol named in `Upgrade`.
    pub const PROTOCOL: &str = "warren-host-tunnel";

    /// Where an agent asks the control plane for its tunnel.
    pub const PATH: &str = "/api/v1/agent/tunnel";

    /// How often either side pings, and how long it waits for the answer before it gives the
    /// connection up.
    pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

    /// The largest HTTP/2 DATA frame either side of a tunnel accepts (HTTP/2's default is
    /// 16 KiB): a body piece of [`STREAM_BUFFER`] (or a relayed session's frame) goes as one
    /// DATA frame, not four or more, each a wake-up and a write on both sides.
    pub const MAX_FRAME_SIZE: u32 = 256 << 10;

    /// How much of a call's body a tunnel's side buffers on its way to or from HTTP/2, and so
    /// the largest piece it hands on at once (sixteen times tokio's default for a byte stream,
    /// and what each open stream may hold: a forwarded connection that sits idle keeps it).
    pub const STREAM_BUFFER: usize = 64 << 10;

    /// How a server's certificate is named to its agents (`warren host add` prints it, an
    /// agent pins it): `sha256:` and the lowercase hex of the SHA-256 of its DER form.
    pub fn fingerprint(cert_der: &[u8]) -> String {
        use sha2::Digest as _;
        let hex: String = sha2::Sha256::digest(cert_der)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("sha256:{hex}")
    }

    /// A fingerprint as [`fingerprint`] prints it, or the bare hex (colons allowed, any case,
    /// as `openssl x509 -fingerprint -sha256` prints it after its `=`).
    pub fn parse_fingerprint(text: &str) -> Result<[u8; 32], String> {
        let bad = || {
            format!(
                "server fingerprint {text:?}: expected sha256: and 64 hex digits, as `warren host add` prints it"
            )
        };
        let text = text.trim();
        let hex: String = text
            .strip_prefix("sha256:")
            .or_else(|| text.strip_prefix("SHA256:"))
            .unwrap_or(text)
            .chars()
            .filter(|&c| c != ':')
            .collect();
        if hex.len() != 64 || !hex.is_ascii() {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(out)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn fingerprints_read_as_printed_and_as_openssl_prints_them() {
            let printed = fingerprint(b"a certificate");
            assert!(printed.starts_with("sha256:") && printed.len() == 7 + 64);
            let bytes = parse_fingerprint(&printed).unwrap();
            let openssl: Vec<String> = bytes.iter().map(|b| format!("{b:02X}")).collect();
            assert_eq!(parse_fingerprint(&openssl.join(":")).unwrap(), bytes);
            assert!(parse_fingerprint("sha256:abc").is_err());
            assert!(parse_fingerprint(&format!("sha256:{}", "zz".repeat(32))).is_err());
            assert!(parse_fingerprint(&format!("sha256:{}", "é".repeat(32))).is_err());
        }
    }
}

/// The error of a step stopped by a cancel.
pub const CANCELLED: &str = "cancelled";

/// Image repositories Warren names itself (prebuilds, environments, cached steps, workspaces'
/// saved layers): each a project's or a workspace's own, so never what a user writes (`FROM`,
/// an environment file's `image:`, `ws create --image`) — reached only through the build, the
/// project or the workspace that made it. In a registry too: `HOST/REPO/warren-prebuild:KEY`.
pub const RESERVED_REPOSITORIES: [&str; 4] = [
    "warren-prebuild",
    "warren-env",
    "warren-build-cache",
    "warren-layers",
];

/// Refuses a reference a user wrote when it names one of [`RESERVED_REPOSITORIES`] (as its
/// last path part, on a registry or not), or names an image by its bare digest (`sha256:...`),
/// which reaches every image in the store, prebuilds included. Docker takes no bare digest
/// either (`NAME@sha256:...`).
pub fn refuse_reserved(reference: &str) -> Result<(), String> {
    let name = reference.split('@').next().unwrap_or_default();
    // The tag is what follows the last `:` after the last `/` (a registry's port is not one).
    let name = match name.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => name,
        _ => name,
    };
    let repository = name.rsplit('/').next().unwrap_or(name);
    if RESERVED_REPOSITORIES
        .iter()
        .any(|r| r.eq_ignore_ascii_case(repository))
    {
        return Err(format!(
            "{reference}: a prebuild's or a build step's image is its project's, not to be named"
        ));
    }
    if repository.eq_ignore_ascii_case("sha256") {
        return Err(format!(
            "{reference}: name an image by NAME:TAG, not by its bare digest (which could be a prebuild's, reached only through its project)"
        ));
    }
    Ok(())
}

/// One task as the runtime runs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// Unique within the workspace; names its log and its terminal.
    pub name: String,
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub cwd: Option<String>,
    /// Only on the workspace's first start (devcontainer `postCreateCommand`).
    #[serde(default)]
    pub once: bool,
    /// Tasks of a stage start when every task of the stages before has ended.
    #[serde(default)]
    pub stage: u32,
}

/// What a VM workspace has beyond a container's. Its memory is `limits.memory` (default
/// [`VmOptions::DEFAULT_MEMORY`]), its CPUs `limits.cpus` rounded up (default 2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmOptions {
    /// Mark the VM's memory mergeable by the host's Kernel Samepage Merging. Off unless the
    /// admin trusts every tenant whose VMs share the host: merged pages let one VM detect what
    /// another holds in memory (a timing side channel).
    #[serde(default)]
    pub ksm: bool,
    /// The guest hands pages it frees back to the host (virtio-balloon free page reporting).
    /// On by default; off only to measure what it saves.
    #[serde(default = "yes", skip_serializing_if = "is_yes")]
    pub free_page_reporting: bool,
}

fn yes() -> bool {
    true
}

fn is_yes(b: &bool) -> bool {
    *b
}

impl Default for VmOptions {
    fn default() -> Self {
        Self {
            ksm: false,
            free_page_reporting: true,
        }
    }
}

impl VmOptions {
    pub const DEFAULT_MEMORY: u64 = 2 << 30;
    pub const DEFAULT_CPUS: u32 = 2;
}

/// Resource use of a running workspace.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub cpu_ns: u64,
    pub memory_bytes: u64,
    pub memory_limit: Option<u64>,
    pub pids: u64,
    pub pids_limit: Option<u64>,
    /// Bytes used on disk by the writable layer.
    pub disk_bytes: u64,
    /// A VM's own figures (`memory_bytes` is then what its QEMU holds on the host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<VmStats>,
}

/// What a running VM workspace reports beyond a container's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStats {
    /// `kvm` or `tcg`.
    pub accel: String,
    /// The guest's memory as its balloon driver last reported it (every 2 s), bytes.
    pub guest_total: u64,
    pub guest_free: u64,
    pub guest_available: u64,
}

/// `text` safe to show on a terminal: a registry's words (an error body) or a build step's may
/// hold escape sequences; every control character but newline and tab becomes `?`, and so do
/// the marks that reorder how a line reads.
pub fn printable(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '\n' | '\t' => c,
            // Controls, and the marks that reorder how a line reads.
            c if c.is_control()
                || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}') =>
            {
                '?'
            }
            c => c,
        })
        .collect()
}
