-- Idle stop. `last_active_at`: the last time an SSH channel, a command (`exec`) or a preview
-- used the workspace (ms). `idle_timeout_s` on a workspace, its project and its owner: the
-- first that is set applies (0: never), else the server's `--idle-timeout`. `stop_reason`: why
-- Warren stopped it by itself (cleared when anybody starts or stops it).
ALTER TABLE workspaces ADD COLUMN last_active_at BIGINT;
ALTER TABLE workspaces ADD COLUMN idle_timeout_s BIGINT;
ALTER TABLE workspaces ADD COLUMN stop_reason TEXT;
ALTER TABLE projects ADD COLUMN idle_timeout_s BIGINT;
ALTER TABLE users ADD COLUMN idle_timeout_s BIGINT;
