//! `/api/v1`: handlers over the database. Every handler takes the [`Caller`] and touches only
//! what the caller owns (admins: everything); another user's object answers 404, as a missing
//! one does, so ids and names do not leak. Request bodies are strict (unknown fields are errors)
//! and bounded.

use axum::extract::FromRequest;

use crate::auth::Caller;
use crate::error::ApiError;

/// `Json` whose rejections (bad JSON, unknown fields, wrong content type, too large) become
/// [`ApiError`]s with a message.
#[derive(Debug, FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct Body<T>(pub T);

pub use crate::model::check_name;

/// Something a user owns, found by id or name.
pub(crate) trait Owned {
    fn id(&self) -> String;
    fn owner_id(&self) -> String;
}

impl Owned for crate::workspaces::Workspace {
    fn id(&self) -> String {
        self.id.0.clone()
    }
    fn owner_id(&self) -> String {
        self.owner_id.clone()
    }
}

/// Of the rows matching an id or a name, the one the caller may see: by id first, then the
/// caller's own by name, then (admins) any.
pub(crate) fn pick_owned<T: Owned>(rows: Vec<T>, caller: &Caller, key: &str) -> Option<T> {
    let visible: Vec<T> = rows
        .into_iter()
        .filter(|r| caller.may_touch(&r.owner_id()))
        .collect();
    let by_id = visible.iter().position(|r| r.id() == key);
    let own = visible.iter().position(|r| r.owner_id() == caller.user_id);
    let at = by_id
        .or(own)
        .or(if visible.len() == 1 { Some(0) } else { None })?;
    visible.into_iter().nth(at)
}

mod hosts;
mod keys;
mod prebuilds;
mod projects;
mod users;
mod variables;
mod workspaces;

pub use hosts::*;
pub use keys::*;
pub use prebuilds::*;
pub use projects::*;
pub use users::*;
pub use variables::*;
pub use workspaces::*;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn git_urls() {
        for ok in [
            "https://example.com/a.git",
            "ssh://git@example.com/a.git",
            "file:///srv/repo",
            "git@example.com:team/a.git",
        ] {
            assert!(check_git_url(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "ftp://x/y",
            "/srv/repo",
            "https://",
            "http://example.com/a",
            "a b",
            "example.com:x",
        ] {
            assert!(check_git_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ssh_keys_are_checked_and_fingerprinted() {
        // `ssh-keygen -lf` of this key prints SHA256:xK6U2Sg9CovItUVxAj+GYpPjKmy/exZ7XALpQnAFgAo.
        let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKpoURYOUvqDe79NUODlAulUiW6t1Hg2A5JCqOEct8Np alice@laptop";
        assert_eq!(
            ssh_fingerprint(key).ok().as_deref(),
            Some("SHA256:xK6U2Sg9CovItUVxAj+GYpPjKmy/exZ7XALpQnAFgAo")
        );
        assert!(ssh_fingerprint("ssh-ed25519").is_err());
        assert!(
            ssh_fingerprint(
                "ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ"
            )
            .is_err()
        );
        assert!(ssh_fingerprint("ssh-ed25519 !!!").is_err());
        assert!(ssh_fingerprint("ssh-dss AAAA").is_err());
    }

    #[test]
    fn names() {
        assert!(check_name("workspace", "dev-1").is_ok());
        for bad in ["", "Dev", "-x", "a_b", &"x".repeat(41)] {
            assert!(check_name("workspace", bad).is_err(), "{bad}");
        }
    }
}
