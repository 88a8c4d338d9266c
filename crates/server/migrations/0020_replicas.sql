-- The server processes sharing this database, each with the address agents reach it at (so
-- that every host keeps a tunnel to each) and when it last said it was alive.
CREATE TABLE replicas (
    id TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    host_id TEXT,
    started_at BIGINT NOT NULL,
    last_seen_at BIGINT NOT NULL
);
