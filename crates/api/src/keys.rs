//! SSH public keys and the SSH gateway.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    pub name: String,
    pub public_key: String,
    /// An SSH signature (`ssh-keygen -Y sign -n warren-key`) of the caller's
    /// [`KeyChallenge`] message, made with the key: the proof that the caller holds it.
    #[serde(default)]
    pub signature: Option<String>,
}

/// What a user signs with a key to add it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct KeyChallenge {
    pub namespace: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[cfg_attr(feature = "sqlx", derive(sqlx::FromRow))]
pub struct KeyView {
    pub id: String,
    pub name: String,
    pub public_key: String,
    pub fingerprint: String,
}

/// How developers reach the SSH gateway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SshView {
    /// The name developers' machines know this host by.
    pub host: String,
    pub port: u16,
    /// The gateway's host key as a `known_hosts` line.
    pub known_hosts: String,
}
