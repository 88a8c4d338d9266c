-- The gateway knows a developer by their key alone: one key belongs to one user.
CREATE UNIQUE INDEX ssh_keys_fingerprint ON ssh_keys (fingerprint);
