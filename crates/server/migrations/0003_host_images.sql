-- The images a host holds in its local store (a JSON list of names), reported by its agent, for
-- placing workspaces where their image already is.
ALTER TABLE hosts ADD COLUMN images TEXT;
