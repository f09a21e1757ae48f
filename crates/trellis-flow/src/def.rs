//! The JSON shape of a workflow, as a drag-and-drop editor would save it: a key and a version, a
//! trigger, and a graph of nodes and edges. Canvas positions live in `ui`, which the engine keeps
//! but never reads.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};
use std::collections::BTreeMap;

/// One workflow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkflowDef {
    /// Stable key (`new_lead_assignment`).
    pub key: String,
    /// Version of this workflow; runs pin the version they started with.
    #[serde(default = "one")]
    pub version: i64,
    /// Human name.
    #[serde(default)]
    pub name: Option<String>,
    /// `inline` runs in the triggering write's transaction (database actions only); `async`
    /// (the default) runs after commit through the durable queue.
    #[serde(default)]
    pub mode: Mode,
    /// Off switch.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// What starts a run.
    pub trigger: Trigger,
    /// The actions.
    pub nodes: Vec<NodeDef>,
    /// How nodes follow each other.
    #[serde(default)]
    pub edges: Vec<EdgeDef>,
    /// Most runs this workflow starts per minute; events beyond it wait (none are dropped).
    #[serde(default)]
    pub rate_limit_per_minute: Option<u32>,
    /// Editor data (positions, colours); never read by the engine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ui: Option<Json>,
}

fn one() -> i64 {
    1
}
fn yes() -> bool {
    true
}

/// Where a workflow runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// In the triggering write's transaction.
    Inline,
    /// After commit, through the durable queue.
    #[default]
    Async,
}

/// What starts a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Trigger {
    /// A record of `entity` was created.
    RecordCreated {
        /// Entity key.
        entity: String,
        /// Optional rhai condition.
        #[serde(default)]
        condition: Option<String>,
    },
    /// A record of `entity` was updated (only when one of `fields` changed, if given).
    RecordUpdated {
        /// Entity key.
        entity: String,
        /// Fields of which at least one must have changed.
        #[serde(default)]
        fields: Vec<String>,
        /// Optional rhai condition.
        #[serde(default)]
        condition: Option<String>,
    },
    /// The stage field of a record of `entity` changed (optionally from / to given stages).
    StageChanged {
        /// Entity key.
        entity: String,
        /// Stages left (any, if empty).
        #[serde(default)]
        from: Vec<String>,
        /// Stages entered (any, if empty).
        #[serde(default)]
        to: Vec<String>,
        /// Optional rhai condition.
        #[serde(default)]
        condition: Option<String>,
    },
    /// A record of `entity` was deleted.
    RecordDeleted {
        /// Entity key.
        entity: String,
        /// Optional rhai condition.
        #[serde(default)]
        condition: Option<String>,
    },
    /// No stage change and no new related activity for a while.
    Inactivity {
        /// Entity key.
        entity: String,
        /// Idle time in hours.
        #[serde(default)]
        hours: Option<u32>,
        /// Idle time in working days of the app's calendar.
        #[serde(default)]
        working_days: Option<u32>,
        /// Related entity whose new records count as activity (`activity`); its relation field
        /// pointing to `entity` is found from the model.
        #[serde(default)]
        activity_entity: Option<String>,
        /// Only activity records whose `kind` field is one of these count (all, if empty).
        #[serde(default)]
        activity_kinds: Vec<String>,
        /// Optional rhai condition (e.g. only open opportunities).
        #[serde(default)]
        condition: Option<String>,
    },
    /// A date or date-time field reached, shifted by `offset_days` (e.g. 7 days before the
    /// expected close date); fires once per record and field value.
    DateRelative {
        /// Entity key.
        entity: String,
        /// A date or date-time field.
        field: String,
        /// Days after the field's value (negative: before).
        #[serde(default)]
        offset_days: i32,
        /// Local hour of day for a date field (default 9).
        #[serde(default)]
        hour: Option<u32>,
        /// Optional rhai condition.
        #[serde(default)]
        condition: Option<String>,
    },
    /// On a cron schedule in the app's time zone (`0 9 * * MON-FRI`: weekdays at 09:00). The
    /// run has no record: only notify, create_record, send_email, http_request, condition,
    /// switch and wait make sense.
    Schedule {
        /// Five fields: minute, hour, day of month, month, day of week.
        cron: String,
    },
    /// An inbound webhook: `POST /api/v1/apps/{app}/hooks/{name}`, signed per Standard
    /// Webhooks with `secret`. A `record_id` in the JSON body attaches the run to that record
    /// of `entity`; the body is `payload` in conditions and templates.
    Webhook {
        /// Name in the URL.
        name: String,
        /// Entity of the records the hook may name.
        entity: String,
        /// Signing secret template (`{{ vars.ERP_HOOK_SECRET }}`), `whsec_`+base64 or plain;
        /// empty after rendering means the hook is off (404).
        secret: String,
        /// Optional rhai condition (over `payload` and `record`).
        #[serde(default)]
        condition: Option<String>,
    },
    /// Started by hand on a record (`POST …/workflows/{key}/run`).
    Manual {
        /// Entity key.
        entity: String,
    },
    /// A report alert of the app fired (`reports` → `alerts`): the run's `record` is the
    /// firing, `{alert, label, meta, rows}`, with the flagged rows of the alert's query.
    AlertFired {
        /// The alert's name.
        alert: String,
        /// Optional rhai condition (over `record`, the firing).
        #[serde(default)]
        condition: Option<String>,
    },
}

