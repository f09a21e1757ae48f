//! Compile the `workflows` (and `calendars`) sections of an app: parse, check every reference
//! against the compiled entities, build the graph with petgraph, compile every rhai condition and
//! parse every minijinja template. Every problem is reported at once, with its JSON path.

use crate::calendar::Calendar;
use crate::def::{Action, CalendarDef, EdgeDef, Mode, NodeDef, Recipient, Trigger, WorkflowDef};
use crate::script::{self, Condition};
use crate::template::{is_template, Templates};
use petgraph::graph::{DiGraph, NodeIndex};
use serde_json::Value as Json;
use std::collections::HashMap;
use std::sync::Arc;
use trellis_form::def::FieldType;
use trellis_form::error::{pointer_segment, Problem};
use trellis_form::model::{App, Entity};

/// A compiled workflow version.
#[derive(Debug)]
pub struct Workflow {
    /// The definition.
    pub def: WorkflowDef,
    /// Id of the entry node.
    pub entry: String,
    /// Node index by id.
    pub nodes: HashMap<String, usize>,
    /// Outgoing edges per node id, in definition order.
    pub edges: HashMap<String, Vec<usize>>,
    /// Compiled conditions by name (see [`cond_name`]).
    pub conditions: HashMap<String, Condition>,
    /// Parsed templates by name (see [`tpl_name`]).
    pub templates: Templates,
}

impl Workflow {
    /// The node `id`.
    pub fn node(&self, id: &str) -> Option<&NodeDef> {
        self.nodes.get(id).map(|i| &self.def.nodes[*i])
    }

    /// The condition named `name` (must exist: compiled with the workflow).
    pub fn condition(&self, name: &str) -> &Condition {
        &self.conditions[name]
    }

    /// Whether the trigger's condition holds over `ctx` (true without one; false when it fails:
    /// the scans start nothing on a broken condition).
    pub fn trigger_holds(&self, ctx: &Json) -> bool {
        self.def.trigger.condition().is_none()
            || self
                .condition(&cond_name(&["trigger", "condition"]))
                .eval(ctx)
                .unwrap_or(false)
    }

    /// The edges leaving `id`.
    pub fn edges_from(&self, id: &str) -> impl Iterator<Item = (usize, &EdgeDef)> {
        self.edges
            .get(id)
            .into_iter()
            .flatten()
            .map(|i| (*i, &self.def.edges[*i]))
    }
}

/// Name of a compiled condition: its JSON path below the workflow (`trigger/condition`,
/// `nodes/2/condition`, `edges/1/condition`, `nodes/0/rules/3/when`).
pub fn cond_name(parts: &[&str]) -> String {
    parts.join("/")
}

/// Name of a template: its JSON path below the workflow (`nodes/3/values/title`).
pub fn tpl_name(parts: &[&str]) -> String {
    parts.join("/")
}

/// Every workflow and calendar of an app.
#[derive(Debug, Default)]
pub struct Flows {
    /// Current version of each workflow, by key.
    pub workflows: HashMap<String, Arc<Workflow>>,
    /// Calendars by key (`default` always exists).
    pub calendars: HashMap<String, Calendar>,
}

impl Flows {
    /// The app's default working-day calendar.
    pub fn calendar(&self) -> Calendar {
        self.calendars
            .get("default")
            .cloned()
            .unwrap_or_else(|| Calendar::weekdays(chrono_tz::UTC))
    }

    /// Enabled workflows in key order.
    pub fn enabled(&self) -> Vec<&Arc<Workflow>> {
        let mut v: Vec<&Arc<Workflow>> =
            self.workflows.values().filter(|w| w.def.enabled).collect();
        v.sort_by(|a, b| a.def.key.cmp(&b.def.key));
        v
    }
}

