//! `spoke demo`: the shop end to end, narrated, every claim checked.
//!
//! [`run`] starts a [`Shop`] in a temporary directory and walks through
//! eight steps. Each step prints what it does and what it measured, and
//! checks its claims; a step *held* when every check passed. The run ends
//! with a summary table, and [`DemoReport::all_held`] is what `spoke demo`
//! turns into its exit code.
//!
//! 1. Create customers through Customer Service; measure commit → copy lag.
//! 2. Place an order: customer from the copy, prices snapshotted from Catalog.
//! 3. Rename a customer (the copy catches up, orders show the new name);
//!    change a price (existing orders keep theirs).
//! 4. Stop Customer Service and the hub: orders go on from the copy while
//!    its staleness grows, within budget.
//! 5. Stop Inventory: orders are refused (stock must be current); restart it.
//! 6. Restart Customer Service, change a customer while the hub is still
//!    down (the change waits in the outbox), restart the hub: delivered.
//! 7. Write to the copy from Order Service's own connection: refused.
//! 8. Corrupt the copy behind the agent's back, as a restored backup and a
//!    stray script would (a row lost, a row rolled back, a foreign row);
//!    reconciliation finds exactly those three by digest and repairs them.
//! 9. Read product categories, reference data Order Service keeps no copy
//!    of, through its `ttl` cache in front of Catalog: a miss goes to
//!    Catalog, the next read is a hit, twenty concurrent misses make one
//!    Catalog call (Catalog counts them), and past the ttl (the cache's
//!    clock moved by hand, not waited for) Catalog is asked again.
//!
//! [`run_distributed`] tells the same story on the distributed backends
//! (PostgreSQL copies and orders, a NATS JetStream feed, no hub), with the
//! steps that depend on the backends adapted:
//!
//! 2. also prints the one SQL query that JOINs Order Service's orders with
//!    the copy in PostgreSQL;
//! 4. stops Customer Service and its relay: JetStream stays up, so the copy
//!    stays fresh (and says so); then stops the agent too, so staleness grows;
//!    then restarts the agent, which resumes from its stored position;
//! 6. restarts Customer Service with its relay still stopped: a change waits
//!    in the outbox, then arrives when the relay starts;
//! 7. writes to the copy as Order Service's role (PostgreSQL: "permission
//!    denied") and as a privileged session without the agent's mark (the
//!    copy's trigger, naming dataset and owner);
//!
//! and adds one:
//!
//! 8. changes a price through Catalog, whose products live in PostgreSQL:
//!    the CDC source carries the commit from the WAL through JetStream to
//!    the storefront's copy (measured commit → copy lag; the copy holds name
//!    and category, never the must-be-current price), while an order placed
//!    earlier keeps its snapshotted price and a new order pays the new one.
//!
//! (The embedded story's steps 8 and 9 are told once, on the embedded
//! default; reconciliation and the ttl cache work the same against
//! JetStream.)

pub mod shop;

use std::fmt::Display;
use std::io::Write;
use std::time::{Duration, Instant};

use serde::Serialize;

pub use self::shop::{Backends, Distributed, Part, Shop, STOREFRONT};
use crate::catalog;
use crate::customer::{self, Customer};
use crate::order::OrderView;
use crate::web::CallError;

/// Longest a step may take before it counts as failed.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a change may take to reach the copy while everything is up.
const CATCH_UP: Duration = Duration::from_secs(5);
/// Orders placed while the owner side is down (step 4).
const OUTAGE_ORDERS: usize = 5;
/// Spacing of the orders placed during the outage.
const ORDER_EVERY: Duration = Duration::from_millis(500);
/// Orders placed while the owner is down but the feed is up (distributed step 4).
const FEED_UP_ORDERS: usize = 2;
/// Most staleness a copy shows while its agent follows an idle feed: one
/// long-poll (1 s) plus slack.
const FOLLOWING_STALENESS_MS: u64 = 2_500;

/// The message the copy's guard gives a write from another connection.
pub const READ_ONLY_MESSAGE: &str =
    "customers is a read-only copy of dataset customers owned by customer-service";

/// One step's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StepReport {
    pub number: usize,
    pub title: String,
    /// Every check of the step passed (and there was at least one).
    pub held: bool,
    /// One line of what the step measured.
    pub measured: String,
    /// The checks that failed, or the error that stopped the step.
    pub failures: Vec<String>,
}

/// What a demo run showed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DemoReport {
    pub steps: Vec<StepReport>,
    pub elapsed_ms: u64,
}

impl DemoReport {
    /// Whether every step ran and held.
    pub fn all_held(&self) -> bool {
        !self.steps.is_empty() && self.steps.iter().all(|s| s.held)
    }
}

/// A step in progress: narrates to `out` and collects checks.
struct Step<'o> {
    out: &'o mut (dyn Write + Send),
    number: usize,
    title: &'static str,
    checks: usize,
    failures: Vec<String>,
    measured: Vec<String>,
}

impl<'o> Step<'o> {
    fn begin(
        out: &'o mut (dyn Write + Send),
        number: usize,
        title: &'static str,
    ) -> std::io::Result<Self> {
        writeln!(out)?;
        writeln!(out, "Step {number}. {title}")?;
        Ok(Step {
            out,
            number,
            title,
            checks: 0,
            failures: Vec::new(),
            measured: Vec::new(),
        })
    }

    fn say(&mut self, line: impl Display) -> std::io::Result<()> {
        writeln!(self.out, "   {line}")
    }

    /// Records and prints one claim.
    fn check(&mut self, held: bool, claim: impl Into<String>) -> std::io::Result<()> {
        let claim = claim.into();
        self.checks += 1;
        writeln!(self.out, "   {} {claim}", if held { "✓" } else { "✗" })?;
        if !held {
            self.failures.push(claim);
        }
        Ok(())
    }

    fn measured(&mut self, m: impl Into<String>) {
        self.measured.push(m.into());
    }

    fn finish(
        mut self,
        result: Result<anyhow::Result<()>, tokio::time::error::Elapsed>,
    ) -> std::io::Result<StepReport> {
        let error = match result {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("{e:#}")),
            Err(_) => Some(format!("the step did not finish within {STEP_TIMEOUT:?}")),
        };
        if let Some(e) = error {
            writeln!(self.out, "   ✗ {e}")?;
            self.failures.push(e);
        }
        let held = self.failures.is_empty() && self.checks > 0;
        writeln!(self.out, "   → {}", if held { "held" } else { "FAILED" })?;
        Ok(StepReport {
            number: self.number,
            title: self.title.to_owned(),
            held,
            measured: self.measured.join("; "),
            failures: self.failures,
        })
    }
}

/// What later steps need from earlier ones.
#[derive(Default)]
struct Ctx {
    first_order: Option<OrderView>,
}

