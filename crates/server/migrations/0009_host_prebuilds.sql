-- Whether a host takes prebuild jobs (`warren up|agent --prebuilds false` keeps them off it).
ALTER TABLE hosts ADD COLUMN prebuilds BIGINT NOT NULL DEFAULT 1;