fn parse<T: serde::de::DeserializeOwned>(v: &Json, base: &str) -> Result<T, Problem> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let p = e.path().to_string();
        let ptr = if p == "." {
            base.to_owned()
        } else {
            format!("{base}/{}", p.replace('.', "/"))
        };
        Problem::new(ptr, "invalid", e.inner().to_string())
    })
}

/// Compile the app's workflows and calendars; every problem at once.
pub fn compile(app: &App) -> Result<Flows, Vec<Problem>> {
    let mut problems = vec![];
    let mut flows = Flows::default();
    let engine = Arc::new(script::engine());
    let app_tz = app
        .entities
        .first()
        .map(|e| e.timezone)
        .unwrap_or(chrono_tz::UTC);
    for (i, c) in app.def.calendars.iter().enumerate() {
        let base = format!("/calendars/{i}");
        match parse::<CalendarDef>(c, &base) {
            Ok(def) => match Calendar::new(&def, app_tz) {
                Ok(cal) => {
                    if flows.calendars.insert(def.key.clone(), cal).is_some() {
                        problems.push(Problem::new(
                            format!("{base}/key"),
                            "duplicate",
                            format!("There are two calendars called `{}`.", def.key),
                        ));
                    }
                }
                Err(m) => problems.push(Problem::new(base, "invalid", m)),
            },
            Err(p) => problems.push(p),
        }
    }
    flows
        .calendars
        .entry("default".into())
        .or_insert_with(|| Calendar::weekdays(app_tz));
    for (i, w) in app.def.workflows.iter().enumerate() {
        let base = format!("/workflows/{i}");
        let def = match parse::<WorkflowDef>(w, &base) {
            Ok(d) => d,
            Err(p) => {
                problems.push(p);
                continue;
            }
        };
        let key = def.key.clone();
        match compile_one(app, &engine, def) {
            Ok(wf) => {
                if flows.workflows.insert(key.clone(), Arc::new(wf)).is_some() {
                    problems.push(Problem::new(
                        format!("{base}/key"),
                        "duplicate",
                        format!("There are two workflows called `{key}`."),
                    ));
                }
            }
            Err(ps) => problems.extend(ps.into_iter().map(|p| p.prefixed(&base))),
        }
    }
    if problems.is_empty() {
        Ok(flows)
    } else {
        Err(problems)
    }
}

struct Checker<'a> {
    app: &'a App,
    engine: &'a Arc<rhai::Engine>,
    problems: Vec<Problem>,
    conditions: HashMap<String, Condition>,
    templates: Templates,
}

impl Checker<'_> {
    fn problem(&mut self, path: &str, code: &'static str, msg: String) {
        self.problems
            .push(Problem::new(format!("/{path}"), code, msg));
    }

    fn condition(&mut self, name: String, text: &str) {
        match script::compile(self.engine, text) {
            Ok(c) => {
                self.conditions.insert(name, c);
            }
            Err(m) => self.problem(
                &name,
                "script",
                format!("This condition does not compile: {m}"),
            ),
        }
    }

    fn template(&mut self, name: String, text: &str) {
        if let Err(m) = self.templates.add(&name, text) {
            self.problem(
                &name,
                "template",
                format!("This template does not parse: {m}"),
            );
        }
    }

    fn entity(&mut self, path: &str, key: &str) -> Option<&'_ Entity> {
        match self.app.entity(key) {
            Ok(_) => self.app.entities.iter().find(|e| e.key == key),
            Err(_) => {
                let known: Vec<&str> = self.app.entities.iter().map(|e| e.key.as_str()).collect();
                self.problem(
                    path,
                    "unknown_entity",
                    format!(
                        "There is no entity `{key}` in this app (it has: {}).",
                        known.join(", ")
                    ),
                );
                None
            }
        }
    }

    fn field(&mut self, path: &str, e: &Entity, key: &str) {
        if e.field(key).is_none() && !matches!(key, "owner") {
            self.problem(
                path,
                "unknown_field",
                format!("The entity `{}` has no field `{key}`.", e.key),
            );
        }
    }

    /// Field values of an update or create: every key a field, string values templates.
    fn values(&mut self, path: &str, e: &Entity, values: &serde_json::Map<String, Json>) {
        for (k, v) in values {
            let p = format!("{path}/{}", pointer_segment(k));
            self.field(&p, e, k);
            if let Json::String(s) = v {
                if is_template(s) {
                    self.template(p, s);
                }
            }
        }
    }

    fn json_templates(&mut self, path: &str, v: &Json) {
        match v {
            Json::String(s) if is_template(s) => self.template(path.to_owned(), s),
            Json::Array(a) => {
                for (i, x) in a.iter().enumerate() {
                    self.json_templates(&format!("{path}/{i}"), x);
                }
            }
            Json::Object(m) => {
                for (k, x) in m {
                    self.json_templates(&format!("{path}/{}", pointer_segment(k)), x);
                }
            }
            _ => {}
        }
    }

    fn recipient(&mut self, path: &str, r: &Recipient) {
        if let Recipient::Role(role) = r {
            if role.trim().is_empty() {
                self.problem(path, "invalid", "The role is empty.".into());
            }
        }
    }
}