fn demo_customers() -> Vec<Customer> {
    let c = |id: &str, name: &str, email: &str, preferred: Option<&str>, pm: &str| Customer {
        id: id.into(),
        name: name.into(),
        email: email.into(),
        preferred_name: preferred.map(Into::into),
        payment_method_id: pm.into(),
    };
    vec![
        c(
            "c-ada",
            "Ada Lovelace",
            "ada@example.com",
            None,
            "pm_visa_4242",
        ),
        c(
            "c-grace",
            "Grace Hopper",
            "grace@example.com",
            Some("Amazing Grace"),
            "pm_mc_5454",
        ),
        c(
            "c-alan",
            "Alan Turing",
            "alan@example.com",
            None,
            "pm_amex_0005",
        ),
    ]
}

fn dollars(cents: i64) -> String {
    format!("${}.{:02}", cents / 100, (cents % 100).abs())
}

fn secs(ms: Option<u64>) -> String {
    ms.map_or_else(
        || "never fresh".into(),
        |ms| format!("{:.1} s", ms as f64 / 1000.0),
    )
}

fn customer_name(o: &OrderView) -> &str {
    o.customer
        .as_ref()
        .map_or("(not in the copy)", |c| c.name.as_str())
}

/// Runs the demo on a new shop in a temporary directory, narrating to `out`.
pub async fn run(out: &mut (dyn Write + Send)) -> anyhow::Result<DemoReport> {
    let started = Instant::now();
    writeln!(
        out,
        "Spoke demo: the shop, on the embedded default (SQLite files, real HTTP on loopback)"
    )?;
    let shop = Shop::start().await?;
    writeln!(out, "   data in {}", shop.dir().display())?;
    for part in Part::ALL {
        writeln!(out, "   {:<22} {}", part.name(), shop.url(part))?;
    }
    writeln!(
        out,
        "   Order Service copies customers (name, email; events; budget 1h) into {}",
        shop.order_db().display()
    )?;
    run_steps(out, shop, started).await
}

/// Runs the demo on the distributed backends: Order Service's orders and its
/// copy of customers in PostgreSQL, the feed in NATS JetStream, no hub.
/// Every schema, role and stream it creates has a name unique to the run and
/// is removed at the end.
pub async fn run_distributed(
    out: &mut (dyn Write + Send),
    backends: Backends,
) -> anyhow::Result<DemoReport> {
    let started = Instant::now();
    writeln!(
        out,
        "Spoke demo: the shop, distributed (PostgreSQL copies and orders, NATS JetStream feed, no hub; real HTTP on loopback)"
    )?;
    let shop = Shop::start_distributed(backends).await?;
    let d = shop
        .distributed()
        .ok_or_else(|| anyhow::anyhow!("the distributed shop has no backends"))?
        .clone();
    let js = d.jetstream();
    writeln!(out, "   PostgreSQL {}", redact(&d.backends.postgres))?;
    writeln!(
        out,
        "   JetStream  {}: streams {} and {} (owners publish straight to JetStream)",
        d.backends.nats,
        js.log_stream(customer::DATASET),
        js.state_stream(customer::DATASET)
    )?;
    writeln!(
        out,
        "   data in {} (the other services' own SQLite files)",
        shop.dir().display()
    )?;
    for &part in shop.parts() {
        let at = match part {
            Part::Relay => format!(
                "customer.db outbox → JetStream {}",
                js.log_subjects(customer::DATASET)
            ),
            Part::Cdc => format!(
                "WAL of {}.{} (slot {}) → JetStream {}",
                d.catalog_schema,
                catalog::TABLE,
                d.cdc_slot,
                js.log_subjects(catalog::DATASET)
            ),
            _ => shop.url(part),
        };
        writeln!(out, "   {:<24} {at}", part.name())?;
    }
    writeln!(
        out,
        "   Order Service (role {}) keeps its orders in schema {}; the agent copies customers",
        d.app_role, d.orders_schema
    )?;
    writeln!(
        out,
        "   (name, email; events; budget 1h) into schema {} of the same database, SELECT only for that role",
        d.copies_schema
    )?;
    writeln!(
        out,
        "   Catalog keeps products in PostgreSQL {} (schema {}, wal_level=logical) and publishes nothing;",
        redact(&d.catalog_postgres),
        d.catalog_schema
    )?;
    writeln!(
        out,
        "   the CDC source captures them, and the storefront's agent copies them (name, category; cdc; budget 1m) into schema {}",
        d.storefront_schema
    )?;
    run_steps(out, shop, started).await
}

/// A connection string without its password, for printing.
fn redact(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        if let Some((creds, host)) = rest.split_once('@') {
            let user = creds.split(':').next().unwrap_or_default();
            return format!("{scheme}://{user}@{host}");
        }
        return url.to_owned();
    }
    url.split_whitespace()
        .filter(|kv| !kv.starts_with("password="))
        .collect::<Vec<_>>()
        .join(" ")
}

async fn run_steps(
    out: &mut (dyn Write + Send),
    mut shop: Shop,
    started: Instant,
) -> anyhow::Result<DemoReport> {
    let distributed = shop.distributed().is_some();
    let mut ctx = Ctx::default();
    let mut steps = Vec::new();
    macro_rules! step {
        ($n:expr, $title:expr, $f:ident) => {{
            let mut st = Step::begin(out, $n, $title)?;
            let result = tokio::time::timeout(STEP_TIMEOUT, $f(&mut shop, &mut ctx, &mut st)).await;
            steps.push(st.finish(result)?);
        }};
    }
    step!(
        1,
        "Create customers through Customer Service; they reach Order Service's copy",
        create_customers
    );
    step!(
        2,
        "Place an order: customer from the copy, name and price snapshotted from Catalog",
        place_order
    );
    step!(
        3,
        "Rename a customer and change a price",
        rename_and_reprice
    );
    if distributed {
        step!(
            4,
            "Stop Customer Service and its relay, then the agent: orders go on from the copy",
            owner_down_distributed
        );
    } else {
        step!(
            4,
            "Stop Customer Service and the hub: orders go on from the copy",
            owner_down
        );
    }
    step!(
        5,
        "Stop Inventory: orders are refused, not taken on stale stock",
        inventory_down
    );
    if distributed {
        step!(
            6,
            "Change a customer while the relay is stopped: delayed in the outbox, never lost",
            relay_down_distributed
        );
        step!(
            7,
            "Write to the PostgreSQL copy: as Order Service's role, then as a privileged session",
            write_refused_distributed
        );
        step!(
            8,
            "Change a price in Catalog's PostgreSQL: CDC carries it to the storefront; orders keep their price",
            catalog_cdc
        );
    } else {
        step!(
            6,
            "Bring the owner side back: a change made meanwhile is delayed, never lost",
            owner_back
        );
        step!(
            7,
            "Write to the copy from Order Service's own connection",
            write_refused
        );
        step!(
            8,
            "Corrupt the copy behind the agent's back; reconciliation repairs exactly that",
            corrupt_and_reconcile
        );
        step!(
            9,
            "Read a category through the ttl cache: a hit, one Catalog call for many misses, expiry",
            ttl_categories
        );
    }

    let stopped = shop.shutdown().await;
    let report = DemoReport {
        steps,
        elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    };
    summary(out, &report)?;
    if let Err(e) = stopped {
        writeln!(out, "(stopping the shop: {e:#})")?;
    }
    Ok(report)
}

