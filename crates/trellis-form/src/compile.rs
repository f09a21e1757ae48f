//! Checking and compiling an app definition.
//!
//! [`compile`] walks the whole definition and collects every problem with its JSON pointer
//! before giving up, the way a compiler reports all errors at once; only a definition without
//! problems becomes an [`App`].

use crate::def::{AppDef, FieldDef, FieldType, Track, TrackKeyword};
use crate::error::{FormError, Problem, Result};
use crate::model::{App, Entity, Field, Stage, SYSTEM_COLUMNS};
use crate::schema;
use regex::Regex;
use rust_decimal::Decimal;
use serde_json::Value;
use std::collections::HashSet;
use std::str::FromStr;
use std::sync::LazyLock;

/// Most columns an index over several columns names: PostgreSQL allows 32, and an index this
/// wide already covers a dozen-column report statement (the CRM's time in stage).
pub const MAX_INDEX_COLUMNS: usize = 16;

static KEY: LazyLock<Regex> = LazyLock::new(|| Regex::new("^[a-z][a-z0-9_]*$").unwrap());

/// Parse a definition from JSON, reporting serde errors with their path.
pub fn parse(json: &Value) -> Result<AppDef> {
    serde_path_to_error::deserialize::<_, AppDef>(json).map_err(|e| {
        let path = pointer(e.path());
        FormError::Definition(vec![Problem::new(
            path,
            "malformed",
            format!("The app definition is malformed: {}.", e.inner()),
        )])
    })
}

/// A serde path (`entities[0].fields[2].type`) as a JSON pointer (`/entities/0/fields/2/type`).
fn pointer(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    path.iter()
        .filter_map(|s| match s {
            Segment::Seq { index } => Some(format!("/{index}")),
            Segment::Map { key } => Some(format!("/{}", crate::error::pointer_segment(key))),
            Segment::Enum { variant } => {
                Some(format!("/{}", crate::error::pointer_segment(variant)))
            }
            Segment::Unknown => None,
        })
        .collect()
}

/// Check a definition completely and compile it. `version` is the number it will carry.
pub fn compile(def: AppDef, version: i64) -> Result<App> {
    let mut c = Checker::default();
    c.key("/key", &def.key, 30, "app");
    if let Some(email) = &def.default_owner {
        if !email.contains('@') {
            c.err(
                "/default_owner",
                "format",
                "The default owner must be a user's email address.",
            );
        }
    }
    c.timezone = def.timezone.parse::<chrono_tz::Tz>().ok();
    if c.timezone.is_none() {
        c.err(
            "/timezone",
            "bad_timezone",
            format!(
                "`{}` is not an IANA time zone such as Asia/Shanghai or UTC.",
                def.timezone
            ),
        );
    }
    let entity_keys: Vec<&str> = def.entities.iter().map(|e| e.key.as_str()).collect();
    if def.entities.is_empty() {
        c.err("/entities", "required", "An app needs at least one entity.");
    }
    let mut entities = vec![];
    let mut seen = HashSet::new();
    for (i, e) in def.entities.iter().enumerate() {
        let ep = format!("/entities/{i}");
        c.key(&format!("{ep}/key"), &e.key, 30, "entity");
        if !seen.insert(e.key.as_str()) {
            c.err(
                &format!("{ep}/key"),
                "duplicate",
                format!("Entity `{}` is defined twice.", e.key),
            );
        }
        if let Some(entity) = c.entity(&def.key, e, &ep, &entity_keys) {
            entities.push(entity);
        }
    }
    summaries(&mut c, &def);
    if !c.problems.is_empty() {
        return Err(FormError::Definition(c.problems));
    }
    let roles = crate::roles::compile(&def.roles, &entities).map_err(FormError::Definition)?;
    Ok(App {
        key: def.key.clone(),
        version,
        def,
        entities,
        roles,
        rollups: Default::default(),
    })
}

