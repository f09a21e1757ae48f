//! Roles: who may do what with which entity and field.
//!
//! Every app has the built-in roles `admin`, `manager`, `sales_rep` and `viewer`; an app
//! definition may redefine them and add its own under `roles`:
//!
//! ```json
//! {"key": "sales_rep", "label": {"en": "Sales rep"}, "scope": "own",
//!  "entities": {"*": "crud",
//!               "opportunity": {"can": "cru", "fields": {"quoted_amount": "read_only"}},
//!               "review": "r"}}
//! ```
//!
//! `scope` says whose records the role reaches: `own` (owner = the caller), `team` (the caller
//! and everyone under them through `manager`, recursively) or `all`. Per entity, the letters of
//! `crud` grant create, read, update and delete; `"*"` covers every entity not named; an entity
//! not covered is out of reach. A field may be `hidden` (never shown, filtered, grouped or
//! written) or `read_only` (shown, never written). `admin: true` lets the role manage the app's
//! members and read its audit log. The server's policy applies the compiled [`Role`].

use crate::model::Entity;
use crate::Problem;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// The built-in role keys.
pub const BUILT_IN: [&str; 4] = ["admin", "manager", "sales_rep", "viewer"];

/// Whose records a role reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Records the caller owns.
    Own,
    /// Records of the caller and everyone under them, recursively.
    Team,
    /// Every record.
    All,
}

impl Scope {
    /// The name used in definitions.
    pub fn name(self) -> &'static str {
        match self {
            Scope::Own => "own",
            Scope::Team => "team",
            Scope::All => "all",
        }
    }
}

/// What a role may do with one entity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntityPerm {
    /// May create records.
    pub create: bool,
    /// May read (list, get, report on) records.
    pub read: bool,
    /// May change records.
    pub update: bool,
    /// May delete records.
    pub delete: bool,
    /// Fields never shown to the role, nor usable in filters, sorts or reports.
    pub hidden: BTreeSet<String>,
    /// Fields shown but never written by the role.
    pub read_only: BTreeSet<String>,
}

impl EntityPerm {
    fn letters(s: &str) -> EntityPerm {
        EntityPerm {
            create: s.contains('c'),
            read: s.contains('r'),
            update: s.contains('u'),
            delete: s.contains('d'),
            ..EntityPerm::default()
        }
    }

    /// The letters granted, as in `cru`.
    pub fn can(&self) -> String {
        [
            (self.create, 'c'),
            (self.read, 'r'),
            (self.update, 'u'),
            (self.delete, 'd'),
        ]
        .iter()
        .filter(|(b, _)| *b)
        .map(|(_, c)| c)
        .collect()
    }

    /// Whether the role may write `field` (neither hidden nor read-only).
    pub fn writes(&self, field: &str) -> bool {
        !self.hidden.contains(field) && !self.read_only.contains(field)
    }
}

static NONE: std::sync::LazyLock<EntityPerm> = std::sync::LazyLock::new(EntityPerm::default);

/// A compiled role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Role {
    /// Key, as stored in app memberships.
    pub key: String,
    /// English (or first) label.
    pub label: String,
    /// Whose records it reaches.
    pub scope: Scope,
    /// Manages the app's members and reads its audit log.
    pub admin: bool,
    /// One of the four built-ins, as shipped (not redefined by the app).
    pub built_in: bool,
    /// Per-entity permissions (every entity of the app has an entry).
    pub entities: BTreeMap<String, EntityPerm>,
}

impl Role {
    /// The role's permissions on `entity` (nothing for an entity it does not cover).
    pub fn entity(&self, entity: &str) -> &EntityPerm {
        self.entities.get(entity).unwrap_or(&NONE)
    }

    /// Whether this role grants nothing `other` does not: no wider scope, no admin flag
    /// `other` lacks, no letter `other` lacks on any entity, no field visible or writable that
    /// `other` hides or makes read-only. An app administrator grants only roles within their own.
    pub fn within(&self, other: &Role) -> bool {
        let rank = |s: Scope| match s {
            Scope::Own => 0,
            Scope::Team => 1,
            Scope::All => 2,
        };
        rank(self.scope) <= rank(other.scope)
            && (!self.admin || other.admin)
            && self.entities.iter().all(|(k, p)| {
                let o = other.entity(k);
                (!p.create || o.create)
                    && (!p.read || o.read)
                    && (!p.update || o.update)
                    && (!p.delete || o.delete)
                    && o.hidden.is_subset(&p.hidden)
                    && o.read_only
                        .iter()
                        .all(|f| p.read_only.contains(f) || p.hidden.contains(f))
            })
    }

