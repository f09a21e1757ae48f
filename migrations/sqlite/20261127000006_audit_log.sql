-- Administrative changes (app definitions, roles, users, teams, tokens), readable by admins.
-- Rows are only ever added; ids are UUIDv7, so id order is time order.
CREATE TABLE audit_log (
    id         TEXT PRIMARY KEY,
    at         TEXT NOT NULL,
    actor      TEXT,
    app        TEXT,
    action     TEXT NOT NULL,
    target     TEXT NOT NULL,
    detail     TEXT NOT NULL
);
CREATE INDEX audit_log_app ON audit_log (app, id);