fn summary(out: &mut (dyn Write + Send), report: &DemoReport) -> std::io::Result<()> {
    writeln!(out)?;
    writeln!(out, "Summary")?;
    writeln!(out, "   {:<4} {:<7} measured", "step", "result")?;
    for s in &report.steps {
        writeln!(
            out,
            "   {:<4} {:<7} {}",
            s.number,
            if s.held { "held" } else { "FAILED" },
            s.measured
        )?;
        for f in &s.failures {
            writeln!(out, "   {:<4} {:<7} ✗ {f}", "", "")?;
        }
    }
    let held = report.steps.iter().filter(|s| s.held).count();
    writeln!(
        out,
        "{held} of {} steps held in {:.1} s.",
        report.steps.len(),
        report.elapsed_ms as f64 / 1000.0
    )
}

async fn create_customers(shop: &mut Shop, _: &mut Ctx, st: &mut Step<'_>) -> anyhow::Result<()> {
    st.say(if shop.distributed().is_some() {
        "POST /customers → one transaction (row + outbox) → relay → JetStream → agent → PostgreSQL copy"
    } else {
        "POST /customers → one transaction (row + outbox) → relay → hub → agent → copy"
    })?;
    let mut lags = Vec::new();
    for c in demo_customers() {
        let written = shop.create_customer(&c).await?;
        let (read, seen_at) = shop
            .wait_for_copy(&c.id, CATCH_UP, |r| r.version >= written.version)
            .await?;
        let lag = seen_at.saturating_sub(written.committed_at_ms);
        lags.push(lag);
        st.say(format!(
            "{:<8} {:<14} committed as version {}; in the copy {lag} ms later",
            c.id, c.name, written.version
        ))?;
        let same = read.fields.get("name").and_then(|v| v.as_str()) == Some(c.name.as_str())
            && read.fields.get("email").and_then(|v| v.as_str()) == Some(c.email.as_str());
        st.check(
            same,
            format!("the copy holds {}'s name and email as committed", c.id),
        )?;
        let mut keys: Vec<&str> = read.fields.keys().map(String::as_str).collect();
        keys.sort_unstable();
        st.check(
            keys == ["email", "name"],
            format!("only the projected fields are copied ({keys:?}; payment_method_id stays with its owner)"),
        )?;
    }
    let max = lags.iter().copied().max().unwrap_or(0);
    st.measured(format!(
        "commit → copy lag {} ms (max {max})",
        lags.iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    ));
    Ok(())
}

fn print_order(st: &mut Step<'_>, o: &OrderView) -> std::io::Result<()> {
    st.say(format!(
        "order #{} for {} ({}), total {}, charge {}",
        o.id,
        customer_name(o),
        o.customer_id,
        dollars(o.total_cents),
        o.charge_id
    ))?;
    for l in &o.lines {
        st.say(format!(
            "   line {}: {} {:<20} {} × {} = {}",
            l.line_no,
            l.sku,
            l.product_name,
            l.qty,
            dollars(l.unit_price_cents),
            dollars(l.line_total_cents)
        ))?;
    }
    Ok(())
}

async fn place_order(shop: &mut Shop, ctx: &mut Ctx, st: &mut Step<'_>) -> anyhow::Result<()> {
    let keyboard = shop.product("kb-01").await?;
    let mouse = shop.product("ms-01").await?;
    st.say(format!(
        "Catalog now: kb-01 {}, ms-01 {}",
        dollars(keyboard.unit_price_cents),
        dollars(mouse.unit_price_cents)
    ))?;
    let stock_before = shop.stock("kb-01").await?.available;
    let order = shop
        .place_order("c-ada", &[("kb-01", 1), ("ms-01", 2)])
        .await?;
    print_order(st, &order)?;
    let prices: Vec<(String, i64)> = order
        .lines
        .iter()
        .map(|l| (l.sku.clone(), l.unit_price_cents))
        .collect();
    st.check(
        prices
            == vec![
                ("kb-01".to_owned(), keyboard.unit_price_cents),
                ("ms-01".to_owned(), mouse.unit_price_cents),
            ],
        "each line snapshotted Catalog's current name and price",
    )?;
    st.check(
        order.total_cents == keyboard.unit_price_cents + 2 * mouse.unit_price_cents,
        "the total is the sum of the lines",
    )?;
    let stored = shop.order(order.id).await?;
    if let Some(d) = shop.distributed() {
        st.say(format!(
            "GET /orders/{} is this one query, on Order Service's own connection (role {}):",
            order.id, d.app_role
        ))?;
        for line in shop.orders()?.order_sql().trim().lines() {
            st.say(format!("   {line}"))?;
        }
    }
    st.check(
        customer_name(&stored) == "Ada Lovelace",
        format!(
            "GET /orders/{} JOINs the copy in one SQL query: customer {} (copy staleness {} ms, within budget: {})",
            order.id,
            customer_name(&stored),
            stored.customer_copy.staleness_ms.unwrap_or(0),
            stored.customer_copy.within_budget
        ),
    )?;
    let stock_after = shop.stock("kb-01").await?.available;
    st.check(
        stock_after == stock_before - 1,
        format!(
            "Inventory reserved the keyboard synchronously (stock {stock_before} → {stock_after})"
        ),
    )?;
    st.measured(format!(
        "order #{}: {} lines, total {}, prices snapshotted",
        order.id,
        order.lines.len(),
        dollars(order.total_cents)
    ));
    ctx.first_order = Some(order);
    Ok(())
}

