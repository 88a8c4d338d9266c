-- The most a workspace of the host may write (bytes; its `--workspace-disk`), from its
-- reports; NULL: no limit, or not yet reported.
ALTER TABLE hosts ADD COLUMN disk_ceiling BIGINT;