/// The source of every summary field: a related entity whose relation `via` points at the
/// field's entity, and a column of it the summary can take.
fn summaries(c: &mut Checker, def: &AppDef) {
    for (i, e) in def.entities.iter().enumerate() {
        for (j, f) in e.fields.iter().enumerate() {
            let (FieldType::Summary, Some(s)) = (f.ty, &f.summary) else {
                continue;
            };
            let sp = format!("/entities/{i}/fields/{j}/summary");
            let Some(src) = def.entities.iter().find(|x| x.key == s.entity) else {
                c.err(
                    &format!("{sp}/entity"),
                    "unknown_entity",
                    format!("No entity `{}` is defined.", s.entity),
                );
                continue;
            };
            match src.fields.iter().find(|x| x.key == s.via) {
                Some(v) if v.ty == FieldType::Relation && v.entity.as_deref() == Some(&e.key) => {}
                Some(_) => c.err(
                    &format!("{sp}/via"),
                    "not_a_relation",
                    format!(
                        "`{}.{}` must be a relation to `{}` for this summary.",
                        s.entity, s.via, e.key
                    ),
                ),
                None => c.err(
                    &format!("{sp}/via"),
                    "unknown_field",
                    format!("Entity `{}` has no field `{}`.", s.entity, s.via),
                ),
            }
            if !matches!(s.of.as_str(), "created_at" | "updated_at") {
                c.err(
                    &format!("{sp}/of"),
                    "not_allowed",
                    format!(
                        "A summary takes `created_at` or `updated_at` of the related records, not `{}`.",
                        s.of
                    ),
                );
            }
        }
    }
}

#[derive(Default)]
struct Checker {
    problems: Vec<Problem>,
    engine: Option<std::sync::Arc<rhai::Engine>>,
    timezone: Option<chrono_tz::Tz>,
}

impl Checker {
    fn err(&mut self, path: &str, code: &'static str, msg: impl Into<String>) {
        self.problems.push(Problem::new(path, code, msg));
    }

    fn key(&mut self, path: &str, key: &str, max: usize, what: &str) {
        if !KEY.is_match(key) || key.contains("__") || key.len() > max {
            self.err(
                path,
                "bad_key",
                format!("The {what} key `{key}` must start with a lower-case letter, use only a-z, 0-9 and single underscores, and be at most {max} characters long."),
            );
        }
    }

    fn entity(
        &mut self,
        app: &str,
        e: &crate::def::EntityDef,
        ep: &str,
        entity_keys: &[&str],
    ) -> Option<Entity> {
        let before = self.problems.len();
        let mut fields = vec![];
        let mut seen = HashSet::new();
        let field_keys: Vec<&str> = e.fields.iter().map(|f| f.key.as_str()).collect();
        let mut stage_field = None;
        for (j, f) in e.fields.iter().enumerate() {
            let fp = format!("{ep}/fields/{j}");
            self.key(&format!("{fp}/key"), &f.key, 40, "field");
            if SYSTEM_COLUMNS.contains(&f.key.as_str()) {
                self.err(
                    &format!("{fp}/key"),
                    "reserved",
                    format!("`{}` is a system field and cannot be defined.", f.key),
                );
            }
            if !seen.insert(f.key.as_str()) {
                self.err(
                    &format!("{fp}/key"),
                    "duplicate",
                    format!("Field `{}` is defined twice.", f.key),
                );
            }
            if f.ty == FieldType::Stage {
                if stage_field.is_some() {
                    self.err(
                        &format!("{fp}/type"),
                        "duplicate_stage",
                        "An entity can have only one stage field.",
                    );
                }
                stage_field = Some(j);
            }
            let siblings: Vec<(String, FieldType)> = e
                .fields
                .iter()
                .filter(|x| x.key != f.key)
                .map(|x| (x.key.clone(), x.ty))
                .collect();
            if let Some(field) = self.field(f, &fp, entity_keys, &field_keys, &siblings) {
                fields.push(field);
            }
        }
        let mut tracked: Vec<String> = match &e.history.track {
            Track::Keyword(TrackKeyword::All) => e.fields.iter().map(|f| f.key.clone()).collect(),
            Track::Keyword(TrackKeyword::None) => vec![],
            Track::Fields(list) => {
                for (k, name) in list.iter().enumerate() {
                    if !field_keys.contains(&name.as_str()) {
                        self.err(
                            &format!("{ep}/history/track/{k}"),
                            "unknown_field",
                            format!(
                                "History tracks `{name}`, which is not a field of `{}`.",
                                e.key
                            ),
                        );
                    }
                }
                list.clone()
            }
        };
        if let Some(j) = stage_field {
            let key = &e.fields[j].key;
            if !tracked.contains(key) {
                tracked.push(key.clone());
            }
        }
        let indexes = self.indexes(e, ep, &fields);
        if self.problems.len() > before {
            return None;
        }
        let validator = match schema::build_validator(&schema::entity_schema(&fields)) {
            Ok(v) => v,
            Err(msg) => {
                self.err(
                    ep,
                    "schema",
                    format!("The entity's schema does not compile: {msg}"),
                );
                return None;
            }
        };
        Some(Entity {
            key: e.key.clone(),
            label: e
                .label
                .as_ref()
                .map(|l| l.get("en", &e.key).to_owned())
                .unwrap_or_else(|| e.key.clone()),
            table: crate::model::table_name(app, &e.key),
            fields,
            stage_field,
            tracked,
            retention_days: e.history.retention_days,
            timezone: self.timezone.unwrap_or(chrono_tz::UTC),
            meta: (e.label.clone(), e.history.clone()),
            indexes,
            validator,
        })
    }