async fn rename_and_reprice(
    shop: &mut Shop,
    ctx: &mut Ctx,
    st: &mut Step<'_>,
) -> anyhow::Result<()> {
    let first = ctx
        .first_order
        .clone()
        .ok_or_else(|| anyhow::anyhow!("step 2 placed no order"))?;
    let mut ada = shop.customer("c-ada").await?;
    ada.name = "Ada King".into();
    let written = shop.update_customer("c-ada", &ada.input()).await?;
    let (_, seen_at) = shop
        .wait_for_copy("c-ada", CATCH_UP, |r| r.version >= written.version)
        .await?;
    let lag = seen_at.saturating_sub(written.committed_at_ms);
    st.say(format!(
        "PUT /customers/c-ada name \"Ada Lovelace\" → \"Ada King\" (version {}): in the copy {lag} ms after commit",
        written.version
    ))?;
    let again = shop.order(first.id).await?;
    st.check(
        customer_name(&again) == "Ada King",
        format!(
            "order #{} now shows \"{}\": the name comes from the copy, not a snapshot",
            first.id,
            customer_name(&again)
        ),
    )?;

    let old_price = first
        .lines
        .iter()
        .find(|l| l.sku == "kb-01")
        .map(|l| l.unit_price_cents)
        .ok_or_else(|| anyhow::anyhow!("order #{} has no kb-01 line", first.id))?;
    let new_price = old_price + 1_000;
    shop.set_price("kb-01", new_price).await?;
    st.say(format!(
        "PUT /products/kb-01/price {} → {}",
        dollars(old_price),
        dollars(new_price)
    ))?;
    let kept = again
        .lines
        .iter()
        .find(|l| l.sku == "kb-01")
        .map(|l| l.unit_price_cents);
    let kept_now = shop
        .order(first.id)
        .await?
        .lines
        .iter()
        .find(|l| l.sku == "kb-01")
        .map(|l| l.unit_price_cents);
    st.check(
        kept == Some(old_price) && kept_now == Some(old_price),
        format!(
            "order #{} keeps the snapshotted {} for kb-01",
            first.id,
            dollars(kept_now.unwrap_or(0))
        ),
    )?;
    let second = shop.place_order("c-alan", &[("kb-01", 1)]).await?;
    print_order(st, &second)?;
    st.check(
        second.lines.first().map(|l| l.unit_price_cents) == Some(new_price),
        format!("a new order pays the new price {}", dollars(new_price)),
    )?;
    st.measured(format!(
        "rename in the copy after {lag} ms; order #{} keeps {}, order #{} pays {}",
        first.id,
        dollars(old_price),
        second.id,
        dollars(new_price)
    ));
    Ok(())
}

async fn owner_down(shop: &mut Shop, _: &mut Ctx, st: &mut Step<'_>) -> anyhow::Result<()> {
    shop.stop_part(Part::Customer).await?;
    shop.stop_part(Part::Hub).await?;
    let customer_up = shop.answers(Part::Customer).await;
    let hub_up = shop.answers(Part::Hub).await;
    st.check(
        !customer_up && !hub_up,
        format!("Customer Service and the hub no longer answer (customer-service up: {customer_up}, hub up: {hub_up})"),
    )?;
    st.say("staleness counts from when the agent's last successful feed read was sent")?;
    // (wall-clock ms of the answer, staleness reported with it)
    let mut seen: Vec<(u64, u64)> = Vec::new();
    let mut all_within = true;
    for i in 0..OUTAGE_ORDERS {
        if i > 0 {
            tokio::time::sleep(ORDER_EVERY).await;
        }
        let o = shop.place_order("c-grace", &[("ms-01", 1)]).await?;
        let f = &o.customer_copy;
        all_within &= f.within_budget;
        seen.push((spoke::clock::now_ms(), f.staleness_ms.unwrap_or(0)));
        st.say(format!(
            "order #{} for {} from the copy: copy staleness {}, within the {} budget: {}",
            o.id,
            customer_name(&o),
            secs(f.staleness_ms),
            f.staleness_budget,
            f.within_budget
        ))?;
    }
    let (first_at, first) = seen.first().copied().unwrap_or_default();
    let (last_at, last) = seen.last().copied().unwrap_or_default();
    let wall = last_at.saturating_sub(first_at);
    let grew = last.saturating_sub(first);
    st.check(
        seen.len() == OUTAGE_ORDERS,
        format!("{} orders were taken with the owner side down", seen.len()),
    )?;
    st.check(
        wall >= 1_500 && grew + 300 >= wall,
        format!(
            "staleness grew with the outage: {} → {} (+{} in {} of wall time)",
            secs(Some(first)),
            secs(Some(last)),
            secs(Some(grew)),
            secs(Some(wall))
        ),
    )?;
    st.check(
        all_within,
        "every read was within the 1h budget, and said so",
    )?;
    let agent_error = shop.agent_error();
    st.check(
        agent_error.is_some(),
        format!(
            "the agent reports why: {}",
            agent_error.as_deref().unwrap_or("no error reported")
        ),
    )?;
    st.measured(format!(
        "{} orders with the owner down; staleness {} → {}, within budget",
        seen.len(),
        secs(Some(first)),
        secs(Some(last))
    ));
    Ok(())
}

async fn inventory_down(shop: &mut Shop, _: &mut Ctx, st: &mut Step<'_>) -> anyhow::Result<()> {
    shop.stop_part(Part::Inventory).await?;
    st.say("Inventory stopped")?;
    let orders_before = shop.orders()?.count_orders().await?;
    let charges_before = shop.charges().await?.len();
    let refused = shop.place_order("c-alan", &[("mn-27", 1)]).await;
    let (status, message) = match &refused {
        Err(CallError::Refused { status, message }) => (*status, message.clone()),
        Err(e) => (0, e.to_string()),
        Ok(o) => (201, format!("order #{} was taken", o.id)),
    };
    st.say(format!("POST /orders → {status}: {message}"))?;
    st.check(
        status == 503 && message.contains("inventory-service is unreachable"),
        "the order is refused with 503, naming Inventory",
    )?;
    let orders_after = shop.orders()?.count_orders().await?;
    let charges_after = shop.charges().await?.len();
    st.check(
        orders_after == orders_before && charges_after == charges_before,
        format!("no order was stored and nobody was charged ({orders_before} → {orders_after} orders, {charges_before} → {charges_after} charges)"),
    )?;
    shop.start_part(Part::Inventory).await?;
    st.say(format!(
        "Inventory restarted on {}",
        shop.url(Part::Inventory)
    ))?;
    let o = shop.place_order("c-alan", &[("mn-27", 1)]).await?;
    st.check(true, format!("after the restart, order #{} is taken", o.id))?;
    st.measured(format!(
        "refused with {status} while down; order #{} taken after restart",
        o.id
    ));
    Ok(())
}

