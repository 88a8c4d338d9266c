-- A workspace's ports reached through preview URLs: those its environment file names (with
-- their labels) and those its owner opened, each with who may reach it: `private` (its owner
-- only), `users` (anyone signed in) or `public`.
CREATE TABLE workspace_ports (
    workspace_id TEXT NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    port BIGINT NOT NULL,
    label TEXT,
    access TEXT NOT NULL,
    PRIMARY KEY (workspace_id, port)
);