    /// An entity's indexes over several columns: each names two to eight columns the entity
    /// has, none twice, and no two indexes are the same.
    fn indexes(
        &mut self,
        e: &crate::def::EntityDef,
        ep: &str,
        fields: &[Field],
    ) -> Vec<Vec<String>> {
        // The columns as defined, so a field with a problem of its own (reported already) is
        // not reported again by every index that names it.
        let mut columns: Vec<String> = SYSTEM_COLUMNS.iter().map(|c| (*c).to_owned()).collect();
        for f in &e.fields {
            columns.push(f.key.clone());
            match f.ty {
                FieldType::Money => columns.push(crate::model::currency_column(&f.key)),
                FieldType::Stage => {
                    columns.push(crate::model::stage_changed_column(&f.key));
                    for s in &f.stages {
                        columns.push(crate::model::stage_entered_column(&f.key, &s.key));
                        columns.push(crate::model::stage_days_column(&f.key, &s.key));
                    }
                }
                _ => {}
            }
        }
        let mut out: Vec<Vec<String>> = vec![];
        for (i, ix) in e.indexes.iter().enumerate() {
            let ip = format!("{ep}/indexes/{i}");
            let before = self.problems.len();
            if !(2..=MAX_INDEX_COLUMNS).contains(&ix.columns.len()) {
                self.err(
                    &format!("{ip}/columns"),
                    "bad_index",
                    format!(
                        "An index names 2 to {MAX_INDEX_COLUMNS} columns, not {} (one field is indexed with `\"indexed\": true`).",
                        ix.columns.len()
                    ),
                );
            }
            for (k, c) in ix.columns.iter().enumerate() {
                let cp = format!("{ip}/columns/{k}");
                if !columns.contains(c) {
                    self.err(
                        &cp,
                        "unknown_column",
                        format!(
                            "`{c}` is not a column of `{}`: name a field, a system column (created_at, owner …) or a stage column (stage__changed_at, stage__entered_<stage>, stage__days_<stage>).",
                            e.key
                        ),
                    );
                } else if ix.columns[..k].contains(c) {
                    self.err(
                        &cp,
                        "duplicate",
                        format!("`{c}` is named twice in this index."),
                    );
                } else if let Some(f) = fields.iter().find(|f| {
                    f.key == *c
                        && matches!(
                            f.ty,
                            FieldType::LongText | FieldType::Json | FieldType::Multiselect
                        )
                }) {
                    // PostgreSQL refuses an index entry over about 2.7 kB, and with it the
                    // write of a record whose long value would not fit.
                    self.err(
                        &cp,
                        "bad_index",
                        format!(
                            "`{c}` is a {} field; its values can be too long for an index.",
                            f.ty.name()
                        ),
                    );
                }
            }
            if self.problems.len() > before {
                continue;
            }
            if out.contains(&ix.columns) {
                self.err(&ip, "duplicate", "The same index is defined twice.");
                continue;
            }
            out.push(ix.columns.clone());
        }
        out
    }