async fn owner_back(shop: &mut Shop, _: &mut Ctx, st: &mut Step<'_>) -> anyhow::Result<()> {
    shop.start_part(Part::Customer).await?;
    st.say(format!(
        "Customer Service restarted on {} (same database); the hub is still down",
        shop.url(Part::Customer)
    ))?;
    let mut grace = shop.customer("c-grace").await?;
    let old_name = grace.name.clone();
    grace.name = "Grace Brewster Hopper".into();
    let written = shop.update_customer("c-grace", &grace.input()).await?;
    st.say(format!(
        "PUT /customers/c-grace name \"{old_name}\" → \"{}\" committed (version {})",
        grace.name, written.version
    ))?;
    let waiting = Shop::wait_until(
        Duration::from_secs(5),
        "the relay trying the hub",
        || async {
            let o = shop.outbox().await?;
            Ok((o.last_error.is_some() && o.backlog > 0).then_some(o))
        },
    )
    .await?;
    st.check(
        waiting.backlog >= 1,
        format!(
            "the change waits in Customer Service's outbox ({} row; relay: {})",
            waiting.backlog,
            waiting.last_error.as_deref().unwrap_or("")
        ),
    )?;
    let copied = shop.copied("c-grace").await?;
    let copied_name = copied
        .as_ref()
        .and_then(|r| r.fields.get("name"))
        .and_then(|v| v.as_str())
        .unwrap_or("(absent)")
        .to_owned();
    st.check(
        copied_name == old_name,
        format!(
            "the copy still says \"{copied_name}\" (staleness {})",
            secs(copied.and_then(|r| r.staleness_ms))
        ),
    )?;

    shop.start_part(Part::Hub).await?;
    let hub_up = spoke::clock::now_ms();
    st.say(format!(
        "hub restarted on {} (same log)",
        shop.url(Part::Hub)
    ))?;
    let (read, seen_at) = shop
        .wait_for_copy("c-grace", Duration::from_secs(10), |r| {
            r.version >= written.version
        })
        .await?;
    let since_commit = seen_at.saturating_sub(written.committed_at_ms);
    let since_hub = seen_at.saturating_sub(hub_up);
    st.check(
        read.fields.get("name").and_then(|v| v.as_str()) == Some(grace.name.as_str()),
        format!(
            "the copy says \"{}\": {since_hub} ms after the hub came back, {since_commit} ms after the commit",
            grace.name
        ),
    )?;
    let drained = Shop::wait_until(CATCH_UP, "the outbox draining", || async {
        let o = shop.outbox().await?;
        Ok((o.backlog == 0).then_some(o))
    })
    .await?;
    st.check(
        drained.backlog == 0,
        "the outbox is empty: delivered once, nothing lost",
    )?;
    // Fresh again once the agent has read up to the hub's head (the read
    // above may come from a batch the hub had already grown past).
    let fresh = shop
        .wait_for_copy("c-grace", CATCH_UP, |r| {
            r.within_budget && r.staleness_ms.is_some_and(|s| s < 2_000)
        })
        .await
        .map(|(r, _)| r);
    let staleness = fresh
        .as_ref()
        .map_or(read.staleness_ms, |r| r.staleness_ms)
        .unwrap_or(0);
    st.check(
        fresh.is_ok(),
        format!("the copy is fresh again (staleness {staleness} ms)"),
    )?;
    let o = shop.place_order("c-grace", &[("ms-01", 1)]).await?;
    st.check(
        customer_name(&o) == grace.name,
        format!("a new order shows \"{}\"", customer_name(&o)),
    )?;
    st.measured(format!(
        "held in the outbox while the hub was down; in the copy {since_hub} ms after the hub came back ({since_commit} ms after commit)"
    ));
    Ok(())
}

async fn write_refused(shop: &mut Shop, _: &mut Ctx, st: &mut Step<'_>) -> anyhow::Result<()> {
    let orders = shop.orders()?.clone();
    let mut first_message = String::new();
    for sql in [
        "UPDATE customers SET name = 'Mallory' WHERE id = 'c-ada'",
        "DELETE FROM customers WHERE id = 'c-ada'",
    ] {
        let result = orders.execute(sql).await;
        let message = match &result {
            Ok(n) => format!("accepted, {n} rows changed"),
            Err(e) => format!("{e:#}"),
        };
        st.say(format!("{sql}\n     → {message}"))?;
        st.check(
            result.is_err() && message.contains(READ_ONLY_MESSAGE),
            "refused, naming the dataset and its owner",
        )?;
        if first_message.is_empty() {
            first_message = message;
        }
    }
    let ada = shop.copied("c-ada").await?;
    let name = ada
        .as_ref()
        .and_then(|r| r.fields.get("name"))
        .and_then(|v| v.as_str())
        .unwrap_or("(absent)");
    st.check(
        name == "Ada King",
        format!("the copy is unchanged (c-ada is \"{name}\")"),
    )?;
    let short: String = first_message.chars().take(90).collect();
    st.measured(format!("refused: \"{short}…\""));
    Ok(())
}

/// A name as the copy holds it (`None`: no such live record).
async fn copied_name(shop: &Shop, id: &str) -> anyhow::Result<Option<String>> {
    Ok(shop.copied(id).await?.and_then(|r| {
        r.fields
            .get("name")
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    }))
}

async fn corrupt_and_reconcile(
    shop: &mut Shop,
    _: &mut Ctx,
    st: &mut Step<'_>,
) -> anyhow::Result<()> {
    use spoke::copy::CopyStore;
    use spoke_core::digest::DigestEntry;
    use spoke_core::{Change, Op};

    let (store, spec) = shop.copy_handle()?;
    let before: Vec<(String, Option<String>)> = {
        let mut v = Vec::new();
        for id in ["c-ada", "c-alan", "c-mallory"] {
            v.push((id.to_owned(), copied_name(shop, id).await?));
        }
        v
    };
    let ada = shop
        .copied("c-ada")
        .await?
        .ok_or_else(|| anyhow::anyhow!("c-ada is not in the copy"))?;
    let alan = shop
        .copied("c-alan")
        .await?
        .ok_or_else(|| anyhow::anyhow!("c-alan is not in the copy"))?;
    // What a restored backup and a stray script leave behind, written
    // through an operator's handle on the copy (the agent keeps running).
    let row = |key: &str, version, name: &str, email: &str| {
        let mut fields = serde_json::Map::new();
        fields.insert("name".into(), name.into());
        fields.insert("email".into(), email.into());
        Change {
            dataset: spec.dataset.clone(),
            key: key.into(),
            version,
            op: Op::Upsert,
            fields,
            owner: spec.owner.clone(),
            ts: 0,
            schema_version: 1,
        }
    };
    let old_state = spoke::copy::Advance {
        position: None,
        fresh_as_of_ms: None,
        from_feed: false,
    };
    store
        .remove(
            &spec.dataset,
            &[
                DigestEntry::new("c-alan", alan.version, false),
                DigestEntry::new("c-ada", ada.version, false),
            ],
        )
        .await?;
    store
        .apply(
            &spec.dataset,
            &[
                row("c-ada", 1, "Ada Lovelace", "ada@example.com"),
                row("c-mallory", 1, "Mallory", "mallory@example.com"),
            ],
            old_state,
        )
        .await?;
    st.say("an operator restores last week's backup of the copy and a script adds a row:")?;
    st.say(format!(
        "c-alan lost (was version {}); c-ada back at version 1 \"Ada Lovelace\" (was version {} \"{}\"); c-mallory added, which Customer Service never had",
        alan.version,
        ada.version,
        ada.fields.get("name").and_then(|v| v.as_str()).unwrap_or("?")
    ))?;
    let corrupted = (
        copied_name(shop, "c-alan").await?,
        copied_name(shop, "c-ada").await?,
        copied_name(shop, "c-mallory").await?,
    );
    st.check(
        corrupted
            == (
                None,
                Some("Ada Lovelace".to_owned()),
                Some("Mallory".to_owned()),
            ),
        "the copy now serves the damage (reads go on; nothing else noticed)",
    )?;

    let report = shop.reconcile_customers().await?;
    st.say(format!(
        "spoke reconcile: {} of {} buckets differed; {} entries compared on the copy's side, {} on the hub's; {:.1} ms",
        report.buckets_differing,
        report.buckets_total,
        report.entries_copy,
        report.entries_source,
        report.duration_ms
    ))?;
    for r in &report.repairs {
        st.say(format!("  repaired {:<7} {}", r.kind.as_str(), r.key))?;
    }
    let mut kinds: Vec<(String, &str)> = report
        .repairs
        .iter()
        .map(|r| (r.key.clone(), r.kind.as_str()))
        .collect();
    kinds.sort();
    st.check(
        kinds
            == [
                ("c-ada".to_owned(), "stale"),
                ("c-alan".to_owned(), "missing"),
                ("c-mallory".to_owned(), "extra"),
            ],
        "exactly the three damaged keys were repaired: c-alan missing, c-ada stale, c-mallory extra",
    )?;
    let mut after = Vec::new();
    for (id, _) in &before {
        after.push((id.clone(), copied_name(shop, id).await?));
    }
    st.check(
        after == before && report.in_sync_after,
        format!(
            "the copy is as it was before the damage (c-ada \"{}\", c-alan back, c-mallory gone) and its digest equals the hub's",
            after[0].1.as_deref().unwrap_or("(absent)")
        ),
    )?;
    let again = shop.reconcile_customers().await?;
    st.check(
        again.in_sync_before && again.repaired.total() == 0,
        "a second reconcile finds nothing to do",
    )?;
    st.measured(format!(
        "3 damaged keys found and repaired in {:.1} ms, {} of {} buckets compared entry by entry",
        report.duration_ms, report.buckets_differing, report.buckets_total
    ));
    Ok(())
}

