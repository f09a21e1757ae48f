-- System tables of Trellis on SQLite. Append-only: never edit a migration that has shipped;
-- add a new file instead. Instants are fixed-width UTC text (YYYY-MM-DDTHH:MM:SS.ffffffZ),
-- UUIDs are text, JSON is text.

-- Apps and every imported version of their definition (with the migration plan applied).
CREATE TABLE apps (
    key        TEXT PRIMARY KEY,
    version    INTEGER NOT NULL,
    definition TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE app_versions (
    app        TEXT NOT NULL REFERENCES apps(key),
    version    INTEGER NOT NULL,
    definition TEXT NOT NULL,
    plan       TEXT NOT NULL,
    created_at TEXT NOT NULL,
    created_by TEXT,
    PRIMARY KEY (app, version)
);

-- Users and teams are data, so workflows can assign to a team and escalate to a manager.
CREATE TABLE users (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    email      TEXT NOT NULL UNIQUE,
    manager_id TEXT REFERENCES users(id),
    active     INTEGER NOT NULL DEFAULT 1,
    is_admin   INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL
);
CREATE TABLE teams (
    id         TEXT PRIMARY KEY,
    key        TEXT NOT NULL UNIQUE,
    name       TEXT NOT NULL,
    lead_id    TEXT REFERENCES users(id),
    created_at TEXT NOT NULL
);
CREATE TABLE team_members (
    team_id TEXT NOT NULL REFERENCES teams(id) ON DELETE CASCADE,
    user_id TEXT NOT NULL REFERENCES users(id),
    PRIMARY KEY (team_id, user_id)
);

-- API tokens, stored as SHA-256 hashes (tokens are 256-bit random, so a fast hash is enough).
CREATE TABLE api_tokens (
    id         TEXT PRIMARY KEY,
    user_id    TEXT NOT NULL REFERENCES users(id),
    name       TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL,
    revoked_at TEXT
);

-- One row per changed field per write, written in the write's transaction.
CREATE TABLE history (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    app       TEXT NOT NULL,
    entity    TEXT NOT NULL,
    record_id TEXT NOT NULL,
    field     TEXT NOT NULL,
    old_value TEXT NOT NULL,
    new_value TEXT NOT NULL,
    at        TEXT NOT NULL,
    actor     TEXT
);
CREATE INDEX history_record ON history (app, entity, record_id, id);
CREATE INDEX history_field_at ON history (app, entity, field, at);

-- Transactional outbox: one event per write, for the workflow engine.
CREATE TABLE events (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    app          TEXT NOT NULL,
    entity       TEXT NOT NULL,
    record_id    TEXT NOT NULL,
    kind         TEXT NOT NULL,
    changed      TEXT NOT NULL,
    record       TEXT NOT NULL,
    actor        TEXT,
    at           TEXT NOT NULL,
    processed_at TEXT
);
CREATE INDEX events_pending ON events (id) WHERE processed_at IS NULL;
