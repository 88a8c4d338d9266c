//! The workspace lifecycle as a service: placement, creation, the moves an owner asks for,
//! and reconciling a host's runtime with what was stored. The API, the SSH gateway and the
//! job loop call it; [`crate::model`] decides every move, this module stores it and queues the
//! host's job in one transaction.

use sqlx::Row;

use crate::AppState;
use crate::db::now_ms;
use crate::error::{ApiError, ApiResult};

/// The host a new workspace goes to: a live host (this process's own is always live) that
/// gives a workspace the `disk` it asks for, holding the largest share of the image's chunks,
/// then the least loaded. A disk request no live host gives is refused at once (a host's
/// ceiling is its `--workspace-disk`, from its reports).
pub(crate) async fn place(state: &AppState, image: &str, disk: Option<u64>) -> ApiResult<String> {
    let alive_since = now_ms() - 60_000;
    let rows = sqlx::query(
        "SELECT h.id, h.images, h.last_seen_at, h.disk_ceiling, (SELECT COUNT(*) FROM workspaces w WHERE w.host_id = h.id) AS n FROM hosts h",
    )
    .fetch_all(&state.db.pool)
    .await?;
    let mut candidates = Vec::new();
    let mut most_given: Option<u64> = None;
    for r in rows {
        let id: String = r.try_get("id")?;
        let seen: Option<i64> = r.try_get("last_seen_at")?;
        if id != state.host_id && seen.is_none_or(|t| t < alive_since) {
            continue;
        }
        let ceiling = r
            .try_get::<Option<i64>, _>("disk_ceiling")?
            .map(|c| c as u64);
        if let (Some(wanted), Some(ceiling)) = (disk, ceiling)
            && wanted > ceiling
        {
            most_given = most_given.max(Some(ceiling));
            continue;
        }
        let images: Option<String> = r.try_get("images")?;
        let cached = images.as_deref().map_or(0.0, |j| cached_share(j, image));
        candidates.push((id, cached, r.try_get::<i64, _>("n")?));
    }
    if let (true, Some(wanted), Some(most)) = (candidates.is_empty(), disk, most_given) {
        return Err(ApiError::bad_request(format!(
            "a disk of {} MiB is more than any host gives a workspace (at most {} MiB)",
            wanted >> 20,
            most >> 20
        )));
    }
    Ok(best_host(&candidates).unwrap_or_else(|| state.host_id.clone()))
}

/// How much of `image` a host's reported image list says it holds (lists from before shares
/// were reported name whole images).
fn cached_share(images_json: &str, image: &str) -> f64 {
    if let Ok(list) = serde_json::from_str::<Vec<warren_agent::HostImage>>(images_json) {
        return list
            .iter()
            .filter(|h| h.image == image)
            .map(|h| h.cached.clamp(0.0, 1.0))
            .fold(0.0, f64::max);
    }
    let whole = serde_json::from_str::<Vec<String>>(images_json)
        .is_ok_and(|list| list.iter().any(|i| i == image));
    if whole { 1.0 } else { 0.0 }
}

/// The most of the image first, then the fewest workspaces; shares within 5% count as equal, so
/// a nearly full host does not take every workspace from an idle one that holds as much.
fn best_host(candidates: &[(String, f64, i64)]) -> Option<String> {
    let top = candidates.iter().map(|c| c.1).fold(0.0, f64::max);
    candidates
        .iter()
        .filter(|c| c.1 >= top - 0.05)
        .min_by_key(|c| c.2)
        .map(|c| c.0.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_prefers_the_host_holding_most_of_the_image_then_the_least_loaded() {
        let list = r#"[{"image":"dev:1","cached":0.8},{"image":"web:2","cached":1.0}]"#;
        assert_eq!(cached_share(list, "dev:1"), 0.8);
        assert_eq!(cached_share(list, "other:1"), 0.0);
        assert_eq!(cached_share(r#"["dev:1"]"#, "dev:1"), 1.0);
        assert_eq!(cached_share("not json", "dev:1"), 0.0);
        let hosts = |c: &[(&str, f64, i64)]| {
            best_host(
                &c.iter()
                    .map(|(h, s, n)| (h.to_string(), *s, *n))
                    .collect::<Vec<_>>(),
            )
        };
        assert_eq!(hosts(&[("a", 0.2, 0), ("b", 0.9, 5)]).as_deref(), Some("b"));
        assert_eq!(
            hosts(&[("a", 0.9, 3), ("b", 0.92, 5)]).as_deref(),
            Some("a")
        );
        assert_eq!(hosts(&[("a", 0.0, 3), ("b", 0.0, 1)]).as_deref(), Some("b"));
        assert_eq!(hosts(&[]), None);
    }
}
