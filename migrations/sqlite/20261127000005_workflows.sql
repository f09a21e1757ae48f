-- The workflow engine (trellis-flow): runs and their steps, the state of round-robin teams,
-- in-app notifications, the email outbox, rendered documents and approvals.

-- Chain depth of the write that made an event (0 = a person or an API client; a workflow's
-- write is one more than the run that made it), for the loop guard.
ALTER TABLE events ADD COLUMN depth INTEGER NOT NULL DEFAULT 0;
-- Out of office: assignment skips the user.
ALTER TABLE users ADD COLUMN out_of_office INTEGER NOT NULL DEFAULT 0;

-- Every version of every workflow a run may still need.
CREATE TABLE flow_versions (
    app        TEXT NOT NULL,
    workflow   TEXT NOT NULL,
    version    INTEGER NOT NULL,
    definition TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (app, workflow, version)
);

-- One row per run. status: queued | running | waiting | succeeded | failed.
-- A queued or waiting run is due at wake_at; a running run is leased to lease_owner until
-- lease_until (a lapsed lease makes it claimable again).
CREATE TABLE flow_runs (
    id          TEXT PRIMARY KEY,
    app         TEXT NOT NULL,
    workflow    TEXT NOT NULL,
    version     INTEGER NOT NULL,
    mode        TEXT NOT NULL,
    entity      TEXT NOT NULL,
    record_id   TEXT,
    event_id    INTEGER,
    context     TEXT NOT NULL,
    status      TEXT NOT NULL,
    node        TEXT,
    steps       TEXT NOT NULL,
    attempt     INTEGER NOT NULL DEFAULT 0,
    depth       INTEGER NOT NULL DEFAULT 0,
    wake_at     TEXT NOT NULL,
    lease_owner TEXT,
    lease_until TEXT,
    error       TEXT,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL,
    finished_at TEXT
);
CREATE INDEX flow_runs_due ON flow_runs (wake_at) WHERE status IN ('queued', 'waiting');
CREATE INDEX flow_runs_leased ON flow_runs (lease_until) WHERE status = 'running';
CREATE INDEX flow_runs_record ON flow_runs (app, entity, record_id, created_at);
CREATE INDEX flow_runs_workflow ON flow_runs (app, workflow, created_at);

-- One row per executed node. status: started | succeeded | failed | skipped.
CREATE TABLE flow_steps (
    run_id          TEXT NOT NULL,
    seq             INTEGER NOT NULL,
    node            TEXT NOT NULL,
    kind            TEXT NOT NULL,
    status          TEXT NOT NULL,
    attempt         INTEGER NOT NULL,
    idempotency_key TEXT NOT NULL,
    input           TEXT,
    output          TEXT,
    error           TEXT,
    started_at      TEXT NOT NULL,
    finished_at     TEXT,
    duration_ms     INTEGER,
    worker          TEXT,
    PRIMARY KEY (run_id, seq)
);

-- Counters (round-robin positions per team), shared by every instance.
CREATE TABLE flow_counters (
    app   TEXT NOT NULL,
    key   TEXT NOT NULL,
    value INTEGER NOT NULL,
    PRIMARY KEY (app, key)
);

-- Marks that make a trigger fire once per period (inactivity: once per idle period).
CREATE TABLE flow_marks (
    app        TEXT NOT NULL,
    workflow   TEXT NOT NULL,
    record_id  TEXT NOT NULL,
    mark       TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (app, workflow, record_id, mark)
);

CREATE TABLE notifications (
    id         TEXT PRIMARY KEY,
    app        TEXT NOT NULL,
    user_id    TEXT NOT NULL,
    title      TEXT NOT NULL,
    body       TEXT NOT NULL,
    entity     TEXT,
    record_id  TEXT,
    run_id     TEXT,
    created_at TEXT NOT NULL,
    read_at    TEXT
);
CREATE INDEX notifications_user ON notifications (app, user_id, created_at);

-- Emails: sent through SMTP when configured (status sent), otherwise kept here (status kept).
CREATE TABLE email_outbox (
    id         TEXT PRIMARY KEY,
    app        TEXT NOT NULL,
    run_id     TEXT,
    message_id TEXT NOT NULL UNIQUE,
    to_addr    TEXT NOT NULL,
    subject    TEXT NOT NULL,
    body       TEXT NOT NULL,
    status     TEXT NOT NULL,
    entity     TEXT,
    record_id  TEXT,
    created_at TEXT NOT NULL,
    sent_at    TEXT
);
CREATE INDEX email_outbox_app ON email_outbox (app, created_at);

CREATE TABLE documents (
    id           TEXT PRIMARY KEY,
    app          TEXT NOT NULL,
    entity       TEXT NOT NULL,
    record_id    TEXT NOT NULL,
    name         TEXT NOT NULL,
    content_type TEXT NOT NULL,
    body         TEXT NOT NULL,
    run_id       TEXT,
    created_at   TEXT NOT NULL
);
CREATE INDEX documents_record ON documents (app, entity, record_id);

-- One row per approval step. status: pending | approved | rejected | timeout | skipped.
CREATE TABLE approvals (
    id          TEXT PRIMARY KEY,
    app         TEXT NOT NULL,
    run_id      TEXT NOT NULL,
    node        TEXT NOT NULL,
    step        INTEGER NOT NULL,
    name        TEXT NOT NULL,
    entity      TEXT NOT NULL,
    record_id   TEXT,
    approvers   TEXT NOT NULL,
    rule        TEXT NOT NULL,
    votes       TEXT NOT NULL,
    status      TEXT NOT NULL,
    due_at      TEXT,
    escalated   INTEGER NOT NULL DEFAULT 0,
    comment     TEXT,
    created_at  TEXT NOT NULL,
    decided_at  TEXT
);
CREATE INDEX approvals_run ON approvals (run_id, node, step);
CREATE INDEX approvals_app ON approvals (app, status);