    /// Whether the role may create, change or delete anything at all.
    pub fn writes_anything(&self) -> bool {
        self.entities
            .values()
            .any(|p| p.create || p.update || p.delete)
    }

    /// Whether every field of every entity is visible to the role.
    pub fn hides_nothing(&self) -> bool {
        self.entities.values().all(|p| p.hidden.is_empty())
    }

    /// Whether the role reads every entity and every field of the app (what app-wide views of
    /// runs, emails and alerts need, on top of scope `all`).
    pub fn reads_everything(&self) -> bool {
        self.entities
            .values()
            .all(|p| p.read && p.hidden.is_empty())
    }

    /// The JSON form (`GET /api/v1/apps/{app}/roles`).
    pub fn to_json(&self) -> Value {
        let entities: serde_json::Map<String, Value> = self
            .entities
            .iter()
            .map(|(k, p)| {
                let mut fields = serde_json::Map::new();
                for f in &p.hidden {
                    fields.insert(f.clone(), Value::from("hidden"));
                }
                for f in &p.read_only {
                    fields.insert(f.clone(), Value::from("read_only"));
                }
                (
                    k.clone(),
                    serde_json::json!({"can": p.can(), "fields": fields}),
                )
            })
            .collect();
        serde_json::json!({
            "key": self.key,
            "label": self.label,
            "scope": self.scope.name(),
            "admin": self.admin,
            "built_in": self.built_in,
            "entities": entities,
        })
    }
}

/// The roles of an app: the built-ins, as shipped or redefined, and the app's own.
#[derive(Debug, Clone, Default)]
pub struct Roles {
    /// By key.
    pub by_key: BTreeMap<String, Arc<Role>>,
}

impl Roles {
    /// The role with `key`.
    pub fn get(&self, key: &str) -> Option<&Arc<Role>> {
        self.by_key.get(key)
    }

    /// Every key, sorted.
    pub fn keys(&self) -> Vec<&str> {
        self.by_key.keys().map(String::as_str).collect()
    }
}

fn built_in(key: &str, entities: &[Entity]) -> Role {
    let (scope, letters, label) = match key {
        "admin" => (Scope::All, "crud", "Administrator"),
        "manager" => (Scope::Team, "crud", "Manager"),
        "sales_rep" => (Scope::Own, "crud", "Sales rep"),
        _ => (Scope::All, "r", "Viewer"),
    };
    Role {
        key: key.to_owned(),
        label: label.to_owned(),
        scope,
        admin: key == "admin",
        built_in: true,
        entities: entities
            .iter()
            .map(|e| (e.key.clone(), EntityPerm::letters(letters)))
            .collect(),
    }
}

/// Check and compile the `roles` of a definition against its compiled entities. Problems carry
/// JSON paths (`/roles/1/entities/opportunity/fields/amount`).
pub fn compile(defs: &[Value], entities: &[Entity]) -> Result<Roles, Vec<Problem>> {
    let mut problems = vec![];
    let mut by_key: BTreeMap<String, Arc<Role>> = BUILT_IN
        .iter()
        .map(|k| ((*k).to_owned(), Arc::new(built_in(k, entities))))
        .collect();
    let mut defined = BTreeSet::new();
    for (i, def) in defs.iter().enumerate() {
        let rp = format!("/roles/{i}");
        if let Some(role) = compile_one(def, &rp, entities, &mut problems) {
            if !defined.insert(role.key.clone()) {
                problems.push(Problem::new(
                    format!("{rp}/key"),
                    "duplicate",
                    format!("Role `{}` is defined twice.", role.key),
                ));
            }
            by_key.insert(role.key.clone(), Arc::new(role));
        }
    }
    if problems.is_empty() {
        Ok(Roles { by_key })
    } else {
        Err(problems)
    }
}

