-- A workspace's writable layer saved to the server's registry at each stop (`saved_layer`, an
-- image reference, and when), the image its writable layer lies over when that is not `image`
-- (it was started on another host from a saved layer: `base_image`), and the host a move is
-- taking it to (`moving_to`). A draining host takes no new workspaces.
ALTER TABLE workspaces ADD COLUMN saved_layer TEXT;
ALTER TABLE workspaces ADD COLUMN saved_at BIGINT;
ALTER TABLE workspaces ADD COLUMN base_image TEXT;
ALTER TABLE workspaces ADD COLUMN moving_to TEXT;
ALTER TABLE hosts ADD COLUMN draining BIGINT NOT NULL DEFAULT 0;
