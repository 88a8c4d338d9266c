//! `warren gateway`, `warren ssh-config` and `warren ws open`: reaching workspaces over SSH.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Args;
use warren_api::{SshView, UserView, WorkspaceView};

use crate::client::{Client, write_private};
use crate::control_cmd::{SshFlags, hostname};
use crate::runtime_cmd::HostFlags;

#[derive(Debug, Args)]
pub struct GatewayArgs {
    /// The server's database (the gateway reads keys and workspaces from it)
    #[arg(long, env = "WARREN_DATABASE_URL")]
    database_url: Option<String>,
    /// This host's name among Warren's hosts (default: the machine's hostname)
    #[arg(long, env = "WARREN_HOST_NAME")]
    host_name: Option<String>,
    #[command(flatten)]
    host: HostFlags,
    #[command(flatten)]
    ssh: SshFlags,
}

/// The SSH gateway alone, for this host's workspaces.
pub fn gateway(args: GatewayArgs, data: &Path) -> anyhow::Result<ExitCode> {
    let settings = args
        .ssh
        .settings(data)?
        .context("`warren gateway` with --ssh-listen off has nothing to do")?;
    let database_url = args
        .database_url
        .unwrap_or_else(|| format!("sqlite://{}", data.join("warren.db").display()));
    crate::control_cmd::refuse_password_in_argv(&database_url)?;
    let runtime = Arc::new(args.host.runtime(data)?);
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    tokio.block_on(async move {
        let (directory, host_id) = warren_server::gateway_directory(warren_server::GatewayOnly {
            database_url,
            host_name: args.host_name.unwrap_or_else(hostname),
            secret_key: data.join("secret.key"),
            git_mirrors: data.join("git/server"),
        })
        .await?;
        let bound = settings.bind().await?;
        let addr = bound.addr;
        let task = bound.serve(
            Arc::new(directory),
            warren_ssh::LocalHost { host_id, runtime },
        );
        println!("Warren's SSH gateway is listening on {addr}");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        task.abort();
        anyhow::Ok(ExitCode::SUCCESS)
    })
}

#[derive(Debug, Args)]
pub struct SshConfigArgs {
    /// Write the entries into ~/.ssh/config (replacing the ones written before) instead of
    /// printing them
    #[arg(long)]
    write: bool,
    /// Have a stopped workspace started when you connect, instead of refused
    #[arg(long)]
    start: bool,
    /// Forward your ssh agent into this workspace (repeatable; `NAME` or `NAME.OWNER`). Off
    /// for every other entry: a forwarded agent lets the workspace's root use your keys while
    /// you are connected
    #[arg(long = "forward-agent", value_name = "WORKSPACE")]
    forward_agent: Vec<String>,
    /// The ssh config file to write
    #[arg(long)]
    file: Option<PathBuf>,
}

const BEGIN: &str = "# >>> warren: written by `warren ssh-config --write`; edits here are replaced";
const END: &str = "# <<< warren";

/// One `Host` entry per workspace: `<workspace>.warren` (yours), `<workspace>.<owner>.warren`
/// (another user's, for admins).
/// `workspaces` are (name, owner) pairs.
fn entries(
    me: &str,
    gateway: &SshView,
    workspaces: &[(String, String)],
    known_hosts: &Path,
    start: bool,
    forward_agent: &[String],
) -> String {
    let (host, port) = (&gateway.host, gateway.port);
    let mut out = String::new();
    for (name, owner) in workspaces {
        let login = if owner == me {
            name.to_owned()
        } else {
            format!("{name}.{owner}")
        };
        out.push_str(&format!(
            "Host {login}.warren\n  HostName {host}\n  Port {port}\n  User {login}\n  \
             UserKnownHostsFile {}\n  ForwardAgent {}\n",
            known_hosts.display(),
            if forward_agent.contains(&login) {
                "yes"
            } else {
                "no"
            }
        ));
        if start {
            out.push_str(&format!("  SetEnv {}=1\n", warren_ssh::START_VARIABLE));
        }
    }
    out
}

