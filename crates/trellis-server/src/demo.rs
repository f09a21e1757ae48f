//! The sample sales organisation of `trellis serve --demo`: a director, three regional teams
//! with their managers and reps, a solutions team and legal, and a few months of CRM records
//! (accounts, leads, opportunities across every stage with their stage history), so that every
//! screen and automation has something to show on a fresh install.
//!
//! Everything here is marked as sample data: user emails end in `@sample.trellis.invalid`,
//! names carry "(sample)", and records say so in their notes. It is generated deterministically.

use chrono::{DateTime, Duration, Utc};
use serde_json::{json, Value as Json};
use trellis_form::db::Db;
use trellis_form::model::App;
use trellis_form::store::{self, WriteCtx};
use trellis_form::users::{self, TeamInput, UserInput};
use uuid::Uuid;

/// Domain of every sample user's email.
pub const SAMPLE_DOMAIN: &str = "sample.trellis.invalid";

/// What was created.
#[derive(Debug, Default, serde::Serialize)]
pub struct Summary {
    /// Users.
    pub users: usize,
    /// Teams.
    pub teams: usize,
    /// Records per entity.
    pub records: Vec<(String, usize)>,
}

struct Person {
    name: &'static str,
    email: &'static str,
}

const DIRECTOR: Person = Person {
    name: "Zhou Min (sample)",
    email: "zhou.min",
};
const REGIONS: [(&str, &str, Person, [Person; 2]); 3] = [
    (
        "north",
        "North sales (sample)",
        Person {
            name: "Sun Lei (sample)",
            email: "sun.lei",
        },
        [
            Person {
                name: "Ma Jun (sample)",
                email: "ma.jun",
            },
            Person {
                name: "He Yan (sample)",
                email: "he.yan",
            },
        ],
    ),
    (
        "east",
        "East sales (sample)",
        Person {
            name: "Wu Hua (sample)",
            email: "wu.hua",
        },
        [
            Person {
                name: "Lin Tao (sample)",
                email: "lin.tao",
            },
            Person {
                name: "Xu Ying (sample)",
                email: "xu.ying",
            },
        ],
    ),
    (
        "south",
        "South sales (sample)",
        Person {
            name: "Zheng Jie (sample)",
            email: "zheng.jie",
        },
        [
            Person {
                name: "Guo Fei (sample)",
                email: "guo.fei",
            },
            Person {
                name: "Luo Na (sample)",
                email: "luo.na",
            },
        ],
    ),
];

fn email(local: &str) -> String {
    format!("{local}@{SAMPLE_DOMAIN}")
}

/// Whether the sample organisation is already there.
pub async fn installed(db: &Db) -> trellis_form::Result<bool> {
    Ok(users::by_email(db, &email(DIRECTOR.email)).await?.is_some())
}

/// A small deterministic generator (an LCG), so the sample data is the same on every install.
struct Gen(u64);

impl Gen {
    fn next(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) % n as u64) as usize
    }
}