impl Trigger {
    /// The entity the trigger watches.
    pub fn entity(&self) -> &str {
        match self {
            Trigger::RecordCreated { entity, .. }
            | Trigger::RecordUpdated { entity, .. }
            | Trigger::StageChanged { entity, .. }
            | Trigger::RecordDeleted { entity, .. }
            | Trigger::Inactivity { entity, .. }
            | Trigger::DateRelative { entity, .. }
            | Trigger::Webhook { entity, .. }
            | Trigger::Manual { entity } => entity,
            Trigger::Schedule { .. } | Trigger::AlertFired { .. } => "",
        }
    }

    /// The trigger's condition, if any.
    pub fn condition(&self) -> Option<&str> {
        match self {
            Trigger::RecordCreated { condition, .. }
            | Trigger::RecordUpdated { condition, .. }
            | Trigger::StageChanged { condition, .. }
            | Trigger::RecordDeleted { condition, .. }
            | Trigger::Inactivity { condition, .. }
            | Trigger::DateRelative { condition, .. }
            | Trigger::Webhook { condition, .. }
            | Trigger::AlertFired { condition, .. } => condition.as_deref(),
            Trigger::Manual { .. } | Trigger::Schedule { .. } => None,
        }
    }
}

/// Retry policy of a node with external side effects.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retry {
    /// Attempts in all (1 = no retry).
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// First backoff in seconds; doubles each attempt.
    #[serde(default = "default_backoff")]
    pub backoff_seconds: u32,
    /// Cap of the backoff.
    #[serde(default = "default_cap")]
    pub max_backoff_seconds: u32,
}

fn default_attempts() -> u32 {
    5
}
fn default_backoff() -> u32 {
    2
}
fn default_cap() -> u32 {
    300
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            max_attempts: default_attempts(),
            backoff_seconds: default_backoff(),
            max_backoff_seconds: default_cap(),
        }
    }
}

impl Retry {
    /// Delay before attempt `attempt` (1-based: the delay after the first failure is for 2).
    pub fn delay(&self, attempt: u32) -> std::time::Duration {
        let exp = attempt.saturating_sub(2).min(20);
        let secs = (self.backoff_seconds as u64)
            .saturating_mul(1u64 << exp)
            .min(self.max_backoff_seconds as u64);
        std::time::Duration::from_secs(secs)
    }
}

/// One node of the graph.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeDef {
    /// Id, unique in the workflow.
    pub id: String,
    /// What the node does.
    #[serde(flatten)]
    pub action: Action,
    /// Retry policy (nodes with external side effects).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,
    /// Timeout of one attempt in seconds (HTTP and email).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u32>,
}

/// Who a notification, approval step or assignment goes to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Recipient {
    /// The record's owner.
    Owner,
    /// The manager of the record's owner.
    OwnerManager,
    /// A user by email.
    User(String),
    /// Every member of a team (by key).
    Team(String),
    /// Every member of the app in a role.
    Role(String),
}

