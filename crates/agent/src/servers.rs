//! The server replicas a host works with: the one it was given (`--server`) and those the
//! servers name (`GET /api/v1/agent/servers`). A job call goes to the replica that answered
//! last and, when that one cannot be reached, to the next; the host keeps a tunnel to every
//! replica ([`crate::tunnel::hold_all`]), so whichever serves a request reaches its workspaces.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::server_link::{CallError, ServerLink, Trust};

pub struct Servers {
    token: String,
    trust: Trust,
    /// The one given first (it is never dropped), then the named ones.
    links: std::sync::Mutex<Vec<Arc<ServerLink>>>,
    /// Which link answered last.
    current: AtomicUsize,
}

impl std::fmt::Debug for Servers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Servers")
            .field("links", &self.links())
            .finish_non_exhaustive()
    }
}

impl Servers {
    /// Starting from `given`; replicas named later are reached with the same token and trust.
    pub fn new(given: Arc<ServerLink>, token: String, trust: Trust) -> Self {
        Self {
            token,
            trust,
            links: std::sync::Mutex::new(vec![given]),
            current: AtomicUsize::new(0),
        }
    }

    pub fn links(&self) -> Vec<Arc<ServerLink>> {
        self.links.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// The replicas the servers name now (the given one stays; links already made for a URL
    /// still named are kept, with their connections).
    pub fn name(&self, urls: &[String]) {
        let Ok(mut links) = self.links.lock() else {
            return;
        };
        let given = links[0].clone();
        let mut next = vec![given.clone()];
        for url in urls {
            let url = url.trim_end_matches('/');
            if next.iter().any(|l| l.server == url) {
                continue;
            }
            if let Some(known) = links.iter().find(|l| l.server == url) {
                next.push(known.clone());
                continue;
            }
            // A replica named over plain http is taken only when the given server is too (all
            // of them on this machine): never a token in the clear to a port named by another.
            if url.starts_with("http://") && !given.server.starts_with("http://") {
                tracing::warn!(server = url, "a replica named without https: not used");
                continue;
            }
            match ServerLink::new(url, self.token.clone(), self.trust.clone()) {
                Ok(link) => next.push(Arc::new(link)),
                Err(e) => {
                    tracing::warn!(server = url, error = %e, "a replica this host cannot use")
                }
            }
        }
        if next.len() != links.len()
            || next
                .iter()
                .zip(links.iter())
                .any(|(a, b)| a.server != b.server)
        {
            self.current.store(0, Ordering::Relaxed);
        }
        *links = next;
    }

    /// A job call to the replica that answered last, else to each other in turn while they
    /// cannot be reached.
    pub async fn call(
        &self,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value, CallError> {
        let links = self.links();
        let first = self.current.load(Ordering::Relaxed) % links.len().max(1);
        let mut last = CallError::Unreachable("no server to call".into());
        for i in 0..links.len() {
            let at = (first + i) % links.len();
            match links[at].call(path, body).await {
                Ok(answer) => {
                    if at != first {
                        tracing::info!(
                            server = links[at].server,
                            "job calls go to this replica now"
                        );
                    }
                    self.current.store(at, Ordering::Relaxed);
                    return Ok(answer);
                }
                Err(e @ CallError::Answered(_)) => return Err(e),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Asks the servers which replicas there are, and takes them ([`Servers::name`]).
    pub async fn refresh(&self) -> Result<(), CallError> {
        let answer = self.call("/agent/servers", None).await?;
        let named: warren_api::AgentServers = serde_json::from_value(answer)
            .map_err(|e| CallError::Answered(format!("the list of servers: {e}")))?;
        self.name(&named.servers);
        Ok(())
    }
}
