-- Identity: user passwords (argon2id), token kinds, scopes and expiry, login throttling.
ALTER TABLE users ADD COLUMN password_hash TEXT;
-- 'api' (personal or bootstrap token) or 'session' (from a login).
ALTER TABLE api_tokens ADD COLUMN kind TEXT NOT NULL DEFAULT 'api';
-- 'read', 'write' or 'admin'; each includes the ones before it.
ALTER TABLE api_tokens ADD COLUMN scope TEXT NOT NULL DEFAULT 'admin';
ALTER TABLE api_tokens ADD COLUMN expires_at TIMESTAMPTZ;
CREATE INDEX api_tokens_user ON api_tokens (user_id);
-- Failed logins per email in the current window; a lock until a time after too many.
CREATE TABLE login_failures (
    email        TEXT PRIMARY KEY,
    failures     BIGINT NOT NULL,
    window_start TIMESTAMPTZ NOT NULL,
    locked_until TIMESTAMPTZ
);
