//! Prebuilds of projects' branches.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PrebuildView {
    pub id: String,
    pub project_id: String,
    pub project: String,
    pub branch: Option<String>,
    pub commit: String,
    pub state: PrebuildState,
    pub image: Option<String>,
    pub error: Option<String>,
    /// Made before under the same key and taken as it was.
    pub reused: bool,
    pub env_file: Option<String>,
    /// The host that made it (and holds its image).
    pub host: Option<String>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    /// Commits its branch's head has that it lacks (when the server's mirror knows both).
    pub behind: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewPrebuild {
    /// The branch whose head to prebuild (the project's default branch when absent).
    #[serde(default)]
    pub branch: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LogPiece {
    pub text: String,
    /// Where the next read starts.
    pub offset: u64,
    /// The prebuild has ended: nothing more will come.
    pub done: bool,
}

/// Where a prebuild is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PrebuildState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    /// Superseded by newer prebuilds of its branch; its image is removed.
    Archived,
}

impl PrebuildState {
    pub const ALL: [Self; 6] = [
        Self::Queued,
        Self::Running,
        Self::Succeeded,
        Self::Failed,
        Self::Cancelled,
        Self::Archived,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::Archived => "archived",
        }
    }
}

impl std::fmt::Display for PrebuildState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// As stored (rows read with `sqlx(try_from = "String")`).
impl TryFrom<String> for PrebuildState {
    type Error = crate::UnknownState;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl std::str::FromStr for PrebuildState {
    type Err = crate::UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| crate::UnknownState(s.to_owned()))
    }
}
