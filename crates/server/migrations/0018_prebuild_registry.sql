-- A prebuild pushed to the server's registry: `image` is then the registry reference every host
-- starts workspaces from, `local_image` the name in the store of the host that made it (the one
-- its archiving removes).
ALTER TABLE prebuilds ADD COLUMN local_image TEXT;
