-- Who may use an app, and in which role (admin, manager, sales_rep, viewer).
CREATE TABLE app_members (
    app     TEXT NOT NULL REFERENCES apps(key),
    user_id TEXT NOT NULL REFERENCES users(id),
    role    TEXT NOT NULL,
    PRIMARY KEY (app, user_id)
);
