//! Projects (git repositories) and their branches.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewProject {
    pub name: String,
    pub git_url: String,
    #[serde(default)]
    pub root_folder: Option<String>,
    #[serde(default)]
    pub env_file: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[cfg_attr(feature = "sqlx", derive(sqlx::FromRow))]
pub struct ProjectView {
    pub id: String,
    pub name: String,
    pub owner: String,
    pub git_url: String,
    pub root_folder: String,
    pub env_file: Option<String>,
    /// The webhook's URL path with its secret: shown once, when the project is created.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "sqlx", sqlx(default))]
    pub webhook: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[cfg_attr(feature = "sqlx", derive(sqlx::FromRow))]
pub struct BranchView {
    pub name: String,
    pub head: String,
    pub updated_at: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, IntoParams)]
pub struct HookQuery {
    pub secret: String,
}
