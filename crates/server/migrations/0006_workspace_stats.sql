-- What the workspace's host last reported of its resource use (JSON of the runtime's Stats).
ALTER TABLE workspaces ADD COLUMN stats TEXT;
ALTER TABLE workspaces ADD COLUMN stats_at BIGINT;