/// `config` with Warren's block replaced by `block`, at the top: ssh takes the first value it
/// finds for each option, so Warren's entries win for its hosts. The block ends with `Host *`,
/// so options the file had before any `Host` line still apply to every host, as they did.
fn replace_block(config: &str, block: &str) -> String {
    let mut kept = String::new();
    let mut inside = false;
    for line in config.lines() {
        if line == BEGIN {
            inside = true;
        } else if line == END && inside {
            inside = false;
        } else if !inside {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    format!(
        "{BEGIN}\n{block}Host *\n{END}\n\n{}",
        kept.trim_start_matches('\n')
    )
}

pub fn ssh_config(args: SshConfigArgs) -> anyhow::Result<ExitCode> {
    let client = Client::from_login()?;
    let gateway: SshView = client.get_as("/ssh")?;
    let me: UserView = client.get_as("/me")?;
    let workspaces: Vec<WorkspaceView> = client.get_as("/workspaces")?;
    let workspaces: Vec<(String, String)> =
        workspaces.into_iter().map(|w| (w.name, w.owner)).collect();
    let home = PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?);
    let ssh_dir = home.join(".ssh");
    let known_hosts = ssh_dir.join("warren_known_hosts");
    let block = entries(
        &me.name,
        &gateway,
        &workspaces,
        &known_hosts,
        args.start,
        &args.forward_agent,
    );
    if !args.write {
        print!("{block}");
        return Ok(ExitCode::SUCCESS);
    }
    let config = args.file.unwrap_or_else(|| ssh_dir.join("config"));
    if let Some(dir) = config.parent() {
        std::fs::create_dir_all(dir)?;
    }
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(&ssh_dir)?;
        std::fs::set_permissions(&ssh_dir, std::fs::Permissions::from_mode(0o700))?;
    }
    write_private(
        &known_hosts,
        format!("{}\n", gateway.known_hosts).as_bytes(),
    )?;
    let current = match std::fs::read_to_string(&config) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", config.display())),
    };
    write_private(&config, replace_block(&current, &block).as_bytes())?;
    let count = block.matches("\nHost ").count() + usize::from(block.starts_with("Host "));
    println!(
        "wrote {count} workspace entr{} to {} (connect with `ssh <workspace>.warren`)",
        if count == 1 { "y" } else { "ies" },
        config.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// The `vscode://` link that opens a workspace through VS Code's Remote-SSH extension, in
/// `folder` or else where its sessions land (the project's checkout, or root's home).
pub fn open_link(client: &Client, name: &str, folder: Option<&str>) -> anyhow::Result<String> {
    let (ws, alias) = with_host_alias(client, name)?;
    let folder = folder.or(ws.folder.as_deref()).unwrap_or("/root");
    Ok(warren_api::vscode_link(&alias, folder))
}

/// The `Host` that `warren ssh-config` wrote for a workspace.
pub fn host_alias(client: &Client, name: &str) -> anyhow::Result<String> {
    Ok(with_host_alias(client, name)?.1)
}

/// The workspace `name` names and its `Host` in `warren ssh-config`'s entries.
fn with_host_alias(client: &Client, name: &str) -> anyhow::Result<(WorkspaceView, String)> {
    let me: UserView = client.get_as("/me")?;
    // `<workspace>.<owner>` names another user's, as at the gateway.
    let ws: WorkspaceView = match name.split_once('.') {
        Some((ws_name, owner)) => client
            .get_as::<Vec<WorkspaceView>>("/workspaces")?
            .into_iter()
            .find(|w| w.name == ws_name && w.owner == owner)
            .with_context(|| format!("no workspace `{ws_name}` of `{owner}` that you can see"))?,
        None => client.get_as(&format!("/workspaces/{name}"))?,
    };
    let alias = if ws.owner == me.name {
        format!("{}.warren", ws.name)
    } else {
        format!("{}.{}.warren", ws.name, ws.owner)
    };
    Ok((ws, alias))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_name_own_and_others_workspaces() {
        let gateway = SshView {
            host: "devbox".into(),
            port: 2222,
            known_hosts: String::new(),
        };
        let workspaces = [
            ("web".to_owned(), "alice".to_owned()),
            ("api".to_owned(), "bob".to_owned()),
        ];
        let text = entries(
            "alice",
            &gateway,
            &workspaces,
            Path::new("/h/.ssh/warren_known_hosts"),
            true,
            &["api.bob".to_owned()],
        );
        assert!(
            text.contains("Host web.warren\n") && text.contains("ForwardAgent no\n"),
            "off unless asked: {text}"
        );
        assert!(text.contains(
            "User api.bob\n  UserKnownHostsFile /h/.ssh/warren_known_hosts\n  ForwardAgent yes\n"
        ));
        assert!(text.contains("Host web.warren\n  HostName devbox\n  Port 2222\n  User web\n"));
        assert!(text.contains("Host api.bob.warren\n") && text.contains("User api.bob\n"));
        assert!(text.contains("SetEnv WARREN_START=1"));
    }

    #[test]
    fn the_block_is_replaced_and_the_rest_kept() {
        let first = replace_block(
            "ServerAliveInterval 30\nHost other\n  User me\n",
            "Host a.warren\n",
        );
        // The file's global option still comes after a `Host *`, not inside a.warren's entry.
        assert!(
            first.contains("Host *\n# <<< warren\n\nServerAliveInterval 30\n"),
            "{first}"
        );
        assert!(first.starts_with(BEGIN));
        assert!(first.contains("Host a.warren\n") && first.contains("Host other\n  User me\n"));
        let second = replace_block(&first, "Host b.warren\n");
        assert!(!second.contains("a.warren"));
        assert_eq!(second.matches(BEGIN).count(), 1);
        assert!(second.contains("Host b.warren\n") && second.contains("Host other\n"));
    }
}
