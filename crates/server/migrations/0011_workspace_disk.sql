-- What a workspace may write (bytes): its own request or its environment file's
-- `resources.disk` / `hostRequirements.storage`; NULL: the host's default.
ALTER TABLE workspaces ADD COLUMN disk BIGINT;
