-- Prebuilds as jobs: the branch whose head asked for one, how it went, where its image is, and
-- the environment file it was made from (new workspaces take their tasks from it).
ALTER TABLE prebuilds ADD COLUMN branch TEXT;
ALTER TABLE prebuilds ADD COLUMN error TEXT;
ALTER TABLE prebuilds ADD COLUMN digest TEXT;
ALTER TABLE prebuilds ADD COLUMN env_file TEXT;
ALTER TABLE prebuilds ADD COLUMN env_text TEXT;
ALTER TABLE prebuilds ADD COLUMN reused BIGINT NOT NULL DEFAULT 0;
ALTER TABLE prebuilds ADD COLUMN host_id TEXT;
ALTER TABLE prebuilds ADD COLUMN cancel_requested BIGINT NOT NULL DEFAULT 0;
ALTER TABLE prebuilds ADD COLUMN started_at BIGINT;
ALTER TABLE prebuilds ADD COLUMN finished_at BIGINT;
ALTER TABLE prebuilds ADD COLUMN log_size BIGINT NOT NULL DEFAULT 0;
CREATE INDEX prebuilds_project ON prebuilds (project_id, commit_sha);

-- A prebuild's log, in pieces as the agent sends them; `at` is the piece's byte offset.
CREATE TABLE prebuild_logs (
    prebuild_id TEXT NOT NULL REFERENCES prebuilds (id) ON DELETE CASCADE,
    at BIGINT NOT NULL,
    text TEXT NOT NULL,
    PRIMARY KEY (prebuild_id, at)
);

ALTER TABLE jobs ADD COLUMN prebuild_id TEXT;

-- A workspace made from a prebuild: which one, and the branch it is on.
ALTER TABLE workspaces ADD COLUMN prebuild_id TEXT;
ALTER TABLE workspaces ADD COLUMN branch TEXT;