/// How a team picks one member.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// In turn; the position is kept in the database.
    #[default]
    RoundRobin,
    /// The member with the fewest open records of the entity.
    LeastOpen,
}

/// One assignment rule, or the fallback.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssignRule {
    /// Rule name, logged as the reason (defaults to its position).
    #[serde(default)]
    pub name: Option<String>,
    /// rhai condition; the first rule whose condition holds decides.
    #[serde(default)]
    pub when: Option<String>,
    /// A user by email.
    #[serde(default)]
    pub user: Option<String>,
    /// A team by key.
    #[serde(default)]
    pub team: Option<String>,
    /// How the team picks a member.
    #[serde(default)]
    pub strategy: Strategy,
}

/// One approval step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalStep {
    /// Step name (`legal`).
    pub name: String,
    /// Who approves.
    pub approvers: Recipient,
    /// `any` one approver decides, or `all` must approve.
    #[serde(default)]
    pub rule: ApprovalRule,
    /// rhai condition; a step whose condition is false is skipped.
    #[serde(default)]
    pub when: Option<String>,
    /// After this many hours without a decision the step escalates to the approvers' managers
    /// (once), then times out.
    #[serde(default)]
    pub timeout_hours: Option<u32>,
}

/// Any or all.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalRule {
    /// One approval approves the step (one rejection rejects it).
    #[default]
    Any,
    /// Every approver must approve (one rejection rejects it).
    All,
}

/// IM robot message format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImFormat {
    /// `{"text": …}`.
    Slack,
    /// `{"msgtype": "text", "text": {"content": …}}` (DingTalk and WeCom share it).
    Dingtalk,
    /// Same as DingTalk.
    Wecom,
}

/// What a node does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Action {
    /// If/else: output `true` or `false`.
    Condition {
        /// rhai condition.
        condition: String,
    },
    /// Switch: the first case whose condition holds names the output, else `default`.
    Switch {
        /// Ordered cases: output name → rhai condition.
        cases: Vec<SwitchCase>,
    },
    /// Wait a duration (`seconds`, `minutes`, `hours`, added up), working days, until a date
    /// field, or until a condition holds (`ok`, or `timeout`).
    Wait {
        /// Seconds.
        #[serde(default)]
        seconds: Option<u32>,
        /// Minutes.
        #[serde(default)]
        minutes: Option<u32>,
        /// Hours.
        #[serde(default)]
        hours: Option<u32>,
        /// Working days of the app's calendar.
        #[serde(default)]
        working_days: Option<u32>,
        /// A date or datetime field of the record to wait for, shifted by `offset_days`.
        #[serde(default)]
        until_field: Option<String>,
        /// Shift of `until_field` in days (negative: before).
        #[serde(default)]
        offset_days: Option<i32>,
        /// rhai condition re-checked every minute on the fresh record; `timeout_hours` ends it.
        #[serde(default)]
        until: Option<String>,
        /// Give up on `until` after this many hours (output `timeout`).
        #[serde(default)]
        timeout_hours: Option<u32>,
    },
    /// Change the triggering record.
    UpdateRecord {
        /// Field → value; strings are minijinja templates.
        values: Map<String, Json>,
    },
    /// Create a record of another (or the same) entity.
    CreateRecord {
        /// Entity key.
        entity: String,
        /// Field → value; strings are minijinja templates.
        values: Map<String, Json>,
    },
    /// Set the record's owner by ordered rules, then a fallback.
    AssignOwner {
        /// Ordered rules.
        rules: Vec<AssignRule>,
        /// When no rule matches (or its team has nobody available).
        #[serde(default)]
        fallback: Option<AssignRule>,
        /// Notify the new owner (default true).
        #[serde(default = "yes")]
        notify: bool,
    },
    /// An in-app notification, optionally posted to an IM robot too.
    Notify {
        /// Who gets it.
        to: Recipient,
        /// Title template.
        title: String,
        /// Body template.
        #[serde(default)]
        body: String,
        /// IM robot webhook URL template (empty after rendering: not posted).
        #[serde(default)]
        im_webhook: Option<String>,
        /// IM message format.
        #[serde(default)]
        im_format: Option<ImFormat>,
    },
    /// An email (SMTP when configured, else kept in the outbox).
    SendEmail {
        /// Recipient address template.
        to: String,
        /// Subject template.
        subject: String,
        /// Body template (plain text).
        body: String,
    },
    /// Render a document from a template and attach it to the record.
    RenderDocument {
        /// File name template (`proposal-{{ record.name }}.md`).
        name: String,
        /// The template.
        template: String,
        /// MIME type (default `text/markdown`).
        #[serde(default)]
        content_type: Option<String>,
    },
    /// An HTTP request to an external system, signed per Standard Webhooks.
    HttpRequest {
        /// URL template; empty after rendering means disabled (the step is skipped).
        url: String,
        /// JSON body; strings inside are templates.
        #[serde(default)]
        body: Json,
        /// Signing secret template (`{{ vars.ERP_WEBHOOK_SECRET }}`), base64 or plain text.
        #[serde(default)]
        secret: Option<String>,
    },
    /// One or more approval steps; output `approved`, `rejected` or `timeout`.
    Approval {
        /// The steps, in order.
        steps: Vec<ApprovalStep>,
    },
}

