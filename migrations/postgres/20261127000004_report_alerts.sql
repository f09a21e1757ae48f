-- Report alerts: when each alert was last evaluated, and every time one fired.
CREATE TABLE report_alerts (
    app             TEXT NOT NULL,
    alert           TEXT NOT NULL,
    last_checked_at TIMESTAMPTZ NOT NULL,
    last_key        TEXT,
    PRIMARY KEY (app, alert)
);
CREATE TABLE report_alert_firings (
    id       UUID PRIMARY KEY,
    app      TEXT NOT NULL,
    alert    TEXT NOT NULL,
    fired_at TIMESTAMPTZ NOT NULL,
    rows     JSONB NOT NULL
);
CREATE INDEX report_alert_firings_app ON report_alert_firings (app, alert, fired_at);
