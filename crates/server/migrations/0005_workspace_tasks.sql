-- The environment's workspace tasks (JSON list of the runtime's TaskSpec), run on every start.
ALTER TABLE workspaces ADD COLUMN tasks TEXT;
