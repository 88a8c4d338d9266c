-- The user inside the workspace that sessions, commands and tasks run as (the environment
-- file's remoteUser / containerUser); root when absent.
ALTER TABLE workspaces ADD COLUMN run_as TEXT;
