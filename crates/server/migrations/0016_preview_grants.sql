-- Who may see a preview on its own host (`<port>-<workspace id>.<preview domain>`): a `ticket`
-- the UI hands a signed-in user's browser (single use, 2 minutes), exchanged there for a
-- `cookie` grant of that host only. Both hold only while the UI session they came from does
-- (signing out ends them). Tokens are stored as their SHA-256.
CREATE TABLE preview_grants (
    token_hash TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    user_id TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    session_hash TEXT NOT NULL REFERENCES sessions (token_hash) ON DELETE CASCADE,
    host TEXT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX preview_grants_expiry ON preview_grants (expires_at);