fn compile_one(
    def: &Value,
    rp: &str,
    entities: &[Entity],
    problems: &mut Vec<Problem>,
) -> Option<Role> {
    let mut err = |path: String, code: &'static str, msg: String| {
        problems.push(Problem::new(path, code, msg));
    };
    let Some(obj) = def.as_object() else {
        err(
            rp.to_owned(),
            "wrong_type",
            "A role is an object with `key`, `scope` and `entities`.".into(),
        );
        return None;
    };
    for k in obj.keys() {
        if !["key", "label", "scope", "admin", "entities", "description"].contains(&k.as_str()) {
            err(
                format!("{rp}/{}", crate::error::pointer_segment(k)),
                "unknown_property",
                format!("A role has no property `{k}`; use key, label, description, scope, admin and entities."),
            );
        }
    }
    let key = match obj.get("key") {
        Some(Value::String(k)) => k.clone(),
        _ => {
            err(
                format!("{rp}/key"),
                "required",
                "A role needs a `key` such as `finance`.".into(),
            );
            String::new()
        }
    };
    if !key.is_empty()
        && (key.len() > 30
            || !key.starts_with(|c: char| c.is_ascii_lowercase())
            || !key
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
    {
        err(
            format!("{rp}/key"),
            "bad_key",
            format!("The role key `{key}` must start with a lower-case letter, use only a-z, 0-9 and underscores, and be at most 30 characters long."),
        );
    }
    let label = match obj.get("label") {
        None => key.clone(),
        Some(l) => match serde_json::from_value::<crate::def::Label>(l.clone()) {
            Ok(l) => l.get("en", &key).to_owned(),
            Err(_) => {
                err(
                    format!("{rp}/label"),
                    "wrong_type",
                    "A label is text or an object of texts per language.".into(),
                );
                key.clone()
            }
        },
    };
    let scope = match obj.get("scope").and_then(Value::as_str) {
        Some("own") => Scope::Own,
        Some("team") => Scope::Team,
        Some("all") => Scope::All,
        _ => {
            err(
                format!("{rp}/scope"),
                "bad_value",
                "`scope` must be `own` (the caller's records), `team` (the caller's and their reports', recursively) or `all`.".into(),
            );
            Scope::Own
        }
    };
    let admin = match obj.get("admin") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            err(
                format!("{rp}/admin"),
                "wrong_type",
                "`admin` is true or false.".into(),
            );
            false
        }
    };
    if key == "admin" && (!admin || scope != Scope::All) {
        err(
            rp.to_owned(),
            "admin_role",
            "The `admin` role must keep `admin: true` and `scope: all`; define another role for narrower access.".into(),
        );
    }
    let mut perms: BTreeMap<String, EntityPerm> = BTreeMap::new();
    let mut rest: Option<EntityPerm> = None;
    match obj.get("entities") {
        Some(Value::Object(m)) => {
            for (ek, v) in m {
                let ep = format!("{rp}/entities/{}", crate::error::pointer_segment(ek));
                let entity = entities.iter().find(|e| &e.key == ek);
                if ek != "*" && entity.is_none() {
                    err(
                        ep.clone(),
                        "unknown_entity",
                        format!(
                            "There is no entity `{ek}`; name one of {}, or `*` for all the others.",
                            entities
                                .iter()
                                .map(|e| format!("`{}`", e.key))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    );
                    continue;
                }
                let (can, fields) = match v {
                    Value::String(s) => (Some(s.as_str()), None),
                    Value::Object(o) => {
                        for k in o.keys().filter(|k| *k != "can" && *k != "fields") {
                            err(
                                format!("{ep}/{}", crate::error::pointer_segment(k)),
                                "unknown_property",
                                format!("An entity permission has `can` and `fields`, not `{k}`."),
                            );
                        }
                        let can = match o.get("can") {
                            None => Some(""),
                            Some(Value::String(s)) => Some(s.as_str()),
                            Some(_) => None,
                        };
                        (can, o.get("fields"))
                    }
                    _ => (None, None),
                };
                let Some(can) = can.filter(|s| {
                    s.chars().all(|c| "crud".contains(c))
                        && s.chars().collect::<BTreeSet<_>>().len() == s.len()
                }) else {
                    err(
                        ep.clone(),
                        "bad_value",
                        "Give the letters of what the role may do, from `crud` (create, read, update, delete), e.g. `\"cru\"`, or an object `{\"can\": \"cru\", \"fields\": {…}}`.".into(),
                    );
                    continue;
                };
                let mut p = EntityPerm::letters(can);
                if (p.create || p.update || p.delete) && !p.read {
                    err(
                        ep.clone(),
                        "needs_read",
                        format!("A role that may `{can}` must also read (`r`): writes answer the record."),
                    );
                }
                match fields {
                    None => {}
                    Some(Value::Object(fm)) => {
                        if ek == "*" {
                            err(
                                format!("{ep}/fields"),
                                "not_allowed",
                                "Field permissions belong to a named entity, not to `*`.".into(),
                            );
                        }
                        for (fk, fv) in fm {
                            let fp = format!("{ep}/fields/{}", crate::error::pointer_segment(fk));
                            let Some(field) = entity.and_then(|e| e.field(fk)) else {
                                if ek != "*" {
                                    err(
                                        fp,
                                        "unknown_field",
                                        format!("Entity `{ek}` has no field `{fk}`."),
                                    );
                                }
                                continue;
                            };
                            let hidden = match fv.as_str() {
                                Some("hidden") => true,
                                Some("read_only") => false,
                                _ => {
                                    err(
                                        fp,
                                        "bad_value",
                                        "A field permission is `hidden` or `read_only`.".into(),
                                    );
                                    continue;
                                }
                            };
                            let computed = field.formula.is_some();
                            if p.create
                                && field.def.required
                                && field.def.default.is_none()
                                && !computed
                            {
                                err(
                                    fp.clone(),
                                    "required_field",
                                    format!("The role may create `{ek}` records, but `{fk}` is required and the role could not set it; give the field a default or drop `c`."),
                                );
                            }
                            if hidden {
                                p.hidden.insert(fk.clone());
                            } else {
                                p.read_only.insert(fk.clone());
                            }
                        }
                    }
                    Some(_) => err(
                        format!("{ep}/fields"),
                        "wrong_type",
                        "`fields` maps field keys to `hidden` or `read_only`.".into(),
                    ),
                }
                // A formula over a hidden field would show what it hides.
                if let Some(entity) = entity {
                    for f in entity.fields.iter().filter(|f| !p.hidden.contains(&f.key)) {
                        let Some(src) = f.def.formula.as_deref() else {
                            continue;
                        };
                        for h in &p.hidden {
                            let uses = src.match_indices(h.as_str()).any(|(i, _)| {
                                let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
                                !src[..i].ends_with(word) && !src[i + h.len()..].starts_with(word)
                            });
                            if uses {
                                err(
                                    format!("{ep}/fields/{}", crate::error::pointer_segment(&f.key)),
                                    "formula_reveals",
                                    format!("The formula `{}` is computed from the hidden field `{h}`; hide `{}` too.", f.key, f.key),
                                );
                            }
                        }
                    }
                }
                if ek == "*" {
                    rest = Some(p);
                } else {
                    perms.insert(ek.clone(), p);
                }
            }
        }
        _ => err(
            format!("{rp}/entities"),
            "required",
            "A role needs `entities`: what it may do per entity, e.g. {\"*\": \"r\"}.".into(),
        ),
    }
    for e in entities {
        if !perms.contains_key(&e.key) {
            perms.insert(e.key.clone(), rest.clone().unwrap_or_default());
        }
    }
    Some(Role {
        key,
        label,
        scope,
        admin,
        built_in: false,
        entities: perms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn app(roles: Value) -> crate::Result<crate::model::App> {
        let def = json!({"key": "shop", "entities": [
            {"key": "order", "fields": [{"key": "title", "type": "text", "required": true},
                                        {"key": "total", "type": "money"}]},
            {"key": "note", "fields": [{"key": "text", "type": "text"}]}],
            "roles": roles});
        crate::compile::compile(crate::compile::parse(&def)?, 1)
    }

    #[test]
    fn built_ins_exist_in_every_app_and_may_be_redefined() {
        let a = app(json!([])).unwrap();
        assert_eq!(a.roles.keys(), ["admin", "manager", "sales_rep", "viewer"]);
        let viewer = a.roles.get("viewer").unwrap();
        assert_eq!(
            (viewer.scope, viewer.entity("order").can()),
            (Scope::All, "r".into())
        );
        assert!(!viewer.writes_anything() && viewer.built_in);
        let rep = a.roles.get("sales_rep").unwrap();
        assert_eq!(
            (rep.scope, rep.entity("note").can()),
            (Scope::Own, "crud".into())
        );

        let a = app(json!([{"key": "sales_rep", "scope": "team", "entities": {"order": "cru"}}]))
            .unwrap();
        let rep = a.roles.get("sales_rep").unwrap();
        assert_eq!((rep.scope, rep.built_in), (Scope::Team, false));
        assert_eq!(rep.entity("order").can(), "cru");
        assert_eq!(
            rep.entity("note"),
            &EntityPerm::default(),
            "not named, no `*`: nothing"
        );
    }

    #[test]
    fn star_covers_the_entities_not_named_and_fields_are_per_entity() {
        let a = app(json!([{"key": "clerk", "scope": "own", "entities": {
            "*": "r", "order": {"can": "ru", "fields": {"total": "hidden", "title": "read_only"}}}}]))
        .unwrap();
        let clerk = a.roles.get("clerk").unwrap();
        assert_eq!(clerk.entity("note").can(), "r");
        let order = clerk.entity("order");
        assert_eq!(order.can(), "ru");
        assert!(!order.writes("total") && !order.writes("title") && order.writes("other"));
        assert!(!clerk.hides_nothing());
        assert_eq!(
            clerk.to_json()["entities"]["order"],
            json!({"can": "ru", "fields": {"total": "hidden", "title": "read_only"}})
        );
    }

    #[test]
    fn a_formula_over_a_hidden_field_must_be_hidden_too() {
        let def = json!({"key": "shop", "entities": [{"key": "order", "fields": [
            {"key": "total", "type": "money"},
            {"key": "total_tax", "type": "money"},
            {"key": "tax", "type": "formula", "formula": "total * 0.13"},
            {"key": "tax2", "type": "formula", "formula": "total_tax * 1"}]}],
            "roles": [{"key": "clerk", "scope": "own", "entities": {"order": {"can": "r", "fields": {"total": "hidden"}}}}]});
        let Err(crate::FormError::Definition(ps)) =
            crate::compile::compile(crate::compile::parse(&def).unwrap(), 1)
        else {
            panic!("accepted")
        };
        assert_eq!(
            ps.iter()
                .map(|p| (p.path.as_str(), p.code))
                .collect::<Vec<_>>(),
            [("/roles/0/entities/order/fields/tax", "formula_reveals")],
            "`total_tax` is another field"
        );
    }

    #[test]
    fn formulas_cannot_eval_a_field_name_together() {
        let def = json!({"key": "shop", "entities": [{"key": "order", "fields": [
            {"key": "total", "type": "money"},
            {"key": "tax", "type": "formula", "formula": "eval(\"tot\" + \"al\") * 0.13"}]}]});
        let Err(crate::FormError::Definition(ps)) =
            crate::compile::compile(crate::compile::parse(&def).unwrap(), 1)
        else {
            panic!("accepted")
        };
        assert_eq!(ps[0].path, "/entities/0/fields/1/formula", "{ps:?}");
    }

    #[test]
    fn within_compares_scope_admin_letters_and_fields() {
        let a = app(json!([
            {"key": "office", "scope": "own", "admin": true, "entities": {"*": "r"}},
            {"key": "reader", "scope": "own", "entities": {"order": {"can": "r", "fields": {"total": "hidden"}}}},
            {"key": "peeker", "scope": "own", "entities": {"order": "r"}}]))
        .unwrap();
        let r = |k: &str| a.roles.get(k).unwrap().clone();
        assert!(r("reader").within(&r("office")) && r("peeker").within(&r("office")));
        assert!(!r("office").within(&r("reader")), "admin flag");
        assert!(!r("viewer").within(&r("office")), "wider scope");
        assert!(!r("sales_rep").within(&r("office")), "more letters");
        assert!(
            r("reader").within(&r("peeker")) && !r("peeker").within(&r("reader")),
            "fewer hidden fields"
        );
        assert!(r("manager").within(&r("admin")) && r("office").within(&r("admin")));
    }

    #[test]
    fn a_role_that_creates_must_be_able_to_set_required_fields() {
        let Err(crate::FormError::Definition(ps)) = app(json!([{"key": "clerk", "scope": "own",
            "entities": {"order": {"can": "cr", "fields": {"title": "read_only"}}}}]))
        else {
            panic!("accepted")
        };
        assert_eq!(
            ps.iter()
                .map(|p| (p.path.as_str(), p.code))
                .collect::<Vec<_>>(),
            [("/roles/0/entities/order/fields/title", "required_field")]
        );
    }
}
