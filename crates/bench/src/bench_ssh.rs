//! `warren-bench ssh`: `scp` throughput through Warren's SSH gateway against OpenSSH's own
//! `sshd` started inside the same workspace (the peer), both ways, same client, same file.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::Serialize;
use serde_json::json;

use crate::bench::sh;
use crate::bench_api::Up;

#[derive(Debug, Serialize)]
struct Throughput {
    upload_mib_s: f64,
    download_mib_s: f64,
}

#[derive(Debug, Serialize)]
struct Results {
    file_mib: u64,
    runs: usize,
    /// A workspace on the gateway's own host.
    gateway: Throughput,
    sshd: Throughput,
    upload_ratio: f64,
    download_ratio: f64,
    /// A workspace on another host (a `warren agent`), relayed through its tunnel, against
    /// sshd in that workspace.
    relayed: Throughput,
    relayed_sshd: Throughput,
    relayed_upload_ratio: f64,
    relayed_download_ratio: f64,
}

/// What the workspace image holds: the peer.
pub(crate) const PACKAGES: &[&str] = &["openssh-server"];

/// Where the peer listens inside the workspace.
const SSHD_PORT: u16 = 2200;

pub(crate) fn ssh(
    mib: u64,
    runs: usize,
    work: &Path,
    json_out: Option<&Path>,
) -> anyhow::Result<()> {
    for program in ["ssh", "scp", "ssh-keygen", "sha256sum"] {
        if warren_runtime::vm::which(program).is_none() {
            bail!("`{program}` is missing (apt install openssh-client coreutils)");
        }
    }
    std::fs::create_dir_all(work)?;
    let rootfs = crate::bench_runtime::debian_rootfs(work, PACKAGES)?;
    let gateway_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let up = Up::start(
        work,
        "ssh",
        &rootfs,
        &["--ssh-listen", &format!("127.0.0.1:{gateway_port}")],
    )?;
    let key = work.join("ssh-bench-key");
    let public_key = register_key(&up, &key)?;
    up.client
        .post("/workspaces", &json!({"name": "ssh", "image": "bench:1"}))?;
    up.wait_running(1, Duration::from_secs(300))?;

    // Another host, whose workspace the gateway reaches through that host's agent.
    let far_host =
        crate::bench_api::AgentHost::start(&up, work, "ssh-far", 1, Some((&rootfs, "far:1")), &[])?;
    up.client
        .post("/workspaces", &json!({"name": "far", "image": "far:1"}))?;
    up.wait_running(2, Duration::from_secs(300))?;

    let client = |program: &str, port: u16| ssh_client(program, &key, port);
    // The peer: OpenSSH's sshd in the workspace, with the same key, on the workspace's address.
    let start_sshd = |login: &str| -> anyhow::Result<String> {
        let address = sh(client("ssh", gateway_port)
            .arg(login)
            .arg(format!(
                "mkdir -p /root/.ssh /run/sshd && chmod 700 /root/.ssh && echo '{}' > /root/.ssh/authorized_keys \
                 && ssh-keygen -A >/dev/null && /usr/sbin/sshd -p {SSHD_PORT} && hostname -I",
                public_key.trim()
            ))
            .stdin(Stdio::null()))?;
        Ok(address
            .split_whitespace()
            .next()
            .context("the workspace has no address")?
            .to_owned())
    };
    let address = start_sshd("ssh@127.0.0.1")?;
    let far_address = start_sshd("far@127.0.0.1")?;

    let payload = work.join("ssh-payload");
    let back = work.join("ssh-payload.back");
    crate::bench::write_random(&payload, mib << 20)?;
    let want = sha256(&payload)?;
    // Each run copies through Warren and through the peer back to back, each way, which one
    // first in turn, so what the machine does meanwhile weighs on both alike. Each side has a
    // file of its own: what comes back down is what that side took up.
    let measure = |sides: [(&str, u16, &str); 2]| -> anyhow::Result<[Throughput; 2]> {
        let mut up_times = [Vec::new(), Vec::new()];
        let mut down_times = [Vec::new(), Vec::new()];
        for run in 0..runs {
            let order = if run % 2 == 0 { [0, 1] } else { [1, 0] };
            for i in order {
                let (_, port, login) = sides[i];
                let t = Instant::now();
                sh(client("scp", port)
                    .arg(&payload)
                    .arg(format!("{login}:/root/payload-{i}")))?;
                up_times[i].push(t.elapsed());
            }
            for i in order {
                let (label, port, login) = sides[i];
                let _ = std::fs::remove_file(&back);
                let t = Instant::now();
                sh(client("scp", port)
                    .arg(format!("{login}:/root/payload-{i}"))
                    .arg(&back))?;
                down_times[i].push(t.elapsed());
                if sha256(&back)? != want {
                    bail!("{label}: the file came back different");
                }
            }
        }
        let rate = |times: &mut Vec<Duration>| {
            times.sort();
            mib as f64 / times[times.len() / 2].as_secs_f64()
        };
        let [(a, ..), (b, ..)] = sides;
        let [mut up_a, mut up_b] = up_times;
        let [mut down_a, mut down_b] = down_times;
        let results = [
            (a, rate(&mut up_a), rate(&mut down_a)),
            (b, rate(&mut up_b), rate(&mut down_b)),
        ]
        .map(|(label, up, down)| {
            eprintln!("{label}: up {up:.0} MiB/s, down {down:.0} MiB/s");
            Throughput {
                upload_mib_s: up,
                download_mib_s: down,
            }
        });
        Ok(results)
    };
    let [gateway, sshd] = measure([
        ("gateway", gateway_port, "ssh@127.0.0.1"),
        (
            "sshd in the workspace",
            SSHD_PORT,
            &format!("root@{address}"),
        ),
    ])?;
    let [relayed, relayed_sshd] = measure([
        ("gateway, relayed", gateway_port, "far@127.0.0.1"),
        (
            "sshd in the far workspace",
            SSHD_PORT,
            &format!("root@{far_address}"),
        ),
    ])?;
    let _ = std::fs::remove_file(&back);
    let _ = std::fs::remove_file(&payload);
    let results = Results {
        file_mib: mib,
        runs,
        upload_ratio: gateway.upload_mib_s / sshd.upload_mib_s,
        download_ratio: gateway.download_mib_s / sshd.download_mib_s,
        gateway,
        sshd,
        relayed_upload_ratio: relayed.upload_mib_s / relayed_sshd.upload_mib_s,
        relayed_download_ratio: relayed.download_mib_s / relayed_sshd.download_mib_s,
        relayed,
        relayed_sshd,
    };
    up.delete_all(Duration::from_secs(120))?;
    drop(far_host);
    drop(up);
    println!("scp of {mib} MiB (median of {runs}), MiB/s:");
    println!("  {:<34}{:>8}{:>8}", "", "up", "down");
    for (label, t) in [
        ("warren gateway", &results.gateway),
        ("sshd in the workspace", &results.sshd),
        ("gateway, relayed to another host", &results.relayed),
        ("sshd in that workspace", &results.relayed_sshd),
    ] {
        println!(
            "  {label:<34}{:>8.0}{:>8.0}",
            t.upload_mib_s, t.download_mib_s
        );
    }
    for (label, up_ratio, down_ratio) in [
        (
            "gateway / sshd",
            results.upload_ratio,
            results.download_ratio,
        ),
        (
            "relayed / sshd there",
            results.relayed_upload_ratio,
            results.relayed_download_ratio,
        ),
    ] {
        println!(
            "  {label:<34}{:>7.0}%{:>7.0}%",
            up_ratio * 100.0,
            down_ratio * 100.0
        );
    }
    if let Some(path) = json_out {
        std::fs::write(path, serde_json::to_vec_pretty(&results)?)?;
    }
    Ok(())
}