/// One case of a switch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchCase {
    /// Output name.
    pub output: String,
    /// rhai condition.
    pub when: String,
}

impl Action {
    /// The type name, as in JSON.
    pub fn kind(&self) -> &'static str {
        match self {
            Action::Condition { .. } => "condition",
            Action::Switch { .. } => "switch",
            Action::Wait { .. } => "wait",
            Action::UpdateRecord { .. } => "update_record",
            Action::CreateRecord { .. } => "create_record",
            Action::AssignOwner { .. } => "assign_owner",
            Action::Notify { .. } => "notify",
            Action::SendEmail { .. } => "send_email",
            Action::RenderDocument { .. } => "render_document",
            Action::HttpRequest { .. } => "http_request",
            Action::Approval { .. } => "approval",
        }
    }

    /// Whether the node only touches the database (allowed inline, exactly once).
    pub fn database_only(&self) -> bool {
        match self {
            Action::Notify { im_webhook, .. } => im_webhook.is_none(),
            Action::SendEmail { .. }
            | Action::HttpRequest { .. }
            | Action::Wait { .. }
            | Action::Approval { .. } => false,
            _ => true,
        }
    }

    /// The outputs edges may leave this node by.
    pub fn outputs(&self) -> Vec<String> {
        match self {
            Action::Condition { .. } => vec!["true".into(), "false".into()],
            Action::Switch { cases } => {
                let mut v: Vec<String> = cases.iter().map(|c| c.output.clone()).collect();
                v.push("default".into());
                v
            }
            Action::Wait { .. } => vec!["ok".into(), "timeout".into()],
            Action::Approval { .. } => {
                vec!["approved".into(), "rejected".into(), "timeout".into()]
            }
            _ => vec!["ok".into(), "error".into()],
        }
    }
}

/// An edge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeDef {
    /// Source node id.
    pub from: String,
    /// Target node id.
    pub to: String,
    /// Output of the source node (default `ok`).
    #[serde(default = "ok")]
    pub output: String,
    /// Optional rhai condition: the edge is taken only when it holds.
    #[serde(default)]
    pub condition: Option<String>,
}

fn ok() -> String {
    "ok".into()
}

/// A working-day calendar (the `calendars` section of an app).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalendarDef {
    /// Key (`default` is the app's calendar).
    #[serde(default = "default_key")]
    pub key: String,
    /// Working weekdays, 1 = Monday … 7 = Sunday (default Monday to Friday).
    #[serde(default = "weekdays")]
    pub working_days: Vec<u32>,
    /// Holidays (`YYYY-MM-DD`), not worked.
    #[serde(default)]
    pub holidays: Vec<chrono::NaiveDate>,
    /// Weekend days worked instead (make-up days, `YYYY-MM-DD`).
    #[serde(default)]
    pub extra_working_days: Vec<chrono::NaiveDate>,
    /// Time zone (default: the app's).
    #[serde(default)]
    pub timezone: Option<String>,
}

fn default_key() -> String {
    "default".into()
}
fn weekdays() -> Vec<u32> {
    vec![1, 2, 3, 4, 5]
}

/// Template variables handed to the engine by its host (`vars.X` in templates).
pub type Vars = BTreeMap<String, String>;
