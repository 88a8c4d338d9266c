-- The web UI's sign-ins. The cookie's token is stored as its SHA-256 (as API tokens are); `csrf`
-- is the token every form and htmx request of the session carries.
CREATE TABLE sessions (
    token_hash TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    csrf TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
