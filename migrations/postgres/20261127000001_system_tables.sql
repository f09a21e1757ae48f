-- System tables of Trellis on PostgreSQL. Append-only: never edit a migration that has shipped;
-- add a new file instead.

-- Apps and every imported version of their definition (with the migration plan applied).
CREATE TABLE apps (
    key        TEXT PRIMARY KEY,
    version    BIGINT NOT NULL,
    definition JSONB NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE app_versions (
    app        TEXT NOT NULL REFERENCES apps(key),
    version    BIGINT NOT NULL,
    definition JSONB NOT NULL,
    plan       JSONB NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    created_by UUID,
    PRIMARY KEY (app, version)
);

-- Users and teams are data, so workflows can assign to a team and escalate to a manager.
CREATE TABLE users (
    id         UUID PRIMARY KEY,
    name       TEXT NOT NULL,
    email      TEXT NOT NULL UNIQUE,
    manager_id UUID REFERENCES users(id),
    active     BOOLEAN NOT NULL DEFAULT TRUE,
    is_admin   BOOLEAN NOT NULL DEFAULT FALSE,
    created_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE teams (
    id         UUID PRIMARY KEY,
    key        TEXT NOT NULL UNIQUE,
    name       TEXT NOT NULL,
    lead_id    UUID REFERENCES users(id),
    created_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE team_members (
    team_id UUID NOT NULL REFERENCES teams(id) ON DELETE CASCADE,
    user_id UUID NOT NULL REFERENCES users(id),
    PRIMARY KEY (team_id, user_id)
);

-- API tokens, stored as SHA-256 hashes (tokens are 256-bit random, so a fast hash is enough).
CREATE TABLE api_tokens (
    id         UUID PRIMARY KEY,
    user_id    UUID NOT NULL REFERENCES users(id),
    name       TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    created_at TIMESTAMPTZ NOT NULL,
    revoked_at TIMESTAMPTZ
);

-- One row per changed field per write, written in the write's transaction.
CREATE TABLE history (
    id        BIGSERIAL PRIMARY KEY,
    app       TEXT NOT NULL,
    entity    TEXT NOT NULL,
    record_id UUID NOT NULL,
    field     TEXT NOT NULL,
    old_value JSONB NOT NULL,
    new_value JSONB NOT NULL,
    at        TIMESTAMPTZ NOT NULL,
    actor     UUID
);
CREATE INDEX history_record ON history (app, entity, record_id, id);
CREATE INDEX history_field_at ON history (app, entity, field, at);

-- Transactional outbox: one event per write, for the workflow engine.
CREATE TABLE events (
    id           BIGSERIAL PRIMARY KEY,
    app          TEXT NOT NULL,
    entity       TEXT NOT NULL,
    record_id    UUID NOT NULL,
    kind         TEXT NOT NULL,
    changed      JSONB NOT NULL,
    record       JSONB NOT NULL,
    actor        UUID,
    at           TIMESTAMPTZ NOT NULL,
    processed_at TIMESTAMPTZ
);
CREATE INDEX events_pending ON events (id) WHERE processed_at IS NULL;
