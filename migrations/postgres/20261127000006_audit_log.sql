-- Administrative changes (app definitions, roles, users, teams, tokens), readable by admins.
-- Rows are only ever added; ids are UUIDv7, so id order is time order.
CREATE TABLE audit_log (
    id         UUID PRIMARY KEY,
    at         TIMESTAMPTZ NOT NULL,
    actor      UUID,
    app        TEXT,
    action     TEXT NOT NULL,
    target     TEXT NOT NULL,
    detail     JSONB NOT NULL
);
CREATE INDEX audit_log_app ON audit_log (app, id);
