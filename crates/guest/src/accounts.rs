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

pub fn resolve_account(user: Option<&str>) -> Result<Account, String> {
    let user = user.unwrap_or("root");
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
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
    fn groups_include_memberships() {
        assert_eq!(parse_groups(GROUP, "dev", 1000), vec![1000, 27, 999]);
        assert_eq!(parse_groups(GROUP, "root", 0), vec![0]);
    }
}
