-- Where sessions, commands and editors land in a workspace: the project's checkout (the
-- environment's workspaceFolder); the user's home when absent (no project, or made before).
ALTER TABLE workspaces ADD COLUMN folder TEXT;