fn compile_one(
    app: &App,
    engine: &Arc<rhai::Engine>,
    def: WorkflowDef,
) -> Result<Workflow, Vec<Problem>> {
    let mut c = Checker {
        app,
        engine,
        problems: vec![],
        conditions: HashMap::new(),
        templates: Templates::new(),
    };
    if def.key.is_empty()
        || !def
            .key
            .chars()
            .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_')
    {
        c.problem(
            "key",
            "invalid_key",
            format!(
                "The workflow key `{}` must be lower-case letters, digits and underscores.",
                def.key
            ),
        );
    }
    if def.version < 1 {
        c.problem(
            "version",
            "invalid",
            "The version must be 1 or more.".into(),
        );
    }
    // Trigger.
    let entity_key = def.trigger.entity().to_owned();
    let entity = match &def.trigger {
        Trigger::Schedule { .. } | Trigger::AlertFired { .. } => {
            match &def.trigger {
                Trigger::Schedule { cron } => {
                    if let Err(m) = crate::schedule::parse(cron) {
                        c.problem("trigger/cron", "invalid_cron", m);
                    }
                }
                Trigger::AlertFired { alert, .. } => {
                    let known = alert_names(app);
                    if !known.iter().any(|a| a == alert) {
                        c.problem(
                            "trigger/alert",
                            "unknown_alert",
                            format!(
                                "The app's reports have no alert `{alert}` (they have: {}).",
                                if known.is_empty() {
                                    "none".to_owned()
                                } else {
                                    known.join(", ")
                                }
                            ),
                        );
                    }
                }
                _ => {}
            }
            for (i, n) in def.nodes.iter().enumerate() {
                if matches!(
                    n.action,
                    Action::UpdateRecord { .. }
                        | Action::AssignOwner { .. }
                        | Action::RenderDocument { .. }
                        | Action::Approval { .. }
                ) {
                    c.problem(
                        &format!("nodes/{i}/type"),
                        "needs_record",
                        format!(
                            "A `{}` node works on the run's record, and a scheduled or alert run has none.",
                            n.action.kind()
                        ),
                    );
                }
            }
            None
        }
        _ => c
            .entity("trigger/entity", &entity_key)
            .map(|e| e.key.clone()),
    };
    if let Some(ek) = &entity {
        let e = app.entity(ek).expect("checked");
        match &def.trigger {
            Trigger::RecordUpdated { fields, .. } => {
                for (i, f) in fields.iter().enumerate() {
                    c.field(&format!("trigger/fields/{i}"), e, f);
                }
            }
            Trigger::StageChanged { from, to, .. } => match e.stage() {
                None => c.problem(
                    "trigger/type",
                    "no_stage",
                    format!("The entity `{ek}` has no stage field, so its stage cannot change."),
                ),
                Some(sf) => {
                    for (part, list) in [("from", from), ("to", to)] {
                        for (i, s) in list.iter().enumerate() {
                            if sf.stages.iter().all(|x| x.key != *s) {
                                let known: Vec<&str> =
                                    sf.stages.iter().map(|x| x.key.as_str()).collect();
                                c.problem(
                                    &format!("trigger/{part}/{i}"),
                                    "unknown_stage",
                                    format!(
                                        "There is no stage `{s}` (the stages are: {}).",
                                        known.join(", ")
                                    ),
                                );
                            }
                        }
                    }
                }
            },
            Trigger::Inactivity {
                hours,
                working_days,
                activity_entity,
                activity_kinds,
                ..
            } => {
                if !activity_kinds.is_empty() {
                    let kind = activity_entity
                        .as_deref()
                        .and_then(|a| app.entity(a).ok())
                        .and_then(|ae| ae.field("kind"));
                    match kind {
                        Some(f) if f.ty == FieldType::Select => {
                            for (i, k) in activity_kinds.iter().enumerate() {
                                if !f.options.contains(k) {
                                    c.problem(
                                        &format!("trigger/activity_kinds/{i}"),
                                        "unknown_option",
                                        format!("The activity field `kind` has no option `{k}` (it has: {}).", f.options.join(", ")),
                                    );
                                }
                            }
                        }
                        _ => c.problem(
                            "trigger/activity_kinds",
                            "invalid",
                            "`activity_kinds` needs an `activity_entity` with a select field `kind`.".into(),
                        ),
                    }
                }
                if hours.is_some() == working_days.is_some() {
                    c.problem(
                        "trigger",
                        "invalid",
                        "Give the idle time as either `hours` or `working_days`.".into(),
                    );
                }
                if let Some(a) = activity_entity {
                    if let Some(ae) = c
                        .entity("trigger/activity_entity", a)
                        .map(|x| x.key.clone())
                    {
                        let ae = app.entity(&ae).expect("checked");
                        if !ae.fields.iter().any(|f| {
                            f.ty == FieldType::Relation
                                && f.def.entity.as_deref() == Some(ek.as_str())
                        }) {
                            c.problem(
                                "trigger/activity_entity",
                                "no_relation",
                                format!("The entity `{a}` has no relation field pointing to `{ek}`, so its records cannot count as activity on it."),
                            );
                        }
                    }
                }
            }
            Trigger::Webhook { name, secret, .. } => {
                if name.is_empty()
                    || !name.chars().all(|ch| {
                        ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_' || ch == '-'
                    })
                {
                    c.problem(
                        "trigger/name",
                        "invalid_key",
                        format!("The hook name `{name}` must be lower-case letters, digits, `-` and `_`."),
                    );
                }
                c.template("trigger/secret".into(), secret);
            }
            Trigger::DateRelative { field, hour, .. } => {
                match e.field(field) {
                    Some(fd) if matches!(fd.ty, FieldType::Date | FieldType::Datetime) => {}
                    Some(_) => c.problem(
                        "trigger/field",
                        "not_a_date",
                        format!("The field `{field}` is not a date or date-time field."),
                    ),
                    None => c.field("trigger/field", e, field),
                }
                if hour.is_some_and(|h| h > 23) {
                    c.problem("trigger/hour", "invalid", "The hour is 0 to 23.".into());
                }
            }
            _ => {}
        }
    }
    if def.mode == Mode::Inline
        && matches!(
            def.trigger,
            Trigger::Schedule { .. } | Trigger::AlertFired { .. }
        )
    {
        c.problem(
            "mode",
            "inline_without_write",
            "Inline workflows run inside a record's write; this trigger has none, so make the workflow `async`.".into(),
        );
    }
    if let Some(t) = def.trigger.condition() {
        c.condition(cond_name(&["trigger", "condition"]), t);
    }
    // Nodes.
    let mut index: HashMap<String, usize> = HashMap::new();
    if def.nodes.is_empty() {
        c.problem(
            "nodes",
            "empty",
            "A workflow needs at least one node.".into(),
        );
    }
    for (i, n) in def.nodes.iter().enumerate() {
        let np = format!("nodes/{i}");
        if n.id.is_empty() {
            c.problem(
                &format!("{np}/id"),
                "invalid",
                "The node id is empty.".into(),
            );
        }
        if index.insert(n.id.clone(), i).is_some() {
            c.problem(
                &format!("{np}/id"),
                "duplicate",
                format!("There are two nodes with the id `{}`.", n.id),
            );
        }
        if def.mode == Mode::Inline && !n.action.database_only() {
            c.problem(
                &format!("{np}/type"),
                "inline_side_effect",
                format!(
                    "The node `{}` ({}) has effects outside the database or waits, so it cannot run inline in the triggering write; make the workflow `async`.",
                    n.id,
                    n.action.kind()
                ),
            );
        }
        let e = entity.as_deref().and_then(|k| app.entity(k).ok());
        match &n.action {
            Action::Condition { condition } => c.condition(
                cond_name(&["nodes", &i.to_string(), "condition"]),
                condition,
            ),
            Action::Switch { cases } => {
                if cases.is_empty() {
                    c.problem(
                        &format!("{np}/cases"),
                        "empty",
                        "A switch needs cases.".into(),
                    );
                }
                for (j, case) in cases.iter().enumerate() {
                    c.condition(
                        cond_name(&["nodes", &i.to_string(), "cases", &j.to_string(), "when"]),
                        &case.when,
                    );
                }
            }
            Action::Wait {
                seconds,
                minutes,
                hours,
                working_days,
                until_field,
                until,
                ..
            } => {
                let modes = [
                    seconds.is_some() || minutes.is_some() || hours.is_some(),
                    working_days.is_some(),
                    until_field.is_some(),
                    until.is_some(),
                ]
                .iter()
                .filter(|x| **x)
                .count();
                if modes != 1 {
                    c.problem(&np, "invalid", "A wait needs exactly one of: `seconds`/`minutes`/`hours`, `working_days`, `until_field`, `until`.".into());
                }
                if let (Some(f), Some(e)) = (until_field, e) {
                    match e.field(f) {
                        Some(fd) if matches!(fd.ty, FieldType::Date | FieldType::Datetime) => {}
                        Some(_) => c.problem(
                            &format!("{np}/until_field"),
                            "not_a_date",
                            format!("The field `{f}` is not a date or date-time field."),
                        ),
                        None => c.field(&format!("{np}/until_field"), e, f),
                    }
                }
                if let Some(u) = until {
                    c.condition(cond_name(&["nodes", &i.to_string(), "until"]), u);
                }
            }
            Action::UpdateRecord { values } => {
                if let Some(e) = e {
                    c.values(&format!("{np}/values"), e, values);
                }
            }
            Action::CreateRecord {
                entity: target,
                values,
            } => {
                if let Some(te) = c
                    .entity(&format!("{np}/entity"), target)
                    .map(|x| x.key.clone())
                {
                    let te = app.entity(&te).expect("checked");
                    c.values(&format!("{np}/values"), te, values);
                }
            }
            Action::AssignOwner {
                rules, fallback, ..
            } => {
                for (j, r) in rules.iter().chain(fallback.iter()).enumerate() {
                    let rp = if j < rules.len() {
                        format!("{np}/rules/{j}")
                    } else {
                        format!("{np}/fallback")
                    };
                    if r.user.is_some() == r.team.is_some() {
                        c.problem(
                            &rp,
                            "invalid",
                            "An assignment rule names either a `user` (email) or a `team` (key)."
                                .into(),
                        );
                    }
                    if let Some(w) = &r.when {
                        c.condition(format!("{rp}/when"), w);
                    }
                }
                if rules.is_empty() && fallback.is_none() {
                    c.problem(
                        &np,
                        "empty",
                        "An assignment needs rules or a fallback.".into(),
                    );
                }
            }
            Action::Notify {
                to,
                title,
                body,
                im_webhook,
                ..
            } => {
                c.recipient(&format!("{np}/to"), to);
                c.template(format!("{np}/title"), title);
                c.template(format!("{np}/body"), body);
                if let Some(u) = im_webhook {
                    c.template(format!("{np}/im_webhook"), u);
                }
            }
            Action::SendEmail { to, subject, body } => {
                c.template(format!("{np}/to"), to);
                c.template(format!("{np}/subject"), subject);
                c.template(format!("{np}/body"), body);
            }
            Action::RenderDocument { name, template, .. } => {
                c.template(format!("{np}/name"), name);
                c.template(format!("{np}/template"), template);
            }
            Action::HttpRequest { url, body, secret } => {
                c.template(format!("{np}/url"), url);
                c.json_templates(&format!("{np}/body"), body);
                if let Some(s) = secret {
                    c.template(format!("{np}/secret"), s);
                }
            }
            Action::Approval { steps } => {
                if steps.is_empty() {
                    c.problem(
                        &format!("{np}/steps"),
                        "empty",
                        "An approval needs at least one step.".into(),
                    );
                }
                for (j, s) in steps.iter().enumerate() {
                    c.recipient(&format!("{np}/steps/{j}/approvers"), &s.approvers);
                    if let Some(w) = &s.when {
                        c.condition(format!("{np}/steps/{j}/when"), w);
                    }
                }
            }
        }
    }
    // Edges and the graph.
    let mut graph: DiGraph<usize, usize> = DiGraph::new();
    let ids: Vec<NodeIndex> = (0..def.nodes.len()).map(|i| graph.add_node(i)).collect();
    let mut edges: HashMap<String, Vec<usize>> = HashMap::new();
    for (j, ed) in def.edges.iter().enumerate() {
        let ep = format!("edges/{j}");
        let from = index.get(&ed.from).copied();
        let to = index.get(&ed.to).copied();
        for (part, id, found) in [("from", &ed.from, from), ("to", &ed.to, to)] {
            if found.is_none() {
                c.problem(
                    &format!("{ep}/{part}"),
                    "unknown_node",
                    format!("There is no node `{id}` in this workflow."),
                );
            }
        }
        if let Some(f) = from {
            let outs = def.nodes[f].action.outputs();
            if !outs.contains(&ed.output) {
                c.problem(
                    &format!("{ep}/output"),
                    "unknown_output",
                    format!(
                        "The node `{}` ({}) has no output `{}` (it has: {}).",
                        ed.from,
                        def.nodes[f].action.kind(),
                        ed.output,
                        outs.join(", ")
                    ),
                );
            }
        }
        if let Some(cond) = &ed.condition {
            c.condition(format!("{ep}/condition"), cond);
        }
        if let (Some(f), Some(t)) = (from, to) {
            graph.add_edge(ids[f], ids[t], j);
            edges.entry(ed.from.clone()).or_default().push(j);
        }
    }
    let entries: Vec<usize> = (0..def.nodes.len())
        .filter(|i| {
            graph
                .neighbors_directed(ids[*i], petgraph::Direction::Incoming)
                .next()
                .is_none()
        })
        .collect();
    if petgraph::algo::is_cyclic_directed(&graph) {
        c.problem(
            "edges",
            "cycle",
            "The edges form a cycle; a workflow runs forward only (use a wait with a condition to repeat a check).".into(),
        );
    } else if !def.nodes.is_empty() && entries.len() != 1 {
        let names: Vec<&str> = entries.iter().map(|i| def.nodes[*i].id.as_str()).collect();
        c.problem(
            "edges",
            "entry",
            format!(
                "A workflow starts at exactly one node (one without incoming edges); these have none: {}.",
                names.join(", ")
            ),
        );
    }
    if !c.problems.is_empty() {
        return Err(c.problems);
    }
    let entry = def.nodes[entries[0]].id.clone();
    Ok(Workflow {
        entry,
        nodes: index,
        edges,
        conditions: c.conditions,
        templates: c.templates,
        def,
    })
}

