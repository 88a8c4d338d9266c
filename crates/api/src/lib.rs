//! Warren's REST API (`/api/v1`) as types: every request and response body the control plane
//! takes and gives, shared by the server (which derives its OpenAPI document from them) and the
//! CLI (which sends and reads them). Nothing here touches a database or a host.

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

/// Every error's body: `{"error": "<what was wrong>"}`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: String,
}