/// The copy's freshness as the operator sees it: (staleness ms, position).
async fn ttl_categories(shop: &mut Shop, _: &mut Ctx, st: &mut Step<'_>) -> anyhow::Result<()> {
    use spoke::clock::Clock;
    use spoke::read::ReadSource;

    let sub = shop
        .manifest()
        .subscription(crate::order::SERVICE, catalog::CATEGORIES)
        .ok_or_else(|| anyhow::anyhow!("the shop manifest has order-service → categories"))?;
    let (Some(cache), Some(url)) = (sub.cache, sub.owner_url.clone()) else {
        return Err(anyhow::anyhow!(
            "order-service → categories is not a ttl subscription with an owner_url"
        ));
    };
    st.say(format!(
        "Order Service keeps no copy of categories: reads go through a cache (ttl {}) to GET {url}",
        cache.ttl
    ))?;
    let clock = Clock::manual(spoke::clock::now_ms());
    let copies = shop.read_through(clock.clone())?;
    let catalog_reads = || async {
        shop.catalog_stats()
            .await
            .map(|s| s.category_reads)
            .map_err(|e| anyhow::anyhow!("{e}"))
    };
    let read = |key: &'static str| {
        let copies = &copies;
        async move {
            copies
                .get(catalog::CATEGORIES, key)
                .await?
                .ok_or_else(|| anyhow::anyhow!("Catalog has no category {key}"))
        }
    };
    let calls_before = catalog_reads().await?;

    let first = read("peripherals").await?;
    st.check(
        first.source == ReadSource::Owner && first.fields["name"] == "Peripherals",
        format!(
            "first read of 'peripherals': a miss, read from Catalog → \"{}\"",
            first.fields["name"].as_str().unwrap_or_default()
        ),
    )?;
    let second = read("peripherals").await?;
    st.check(
        second.source == ReadSource::Cache,
        format!(
            "second read: a cache hit ({} ms old, ttl {})",
            second.staleness_ms.unwrap_or_default(),
            cache.ttl
        ),
    )?;
    const CONCURRENT: usize = 20;
    let many = futures_util::future::join_all((0..CONCURRENT).map(|_| read("displays"))).await;
    let named = many
        .iter()
        .filter(|r| matches!(r, Ok(r) if r.fields["name"] == "Displays"))
        .count();
    let calls = catalog_reads().await? - calls_before;
    st.check(
        named == CONCURRENT && calls == 2,
        format!(
            "{CONCURRENT} concurrent reads of 'displays' (a miss) coalesce into one call: Catalog counted {calls} category reads for {} reads (expected 2)",
            CONCURRENT + 2
        ),
    )?;
    clock.advance(cache.ttl.as_millis() + 1);
    let expired = read("peripherals").await?;
    let calls = catalog_reads().await? - calls_before;
    st.check(
        expired.source == ReadSource::Owner && calls == 3,
        format!(
            "past the ttl (the cache's clock moved {} ahead): 'peripherals' expired and is read from Catalog again ({calls} Catalog reads in all)",
            cache.ttl
        ),
    )?;
    if let Some(stats) = copies.cache(catalog::CATEGORIES).map(|c| c.stats()) {
        st.say(format!(
            "cache: {} hits, {} misses, {} owner calls, {} entries",
            stats.hits_total, stats.misses_total, stats.owner_calls_total, stats.entries
        ))?;
    }
    st.measured(format!(
        "{} reads, {calls} Catalog calls (ttl {})",
        CONCURRENT + 3,
        cache.ttl
    ));
    Ok(())
}

async fn copy_standing(shop: &Shop) -> anyhow::Result<(Option<u64>, Option<u64>)> {
    let s = shop
        .copies()?
        .status(crate::order::CUSTOMERS, None, None)
        .await?;
    Ok((s.staleness_ms, s.position))
}