/// The users (by email) and teams (by key) the workflows name that the database does not have,
/// each with its JSON path. Users and teams are data, not definition: `trellis app check` has
/// no database, so this runs where one is at hand (`trellis app plan`, server start). A step
/// that meets a missing one fails or falls back when it runs.
pub async fn missing_references(
    db: &trellis_form::db::Db,
    app: &App,
) -> trellis_form::Result<Vec<Problem>> {
    use crate::def::AssignRule;
    use trellis_form::db::{Sql, Value};
    use trellis_form::model::ColKind;
    let mut wanted: Vec<(String, bool, String)> = vec![]; // (path, is_team, name)
    let recipient = |path: String, r: &Recipient, out: &mut Vec<(String, bool, String)>| match r {
        Recipient::User(email) => out.push((path, false, email.clone())),
        Recipient::Team(key) => out.push((path, true, key.clone())),
        _ => {}
    };
    let rule = |path: String, r: &AssignRule, out: &mut Vec<(String, bool, String)>| {
        if let Some(u) = &r.user {
            out.push((format!("{path}/user"), false, u.clone()));
        }
        if let Some(t) = &r.team {
            out.push((format!("{path}/team"), true, t.clone()));
        }
    };
    for (w, item) in app.def.workflows.iter().enumerate() {
        let Ok(def) = serde_json::from_value::<WorkflowDef>(item.clone()) else {
            continue;
        };
        for (i, n) in def.nodes.iter().enumerate() {
            let np = format!("/workflows/{w}/nodes/{i}");
            match &n.action {
                Action::AssignOwner {
                    rules, fallback, ..
                } => {
                    for (j, r) in rules.iter().enumerate() {
                        rule(format!("{np}/rules/{j}"), r, &mut wanted);
                    }
                    if let Some(f) = fallback {
                        rule(format!("{np}/fallback"), f, &mut wanted);
                    }
                }
                Action::Notify { to, .. } => recipient(format!("{np}/to"), to, &mut wanted),
                Action::Approval { steps } => {
                    for (j, s) in steps.iter().enumerate() {
                        recipient(
                            format!("{np}/steps/{j}/approvers"),
                            &s.approvers,
                            &mut wanted,
                        );
                    }
                }
                _ => {}
            }
        }
    }
    let mut problems = vec![];
    for (path, team, name) in wanted {
        let mut sql = if team {
            Sql::new("SELECT 1 FROM \"teams\" WHERE \"key\" = ")
        } else {
            Sql::new("SELECT 1 FROM \"users\" WHERE lower(\"email\") = lower(")
        };
        sql.bind(Value::Text(name.clone()));
        if !team {
            sql.push(")");
        }
        if db.fetch_optional(&sql, &[ColKind::Int]).await?.is_none() {
            let (code, what) = if team {
                ("unknown_team", format!("There is no team `{name}` yet"))
            } else {
                ("unknown_user", format!("There is no user {name} yet"))
            };
            problems.push(Problem::new(
                path,
                code,
                format!("{what}; the step will fail or fall back until it exists."),
            ));
        }
    }
    Ok(problems)
}

/// The alert names of the app's report definitions (`reports[*].alerts`), read from the
/// definition: the report engine compiles them, and this crate does not depend on it.
fn alert_names(app: &App) -> Vec<String> {
    app.def
        .reports
        .iter()
        .filter_map(|r| r.get("alerts").and_then(serde_json::Value::as_object))
        .flat_map(|m| m.keys().cloned())
        .collect()
}
