-- Rollups an app declares, and the definition each table was built from: a rollup whose
-- definition changed is rebuilt from the base tables when the app loads.
CREATE TABLE rollups (
    app        TEXT NOT NULL,
    name       TEXT NOT NULL,
    signature  TEXT NOT NULL,
    built_at   TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (app, name)
);