async fn owner_down_distributed(
    shop: &mut Shop,
    _: &mut Ctx,
    st: &mut Step<'_>,
) -> anyhow::Result<()> {
    shop.stop_part(Part::Relay).await?;
    shop.stop_part(Part::Customer).await?;
    let customer_up = shop.answers(Part::Customer).await;
    let relay_running = shop.is_running(Part::Relay);
    st.check(
        !customer_up && !relay_running,
        format!("Customer Service no longer answers and its relay is stopped (customer-service up: {customer_up}, relay running: {relay_running})"),
    )?;
    st.say("JetStream stays up and the agent keeps reading it: nothing changed, and the copy knows it is current")?;
    let mut all_within = true;
    let mut feed_up_max = 0;
    for i in 0..FEED_UP_ORDERS {
        if i > 0 {
            tokio::time::sleep(ORDER_EVERY).await;
        }
        let o = shop.place_order("c-grace", &[("ms-01", 1)]).await?;
        let f = &o.customer_copy;
        all_within &= f.within_budget;
        feed_up_max = feed_up_max.max(f.staleness_ms.unwrap_or(u64::MAX));
        st.say(format!(
            "order #{} for {} from the copy: copy staleness {}, within the {} budget: {}",
            o.id,
            customer_name(&o),
            secs(f.staleness_ms),
            f.staleness_budget,
            f.within_budget
        ))?;
    }
    st.check(
        feed_up_max < FOLLOWING_STALENESS_MS,
        format!(
            "with the owner down and the feed up, the copy stays fresh (staleness at most {}: one long-poll of JetStream)",
            secs(Some(feed_up_max))
        ),
    )?;

    shop.stop_part(Part::Agent).await?;
    st.say("now stop the agent too (as if its host, or its link to NATS, were down): the copy stops advancing")?;
    // (wall-clock ms of the answer, staleness reported with it)
    let mut seen: Vec<(u64, u64)> = Vec::new();
    for i in 0..OUTAGE_ORDERS {
        if i > 0 {
            tokio::time::sleep(ORDER_EVERY).await;
        }
        let o = shop.place_order("c-grace", &[("ms-01", 1)]).await?;
        let f = &o.customer_copy;
        all_within &= f.within_budget;
        seen.push((spoke::clock::now_ms(), f.staleness_ms.unwrap_or(0)));
        st.say(format!(
            "order #{} for {} from the copy: copy staleness {}, within the {} budget: {}",
            o.id,
            customer_name(&o),
            secs(f.staleness_ms),
            f.staleness_budget,
            f.within_budget
        ))?;
    }
    let (first_at, first) = seen.first().copied().unwrap_or_default();
    let (last_at, last) = seen.last().copied().unwrap_or_default();
    let wall = last_at.saturating_sub(first_at);
    let grew = last.saturating_sub(first);
    st.check(
        seen.len() == OUTAGE_ORDERS,
        format!(
            "{} orders were taken with the owner and the agent down",
            seen.len()
        ),
    )?;
    st.check(
        wall >= 1_500 && grew + 300 >= wall,
        format!(
            "staleness grew with the outage: {} → {} (+{} in {} of wall time)",
            secs(Some(first)),
            secs(Some(last)),
            secs(Some(grew)),
            secs(Some(wall))
        ),
    )?;
    st.check(
        all_within,
        "every read was within the 1h budget, and said so",
    )?;

    let (_, position) = copy_standing(shop).await?;
    shop.start_part(Part::Agent).await?;
    let restarted = spoke::clock::now_ms();
    let fresh_after =
        Shop::wait_until(Duration::from_secs(10), "the agent catching up", || async {
            let (staleness, _) = copy_standing(shop).await?;
            let since = spoke::clock::now_ms().saturating_sub(restarted);
            // Fresh as of a moment after the restart.
            Ok(staleness.filter(|s| *s < since).map(|_| since))
        })
        .await
        .ok();
    st.check(
        fresh_after.is_some(),
        format!(
            "the agent restarted from the position stored with the copy ({}); fresh again {} ms later, once its first long-poll of JetStream answered",
            position.map_or_else(|| "none".to_owned(), |p| p.to_string()),
            fresh_after.unwrap_or(0),
        ),
    )?;
    st.measured(format!(
        "owner down, feed up: staleness ≤ {}; agent down too: {} → {}, within budget; fresh again {} ms after the agent restarted",
        secs(Some(feed_up_max)),
        secs(Some(first)),
        secs(Some(last)),
        fresh_after.unwrap_or(0)
    ));
    Ok(())
}

async fn relay_down_distributed(
    shop: &mut Shop,
    _: &mut Ctx,
    st: &mut Step<'_>,
) -> anyhow::Result<()> {
    shop.start_part(Part::Customer).await?;
    st.say(format!(
        "Customer Service restarted on {} (same database); its relay is still stopped",
        shop.url(Part::Customer)
    ))?;
    let mut grace = shop.customer("c-grace").await?;
    let old_name = grace.name.clone();
    grace.name = "Grace Brewster Hopper".into();
    let written = shop.update_customer("c-grace", &grace.input()).await?;
    st.say(format!(
        "PUT /customers/c-grace name \"{old_name}\" → \"{}\" committed (version {})",
        grace.name, written.version
    ))?;
    let waiting = shop.outbox().await?;
    st.check(
        waiting.backlog >= 1,
        format!(
            "the change waits in Customer Service's outbox ({} row; no relay is publishing it)",
            waiting.backlog
        ),
    )?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let copied = shop.copied("c-grace").await?;
    let copied_name = copied
        .as_ref()
        .and_then(|r| r.fields.get("name"))
        .and_then(|v| v.as_str())
        .unwrap_or("(absent)")
        .to_owned();
    let staleness = copied.as_ref().and_then(|r| r.staleness_ms);
    st.check(
        copied_name == old_name && staleness.is_some_and(|s| s < FOLLOWING_STALENESS_MS),
        format!(
            "a second later the copy still says \"{copied_name}\" and is fresh (staleness {}): it holds all JetStream holds, and the change has not reached JetStream",
            secs(staleness)
        ),
    )?;

    shop.start_part(Part::Relay).await?;
    let relay_up = spoke::clock::now_ms();
    st.say("relay restarted: it publishes the outbox into JetStream")?;
    let (read, seen_at) = shop
        .wait_for_copy("c-grace", Duration::from_secs(10), |r| {
            r.version >= written.version
        })
        .await?;
    let since_commit = seen_at.saturating_sub(written.committed_at_ms);
    let since_relay = seen_at.saturating_sub(relay_up);
    st.check(
        read.fields.get("name").and_then(|v| v.as_str()) == Some(grace.name.as_str()),
        format!(
            "the copy says \"{}\": {since_relay} ms after the relay came back, {since_commit} ms after the commit",
            grace.name
        ),
    )?;
    let drained = Shop::wait_until(CATCH_UP, "the outbox draining", || async {
        let o = shop.outbox().await?;
        Ok((o.backlog == 0).then_some(o))
    })
    .await?;
    let forwarded = shop.relay_stats().map_or(0, |s| {
        s.forwarded.load(std::sync::atomic::Ordering::Relaxed)
    });
    st.check(
        drained.backlog == 0 && forwarded >= 1,
        format!("the outbox is empty: published once ({forwarded} forwarded), nothing lost"),
    )?;
    st.check(
        read.within_budget
            && read
                .staleness_ms
                .is_some_and(|s| s < FOLLOWING_STALENESS_MS),
        format!(
            "the copy is fresh (staleness {} ms)",
            read.staleness_ms.unwrap_or(0)
        ),
    )?;
    let o = shop.place_order("c-grace", &[("ms-01", 1)]).await?;
    st.check(
        customer_name(&o) == grace.name,
        format!("a new order shows \"{}\"", customer_name(&o)),
    )?;
    st.measured(format!(
        "held in the outbox while the relay was stopped; in the copy {since_relay} ms after the relay came back ({since_commit} ms after commit)"
    ));
    Ok(())
}

