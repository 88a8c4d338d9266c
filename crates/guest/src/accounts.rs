//! Users of a workspace, read from its own `/etc/passwd` and `/etc/group` (shared by the
//! container backend's exec and the guest agent).

/// A user inside the workspace, from its `/etc/passwd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
    pub shell: String,
}

/// The socket of an agent-forwarding session, in its private folder (see
/// [`agent_folder_name`]).
pub const AGENT_SOCKET_NAME: &str = "agent.sock";

/// A fresh, unguessable name for the private folder (under the workspace's `/tmp`) that holds
/// an agent-forwarding socket.
pub fn agent_folder_name() -> String {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS's random source once per process; the counter and the
    // clock make each call differ.
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    format!("warren-ssh-{:016x}", h.finish())
}

pub fn parse_passwd(passwd: &str, user: &str) -> Option<Account> {
    let numeric: Option<u32> = user.parse().ok();
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 7 {
            return None;
        }
        let uid: u32 = f[2].parse().ok()?;
        let matches = f[0] == user || numeric == Some(uid);
        matches.then(|| Account {
            name: f[0].to_owned(),
            uid,
            gid: f[3].parse().unwrap_or(uid),
            home: f[5].to_owned(),
            shell: f[6].to_owned(),
        })
    })
}

/// Supplementary groups of `name` (groups that list it as a member), plus its primary group.
pub fn parse_groups(group: &str, name: &str, primary: u32) -> Vec<u32> {
    let mut gids = vec![primary];
    for line in group.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 4 {
            continue;
        }
        if f[3].split(',').any(|m| m == name)
            && let Ok(gid) = f[2].parse::<u32>()
            && !gids.contains(&gid)
        {
            gids.push(gid);
        }
    }
    gids
}

/// The most of an account file (`/etc/passwd`, `/etc/group`) that is read: a workspace's
/// root writes these files, so a reader must not be made to hold gigabytes.
pub const ACCOUNT_FILE_LIMIT: u64 = 1 << 20;

/// Reads an account file already opened (without blocking: `O_NONBLOCK`): only a regular file
/// of at most [`ACCOUNT_FILE_LIMIT`] bytes. A FIFO, a device or a socket put in its place by a
/// workspace's root is refused, never waited on.
pub fn read_account_fd(file: std::fs::File, path: &str) -> Result<String, String> {
    use std::io::Read;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot read the workspace's {path}: {e}"))?;
    if !meta.file_type().is_file() {
        return Err(format!(
            "the workspace's {path} is not a regular file; refusing to read it"
        ));
    }
    let mut text = String::new();
    file.take(ACCOUNT_FILE_LIMIT + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read the workspace's {path}: {e}"))?;
    if text.len() as u64 > ACCOUNT_FILE_LIMIT {
        return Err(format!(
            "the workspace's {path} is larger than {ACCOUNT_FILE_LIMIT} bytes; refusing to read it"
        ));
    }
    Ok(text)
}

/// Reads an account file of the workspace this process is in (see [`read_account_fd`]); a
/// missing file reads as empty.
pub fn read_account_file(path: &str) -> Result<String, String> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
    {
        Ok(file) => read_account_fd(file, path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(format!("cannot open the workspace's {path}: {e}")),
    }
}

pub fn resolve_account(user: Option<&str>) -> Result<Account, String> {
    let user = user.unwrap_or("root");
    let passwd = read_account_file("/etc/passwd")?;
    if let Some(account) = parse_passwd(&passwd, user) {
        return Ok(account);
    }
    match user.parse::<u32>() {
        Ok(uid) => Ok(Account {
            name: user.to_owned(),
            uid,
            gid: uid,
            home: "/".into(),
            shell: "/bin/sh".into(),
        }),
        Err(_) => Err(format!("no user `{user}` in the workspace's /etc/passwd")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
        daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
        dev:x:1000:1000:Dev,,,:/home/dev:/bin/zsh\n";
    const GROUP: &str = "root:x:0:\nsudo:x:27:dev\ndocker:x:999:alice,dev\nusers:x:100:alice\n";

    #[test]
    fn users_resolve_by_name_or_uid() {
        let dev = parse_passwd(PASSWD, "dev");
        assert_eq!(
            dev,
            Some(Account {
                name: "dev".into(),
                uid: 1000,
                gid: 1000,
                home: "/home/dev".into(),
                shell: "/bin/zsh".into()
            })
        );
        assert_eq!(parse_passwd(PASSWD, "1000"), dev);
        assert_eq!(
            parse_passwd(PASSWD, "0").map(|a| a.name),
            Some("root".into())
        );
        assert_eq!(parse_passwd(PASSWD, "nobody"), None);
        assert_eq!(parse_passwd("broken:line\n", "broken"), None);
    }

    #[test]
    fn a_fifo_or_an_oversized_file_is_refused_not_waited_on() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("passwd");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        // Nobody writes to it: a blocking read would never return.
        let err = read_account_file(fifo.to_str().unwrap()).unwrap_err();
        assert!(err.contains("not a regular file"), "{err}");
        let big = dir.path().join("group");
        std::fs::write(&big, vec![b'x'; ACCOUNT_FILE_LIMIT as usize + 1]).unwrap();
        let err = read_account_file(big.to_str().unwrap()).unwrap_err();
        assert!(err.contains("larger than"), "{err}");
        assert_eq!(
            read_account_file(dir.path().join("none").to_str().unwrap()),
            Ok(String::new())
        );
        std::fs::write(&big, PASSWD).unwrap();
        assert_eq!(read_account_file(big.to_str().unwrap()).unwrap(), PASSWD);
    }

    #[test]
    fn groups_include_memberships() {
        assert_eq!(parse_groups(GROUP, "dev", 1000), vec![1000, 27, 999]);
        assert_eq!(parse_groups(GROUP, "root", 0), vec![0]);
    }
}
