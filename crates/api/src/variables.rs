//! Environment variables of users and projects.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ScopeQuery {
    #[serde(default)]
    pub project: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewVar {
    pub name: String,
    pub value: String,
    #[serde(default)]
    pub secret: bool,
    /// Set on a project (its workspaces and prebuilds) instead of on the caller.
    #[serde(default)]
    pub project: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VarView {
    pub name: String,
    pub scope: String,
    pub secret: bool,
    /// Plain values only: a secret's value is never sent back.
    pub value: Option<String>,
    /// For a secret: its length, so a person can tell which value is set.
    pub hint: Option<String>,
}