async fn write_refused_distributed(
    shop: &mut Shop,
    _: &mut Ctx,
    st: &mut Step<'_>,
) -> anyhow::Result<()> {
    let d = shop
        .distributed()
        .ok_or_else(|| anyhow::anyhow!("not the distributed shop"))?
        .clone();
    let c = &d.copies_schema;
    let statements = [
        format!("UPDATE \"{c}\".customers SET name = 'Mallory' WHERE id = 'c-ada'"),
        format!("DELETE FROM \"{c}\"._spoke_copy_customers WHERE _spoke_key = 'c-ada'"),
    ];
    let orders = shop.orders()?.clone();
    st.say(format!(
        "on Order Service's own connection (role {}, which the agent granted SELECT only):",
        d.app_role
    ))?;
    let mut denied = String::new();
    for sql in &statements {
        let result = orders.execute(sql).await;
        let message = match &result {
            Ok(n) => format!("accepted, {n} rows changed"),
            Err(e) => format!("{e:#}"),
        };
        st.say(format!("{sql}\n     → {message}"))?;
        st.check(
            result.is_err() && message.contains("permission denied"),
            "refused by PostgreSQL: permission denied",
        )?;
        if denied.is_empty() {
            denied = message;
        }
    }
    st.say("in a privileged session (the agent's role) that has not set the agent's mark:")?;
    let mut guarded = String::new();
    for sql in &statements {
        let result = shop.privileged_execute(sql).await?;
        let message = match &result {
            Ok(n) => format!("accepted, {n} rows changed"),
            Err(e) => e.clone(),
        };
        st.say(format!("{sql}\n     → {message}"))?;
        st.check(
            result.is_err() && message.contains(READ_ONLY_MESSAGE),
            "refused by the copy's trigger, naming the dataset and its owner",
        )?;
        if guarded.is_empty() {
            guarded = message;
        }
    }
    let ada = shop.copied("c-ada").await?;
    let name = ada
        .as_ref()
        .and_then(|r| r.fields.get("name"))
        .and_then(|v| v.as_str())
        .unwrap_or("(absent)");
    st.check(
        name == "Ada King",
        format!("the copy is unchanged (c-ada is \"{name}\")"),
    )?;
    let short: String = guarded.chars().take(60).collect();
    st.measured(format!("refused: \"{denied}\"; \"{short}…\""));
    Ok(())
}

/// Distributed step 8: a price change captured from Catalog's WAL.
async fn catalog_cdc(shop: &mut Shop, ctx: &mut Ctx, st: &mut Step<'_>) -> anyhow::Result<()> {
    const SKU: &str = "ms-01";
    let first = ctx
        .first_order
        .clone()
        .ok_or_else(|| anyhow::anyhow!("step 2 placed no order"))?;
    let old_price = first
        .lines
        .iter()
        .find(|l| l.sku == SKU)
        .map(|l| l.unit_price_cents)
        .ok_or_else(|| anyhow::anyhow!("order #{} has no {SKU} line", first.id))?;
    let before = shop
        .storefront()?
        .get(catalog::DATASET, SKU)
        .await?
        .ok_or_else(|| anyhow::anyhow!("the storefront's copy has no {SKU}"))?;
    let new_price = old_price - 400;
    let product = shop.set_price(SKU, new_price).await?;
    st.say(format!(
        "PUT /products/{SKU}/price {} → {}: one UPDATE in Catalog's PostgreSQL; Catalog publishes nothing",
        dollars(old_price),
        dollars(product.unit_price_cents)
    ))?;
    let (copied, seen_at) = Shop::wait_until(
        CATCH_UP,
        "the price change reaches the storefront's copy",
        || async {
            let read = shop.storefront()?.get(catalog::DATASET, SKU).await?;
            let seen_at = spoke::clock::now_ms();
            Ok(read
                .filter(|r| r.version > before.version)
                .map(|r| (r, seen_at)))
        },
    )
    .await
    .map_err(|e| {
        anyhow::anyhow!(
            "{e:#} (storefront agent: {})",
            shop.storefront_error().unwrap_or_else(|| "no error".into())
        )
    })?;
    let captured = shop
        .captured_product(SKU)
        .await?
        .ok_or_else(|| anyhow::anyhow!("the products feed has no {SKU}"))?;
    let lag = seen_at.saturating_sub(captured.ts);
    st.check(
        captured.version == copied.version
            && captured.fields.get("unit_price_cents") == Some(&serde_json::json!(new_price)),
        format!(
            "the CDC source put the commit in the feed: {SKU} at {} with version {} (the commit's LSN, was {})",
            dollars(new_price),
            spoke::cdc::fmt_lsn(captured.version),
            spoke::cdc::fmt_lsn(before.version)
        ),
    )?;
    st.say(format!(
        "the storefront's copy took version {} {lag} ms after Catalog's commit (staleness {} ms, within budget: {})",
        spoke::cdc::fmt_lsn(copied.version),
        copied.staleness_ms.unwrap_or(0),
        copied.within_budget
    ))?;
    let mut fields: Vec<&str> = copied.fields.keys().map(String::as_str).collect();
    fields.sort_unstable();
    st.check(
        fields == ["category", "name"] && copied.fields.get("name") == before.fields.get("name"),
        format!(
            "the copy holds {fields:?} only: Catalog marks unit_price_cents must-be-current, so no copy keeps it"
        ),
    )?;
    st.check(
        lag <= CATCH_UP.as_millis() as u64 && copied.within_budget,
        format!("commit → copy in {lag} ms, within the 1m budget"),
    )?;
    let kept = shop
        .order(first.id)
        .await?
        .lines
        .iter()
        .find(|l| l.sku == SKU)
        .map(|l| l.unit_price_cents);
    st.check(
        kept == Some(old_price),
        format!(
            "order #{} keeps the snapshotted {} for {SKU}",
            first.id,
            dollars(kept.unwrap_or(0))
        ),
    )?;
    let next = shop.place_order("c-alan", &[(SKU, 1)]).await?;
    print_order(st, &next)?;
    st.check(
        next.lines.first().map(|l| l.unit_price_cents) == Some(new_price),
        format!(
            "a new order pays {} (Order Service asked Catalog at checkout)",
            dollars(new_price)
        ),
    )?;
    st.measured(format!(
        "price change in the storefront's copy {lag} ms after commit (CDC); order #{} keeps {}, order #{} pays {}",
        first.id,
        dollars(old_price),
        next.id,
        dollars(new_price)
    ));
    Ok(())
}