/// A new key pair at `key` (and `key.pub`), registered as the admin's with the proof the
/// server asks for (`ssh-keygen -Y sign` of its challenge); the public key.
pub(crate) fn register_key(up: &Up, key: &Path) -> anyhow::Result<String> {
    let _ = std::fs::remove_file(key);
    let _ = std::fs::remove_file(key.with_extension("pub"));
    sh(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(key))?;
    let public_key = std::fs::read_to_string(key.with_extension("pub"))?;
    let challenge = up.client.get("/keys/challenge")?;
    let message = challenge["message"].as_str().context("no challenge")?;
    let mut signer = Command::new("ssh-keygen")
        .args(["-Y", "sign", "-n"])
        .arg(challenge["namespace"].as_str().context("no namespace")?)
        .arg("-f")
        .arg(key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(
        &mut signer.stdin.take().context("no stdin")?,
        message.as_bytes(),
    )?;
    let signed = signer.wait_with_output()?;
    if !signed.status.success() {
        bail!(
            "ssh-keygen -Y sign: {}",
            String::from_utf8_lossy(&signed.stderr)
        );
    }
    up.client.post(
        "/keys",
        &json!({
            "name": "bench",
            "public_key": public_key.trim(),
            "signature": String::from_utf8_lossy(&signed.stdout),
        }),
    )?;
    Ok(public_key)
}

/// `ssh` or `scp` with `key` alone, to `port`, asking nothing and remembering no host.
pub(crate) fn ssh_client(program: &str, key: &Path, port: u16) -> Command {
    let mut cmd = Command::new(program);
    cmd.arg("-i").arg(key).args([
        "-F",
        "/dev/null",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
    ]);
    cmd.arg(if program == "scp" { "-P" } else { "-p" })
        .arg(port.to_string());
    cmd
}

fn sha256(path: &Path) -> anyhow::Result<String> {
    Ok(sh(Command::new("sha256sum").arg(path))?
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned())
}
