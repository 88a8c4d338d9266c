-- A server replica's own host (its token is made at each of its starts), told from an agent's
-- host; and the workspace a cleanup job removes from a host it left (`workspace.cleanup` jobs
-- belong to no workspace), so a workspace that comes back there first cancels it.
ALTER TABLE hosts ADD COLUMN replica BIGINT NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN runtime_id TEXT;