/// Create the sample organisation and records in `app` (the CRM). Does nothing if present.
pub async fn install(
    db: &Db,
    app: &App,
    admin: Uuid,
    now: DateTime<Utc>,
) -> anyhow::Result<Summary> {
    let mut summary = Summary::default();
    if installed(db).await? {
        return Ok(summary);
    }
    let mut tx = db.begin().await?;
    let user = |name: &str, mail: &str, manager: Option<Uuid>| UserInput {
        name: Some(name.to_owned()),
        email: Some(email(mail)),
        manager_id: Some(manager),
        ..Default::default()
    };
    let director = users::create(&mut tx, &user(DIRECTOR.name, DIRECTOR.email, None), now)
        .await?
        .id;
    summary.users += 1;
    // Roles in the CRM: the director and regional managers manage (their subtrees), reps sell,
    // solutions and legal read.
    let mut roles: Vec<(Uuid, &str)> = vec![(director, "manager")];
    let mut reps: Vec<(&str, Uuid)> = vec![];
    for (region, team, manager, members) in &REGIONS {
        let m = users::create(
            &mut tx,
            &user(manager.name, manager.email, Some(director)),
            now,
        )
        .await?
        .id;
        let mut ids = vec![];
        for p in members {
            let id = users::create(&mut tx, &user(p.name, p.email, Some(m)), now)
                .await?
                .id;
            reps.push((region, id));
            ids.push(id);
            roles.push((id, "sales_rep"));
        }
        summary.users += 1 + members.len();
        roles.push((m, "manager"));
        let input = TeamInput {
            key: Some(format!("{region}_sales")),
            name: Some((*team).to_owned()),
            lead_id: Some(Some(m)),
            members: Some(ids),
        };
        users::upsert_team(&mut tx, &input, now).await?;
        summary.teams += 1;
    }
    for (key, team, lead, member) in [
        (
            "solutions",
            "Solutions (sample)",
            ("Qian Bo (sample)", "qian.bo"),
            ("Shen Yu (sample)", "shen.yu"),
        ),
        (
            "legal",
            "Legal (sample)",
            ("Han Xue (sample)", "han.xue"),
            ("Cao Lin (sample)", "cao.lin"),
        ),
    ] {
        let l = users::create(&mut tx, &user(lead.0, lead.1, Some(director)), now)
            .await?
            .id;
        let m = users::create(&mut tx, &user(member.0, member.1, Some(l)), now)
            .await?
            .id;
        summary.users += 2;
        roles.push((l, "viewer"));
        roles.push((m, "viewer"));
        let input = TeamInput {
            key: Some(key.into()),
            name: Some(team.into()),
            lead_id: Some(Some(l)),
            members: Some(vec![l, m]),
        };
        users::upsert_team(&mut tx, &input, now).await?;
        summary.teams += 1;
    }
    // Every rep: the round-robin fallback of lead assignment (leads no region rule catches).
    let input = TeamInput {
        key: Some("inside_sales".into()),
        name: Some("Inside sales (sample)".into()),
        lead_id: Some(Some(director)),
        members: Some(reps.iter().map(|(_, id)| *id).collect()),
    };
    users::upsert_team(&mut tx, &input, now).await?;
    summary.teams += 1;

    for (user, role) in roles {
        let mut sql = trellis_form::db::Sql::new(
            "INSERT INTO \"app_members\" (\"app\", \"user_id\", \"role\") VALUES (",
        );
        sql.bind(trellis_form::db::Value::Text(app.key.clone()))
            .push(", ");
        sql.bind(trellis_form::db::Value::Uuid(user)).push(", ");
        sql.bind(trellis_form::db::Value::Text(role.to_owned()))
            .push(")");
        tx.execute(&sql).await?;
    }

    // Users, teams and records go in one transaction: a failed install leaves nothing behind.
    let ctx = WriteCtx {
        actor: Some(admin),
        now,
        default_owner: Some(admin),
        import: true,
        depth: 0,
    };
    let mut g = Gen(20261127);
    let industries = [
        "manufacturing",
        "retail",
        "finance",
        "technology",
        "healthcare",
        "education",
    ];
    let sizes = ["lt50", "50_200", "200_1000", "gt1000"];
    let sources = ["online_ad", "trade_show", "website", "partner"];
    let products = ["crm_suite", "analytics", "integration", "services"];
    let companies = [
        "Hangzhou Robotics",
        "Yangtze Textiles",
        "Pearl River Foods",
        "Northern Steel",
        "Lotus Clinics",
        "Bamboo Education",
        "Jade Finance",
        "Silk Road Logistics",
        "Summit Software",
        "Golden Grain",
        "Harbor Retail",
        "Crane Pharma",
    ];

    // Accounts.
    let accounts: Vec<Json> = companies
        .iter()
        .enumerate()
        .map(|(i, c)| {
            json!({
                "name": format!("{c} (sample)"),
                "industry": industries[i % industries.len()],
                "company_size": sizes[g.next(sizes.len())],
                "region": REGIONS[i % 3].0,
                "owner": reps[i % reps.len()].1.to_string(),
                "created_at": (now - Duration::days(200 - i as i64)).to_rfc3339(),
            })
        })
        .collect();
    let account_ids =
        store::create_batch(&mut tx, app, app.entity("account")?, &accounts, &ctx).await?;
    summary.records.push(("account".into(), account_ids.len()));

    // Leads: the newest few still new, older ones worked.
    let statuses = ["new", "contacted", "qualified", "disqualified"];
    let leads: Vec<Json> = (0..30)
        .map(|i| {
            let (region, owner) = reps[g.next(reps.len())];
            json!({
                "name": format!("Lead {} (sample)", i + 1),
                "company": companies[g.next(companies.len())],
                "source": sources[g.next(sources.len())],
                "region": region,
                "product_interest": products[g.next(products.len())],
                "status": if i >= 24 { "new" } else { statuses[g.next(statuses.len())] },
                "owner": owner.to_string(),
                "notes": "Sample data: generated by trellis serve --demo.",
                "created_at": (now - Duration::days(120 - 4 * i as i64)).to_rfc3339(),
            })
        })
        .collect();
    let lead_ids = store::create_batch(&mut tx, app, app.entity("lead")?, &leads, &ctx).await?;
    summary.records.push(("lead".into(), lead_ids.len()));

    // Opportunities through the pipeline, with the stage history that got them there.
    let path = ["mql", "sql", "proposal", "quoted", "negotiation"];
    let losses = ["price", "competitor", "no_budget", "timing"];
    let wins = ["product_fit", "relationship", "service", "price"];
    let mut opps = vec![];
    for i in 0..24usize {
        let a = g.next(account_ids.len());
        let (region, owner) = reps[g.next(reps.len())];
        let created = now - Duration::days(150 - 5 * i as i64);
        let amount = 20_000 + 5_000 * g.next(40);
        // How far it went: open at some stage, or closed won/lost.
        let outcome = g.next(10);
        let reached = 1 + g.next(path.len());
        let mut history = vec![];
        for (k, s) in path.iter().take(reached).enumerate() {
            history.push(
                json!({"stage": s, "at": (created + Duration::days(6 * k as i64)).to_rfc3339()}),
            );
        }
        let closed_at = created + Duration::days(6 * reached as i64);
        let mut rec = json!({
            "name": format!("{} – {} (sample)", companies[a], products[i % products.len()]),
            "account": account_ids[a].to_string(),
            "lead": lead_ids[i % lead_ids.len()].to_string(),
            "source": sources[g.next(sources.len())],
            "company_size": sizes[g.next(sizes.len())],
            "decision_role": "decision_maker",
            "product_line": products[i % products.len()],
            "industry": industries[a % industries.len()],
            "region": region,
            "amount": format!("{amount}.00"),
            "budget": format!("{}.00", amount + 10_000),
            "expected_close_date": (created + Duration::days(90)).date_naive().to_string(),
            "needs_summary": "Sample data: wants one place for leads, pipeline and forecasts.",
            "owner": owner.to_string(),
            "created_at": created.to_rfc3339(),
        });
        if reached >= 4 {
            rec["quoted_amount"] = json!(format!("{}.00", amount - 2_000));
        }
        if closed_at < now && outcome < 3 && reached >= 3 {
            rec["quoted_amount"] = json!(format!("{}.00", amount - 2_000));
            history.push(json!({"stage": "won", "at": closed_at.to_rfc3339()}));
            rec["win_factors"] = json!([wins[g.next(wins.len())]]);
        } else if closed_at < now && outcome < 5 {
            history.push(json!({"stage": "lost", "at": closed_at.to_rfc3339()}));
            rec["loss_reason"] = json!(losses[g.next(losses.len())]);
        }
        rec["stage_history"] = Json::Array(history);
        opps.push(rec);
    }
    let opp_ids =
        store::create_batch(&mut tx, app, app.entity("opportunity")?, &opps, &ctx).await?;
    summary.records.push(("opportunity".into(), opp_ids.len()));
    tx.commit().await?;
    Ok(summary)
}
