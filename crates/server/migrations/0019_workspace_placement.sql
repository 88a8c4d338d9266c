-- Why the scheduler put a workspace on its host (shown by `ws show`).
ALTER TABLE workspaces ADD COLUMN placement TEXT;