    fn field(
        &mut self,
        f: &FieldDef,
        fp: &str,
        entity_keys: &[&str],
        field_keys: &[&str],
        siblings: &[(String, FieldType)],
    ) -> Option<Field> {
        let before = self.problems.len();
        let ty = f.ty;
        let name = f.ty.name();
        let is_text = matches!(
            ty,
            FieldType::Text
                | FieldType::LongText
                | FieldType::Email
                | FieldType::Phone
                | FieldType::Url
        );
        let is_num = matches!(
            ty,
            FieldType::Integer | FieldType::Decimal | FieldType::Money
        );
        // Options.
        let mut options = vec![];
        if matches!(ty, FieldType::Select | FieldType::Multiselect) {
            if f.options.is_empty() {
                self.err(
                    &format!("{fp}/options"),
                    "required",
                    format!("A {name} field needs at least one option."),
                );
            }
            for (k, o) in f.options.iter().enumerate() {
                if o.key.is_empty() || o.key.len() > 64 {
                    self.err(
                        &format!("{fp}/options/{k}/key"),
                        "bad_key",
                        "An option key must be 1 to 64 characters long.",
                    );
                }
                if options.contains(&o.key) {
                    self.err(
                        &format!("{fp}/options/{k}/key"),
                        "duplicate",
                        format!("Option `{}` is listed twice.", o.key),
                    );
                }
                options.push(o.key.clone());
            }
        } else if !f.options.is_empty() {
            self.err(
                &format!("{fp}/options"),
                "not_allowed",
                format!("Only select and multiselect fields have options, not {name}."),
            );
        }
        // Relation target.
        match (ty, &f.entity) {
            (FieldType::Relation, None) => self.err(
                &format!("{fp}/entity"),
                "required",
                "A relation field must name its target entity.",
            ),
            (FieldType::Relation, Some(t)) if !entity_keys.contains(&t.as_str()) => self.err(
                &format!("{fp}/entity"),
                "unknown_entity",
                format!("The relation points to `{t}`, which is not an entity of this app."),
            ),
            (FieldType::Relation, _) => {}
            (_, Some(_)) => self.err(
                &format!("{fp}/entity"),
                "not_allowed",
                format!("Only relation fields name an entity, not {name}."),
            ),
            _ => {}
        }
        // Stages.
        let mut stages = vec![];
        if ty == FieldType::Stage {
            if f.stages.is_empty() {
                self.err(
                    &format!("{fp}/stages"),
                    "required",
                    "A stage field needs at least one stage.",
                );
            }
            let mut seen = HashSet::new();
            for (k, s) in f.stages.iter().enumerate() {
                let sp = format!("{fp}/stages/{k}");
                self.key(&format!("{sp}/key"), &s.key, 20, "stage");
                let column = crate::model::stage_entered_column(&f.key, &s.key);
                if column.len() > 63 {
                    self.err(
                        &format!("{sp}/key"),
                        "too_long",
                        format!("The stage key `{}` is too long together with the field key `{}`: the column `{column}` would exceed 63 characters.", s.key, f.key),
                    );
                }
                if !seen.insert(s.key.as_str()) {
                    self.err(
                        &format!("{sp}/key"),
                        "duplicate",
                        format!("Stage `{}` is listed twice.", s.key),
                    );
                }
                if !(0.0..=1.0).contains(&s.probability) {
                    self.err(
                        &format!("{sp}/probability"),
                        "out_of_range",
                        "A win probability must be between 0 and 1.",
                    );
                }
                for (m, c) in s.entry_criteria.iter().enumerate() {
                    if !field_keys.contains(&c.as_str()) {
                        self.err(
                            &format!("{sp}/entry_criteria/{m}"),
                            "unknown_field",
                            format!("Entry criterion `{c}` is not a field of this entity."),
                        );
                    }
                }
                stages.push(Stage {
                    key: s.key.clone(),
                    label: s
                        .label
                        .as_ref()
                        .map(|l| l.get("en", &s.key).to_owned())
                        .unwrap_or_else(|| s.key.clone()),
                    probability: s.probability,
                    kind: s.kind,
                    entry_criteria: s.entry_criteria.clone(),
                });
            }
        } else if !f.stages.is_empty() {
            self.err(
                &format!("{fp}/stages"),
                "not_allowed",
                format!("Only stage fields have stages, not {name}."),
            );
        }
        // Constraints that only fit some types.
        if (f.min_length.is_some() || f.max_length.is_some())
            && !(is_text || ty == FieldType::Multiselect)
        {
            self.err(
                &format!("{fp}/max_length"),
                "not_allowed",
                format!("A {name} field has no length."),
            );
        }
        if let (Some(a), Some(b)) = (f.min_length, f.max_length) {
            if a > b {
                self.err(
                    &format!("{fp}/min_length"),
                    "out_of_range",
                    "min_length is larger than max_length.",
                );
            }
        }
        if let Some(p) = &f.pattern {
            if !matches!(ty, FieldType::Text | FieldType::LongText) {
                self.err(
                    &format!("{fp}/pattern"),
                    "not_allowed",
                    format!("A {name} field cannot have a pattern."),
                );
            } else if let Err(e) = Regex::new(p) {
                self.err(
                    &format!("{fp}/pattern"),
                    "bad_pattern",
                    format!("The pattern is not a valid regular expression: {e}"),
                );
            }
        }
        if f.unique
            && matches!(
                ty,
                FieldType::Json
                    | FieldType::Multiselect
                    | FieldType::LongText
                    | FieldType::Boolean
                    | FieldType::Stage
            )
        {
            self.err(
                &format!("{fp}/unique"),
                "not_allowed",
                format!("A {name} field cannot be unique."),
            );
        }
        let scale = f.scale.unwrap_or(2);
        if f.scale.is_some()
            && !matches!(
                ty,
                FieldType::Decimal | FieldType::Money | FieldType::Formula
            )
        {
            self.err(
                &format!("{fp}/scale"),
                "not_allowed",
                format!("A {name} field has no scale."),
            );
        } else if scale > 9 {
            self.err(
                &format!("{fp}/scale"),
                "out_of_range",
                "The scale must be between 0 and 9.",
            );
        }
        let currency = f.currency.clone().unwrap_or_else(|| "CNY".to_owned());
        if f.currency.is_some() && ty != FieldType::Money {
            self.err(
                &format!("{fp}/currency"),
                "not_allowed",
                format!("A {name} field has no currency."),
            );
        } else if !Regex::new(schema::CURRENCY_PATTERN)
            .unwrap()
            .is_match(&currency)
        {
            self.err(
                &format!("{fp}/currency"),
                "format",
                "A currency is a three-letter ISO 4217 code such as CNY or USD.",
            );
        }
        // Bounds.
        let (mut min_num, mut max_num, mut min_date, mut max_date) = (None, None, None, None);
        for (which, v) in [("min", &f.min), ("max", &f.max)] {
            let Some(v) = v else { continue };
            let path = format!("{fp}/{which}");
            if is_num {
                match number(v) {
                    Some(d) if which == "min" => min_num = Some(d),
                    Some(d) => max_num = Some(d),
                    None => self.err(
                        &path,
                        "wrong_type",
                        format!("{which} of a {name} field must be a number."),
                    ),
                }
            } else if ty == FieldType::Date {
                match v
                    .as_str()
                    .and_then(|s| chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").ok())
                {
                    Some(d) if which == "min" => min_date = Some(d),
                    Some(d) => max_date = Some(d),
                    None => self.err(
                        &path,
                        "wrong_type",
                        format!("{which} of a date field must be a date such as 2026-01-31."),
                    ),
                }
            } else {
                self.err(
                    &path,
                    "not_allowed",
                    format!("A {name} field has no {which}."),
                );
            }
        }
        if let (Some(a), Some(b)) = (min_num, max_num) {
            if a > b {
                self.err(
                    &format!("{fp}/min"),
                    "out_of_range",
                    "min is larger than max.",
                );
            }
        }
        if ty == FieldType::Integer
            && (f.min.as_ref().is_some_and(|v| !v.is_i64())
                || f.max.as_ref().is_some_and(|v| !v.is_i64()))
        {
            self.err(
                &format!("{fp}/min"),
                "wrong_type",
                "The bounds of an integer field must be whole numbers.",
            );
        }
        // A formula: compiled once, with the app's shared sandboxed engine.
        let formula = match (ty, &f.formula) {
            (FieldType::Formula, Some(text)) => {
                let engine = self
                    .engine
                    .get_or_insert_with(|| std::sync::Arc::new(crate::formula::engine()))
                    .clone();
                let result = f.result.unwrap_or(crate::formula::ResultType::Decimal);
                // A summary changes with another entity's writes, which do not compute this
                // record's formulas: a formula reading one would keep a stale value.
                let words: HashSet<&str> = text
                    .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                    .collect();
                let summary = siblings
                    .iter()
                    .find(|(k, t)| *t == FieldType::Summary && words.contains(k.as_str()));
                if let Some((k, _)) = summary {
                    self.err(
                        &format!("{fp}/formula"),
                        "not_allowed",
                        format!("`{k}` is a summary field, kept by another entity's writes; a formula would keep the value it had at this record's last write."),
                    );
                    None
                } else {
                    match crate::formula::compile(&engine, text, result, siblings) {
                        Ok(x) => Some(std::sync::Arc::new(x)),
                        Err(e) => {
                            self.err(
                                &format!("{fp}/formula"),
                                "bad_formula",
                                format!("The formula does not compile: {e}"),
                            );
                            None
                        }
                    }
                }
            }
            (FieldType::Formula, None) => {
                self.err(
                    &format!("{fp}/formula"),
                    "required",
                    "A formula field needs a formula.",
                );
                None
            }
            (_, Some(_)) | (_, None) if f.formula.is_some() || f.result.is_some() => {
                self.err(
                    &format!("{fp}/formula"),
                    "not_allowed",
                    format!("Only formula fields take a formula and a result, not {name}."),
                );
                None
            }
            _ => None,
        };
        if ty == FieldType::Formula && (f.required || f.unique || f.default.is_some()) {
            self.err(
                &format!("{fp}/required"),
                "not_allowed",
                "A formula field is computed: it cannot be required, unique or have a default.",
            );
        }
        // A summary: its source is checked with the other entities (`summaries`).
        match (ty, &f.summary) {
            (FieldType::Summary, None) => self.err(
                &format!("{fp}/summary"),
                "required",
                "A summary field needs `summary`: {\"entity\", \"via\", \"agg\"}.",
            ),
            (FieldType::Summary, Some(_)) => {
                if f.required || f.unique || f.default.is_some() {
                    self.err(
                        &format!("{fp}/required"),
                        "not_allowed",
                        "A summary field is kept from the related records: it cannot be required, unique or have a default.",
                    );
                }
            }
            (_, Some(_)) => self.err(
                &format!("{fp}/summary"),
                "not_allowed",
                format!("Only summary fields take `summary`, not {name}."),
            ),
            (_, None) => {}
        }
        // The schema of a json field's value, compiled on its own.
        let json_validator = match (&f.schema, ty) {
            (Some(s), FieldType::Json) => match schema::build_validator(s) {
                Ok(v) => Some(v),
                Err(e) => {
                    self.err(
                        &format!("{fp}/schema"),
                        "bad_schema",
                        format!("The JSON Schema does not compile: {e}"),
                    );
                    None
                }
            },
            (Some(_), _) => {
                self.err(
                    &format!("{fp}/schema"),
                    "not_allowed",
                    format!("Only json fields take a schema, not {name}."),
                );
                None
            }
            _ => None,
        };
        if self.problems.len() > before {
            return None;
        }
        let field = Field {
            key: f.key.clone(),
            ty,
            label: f
                .label
                .as_ref()
                .map(|l| l.get("en", &f.key).to_owned())
                .unwrap_or_else(|| f.key.clone()),
            def: f.clone(),
            options,
            stages,
            scale,
            currency,
            min_num,
            max_num,
            min_date,
            max_date,
            json_validator,
            formula,
        };
        // The default must itself be a valid value.
        if let Some(d) = &f.default {
            let inner = schema::field_schema(
                f,
                &field.options,
                &field
                    .stages
                    .iter()
                    .map(|s| s.key.clone())
                    .collect::<Vec<_>>(),
            );
            let ok = schema::build_validator(&inner)
                .map(|v| v.is_valid(d))
                .unwrap_or(false)
                && crate::values::to_sql(&field, d, "").is_ok();
            if !ok {
                self.err(
                    &format!("{fp}/default"),
                    "bad_default",
                    format!("The default {d} is not a valid value of this {name} field."),
                );
                return None;
            }
        }
        Some(field)
    }
}

fn number(v: &Value) -> Option<Decimal> {
    match v {
        Value::Number(n) => Decimal::from_str(&n.to_string())
            .ok()
            .or_else(|| n.as_f64().and_then(|f| Decimal::try_from(f).ok())),
        Value::String(s) => Decimal::from_str(s).ok(),
        _ => None,
    }
}
