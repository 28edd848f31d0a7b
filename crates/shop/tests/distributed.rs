//! The shop on the distributed backends: Order Service's orders and its copy
//! of customers in PostgreSQL, the feed in NATS JetStream, no hub; Catalog's
//! products in a PostgreSQL with `wal_level=logical`, captured by CDC into the
//! storefront's copy.
//!
//! These need the machine's PostgreSQL and NATS (see `spoke::testing`): on a
//! laptop without them they are skipped with a printed reason; under
//! `CI=true` they fail.

use std::time::Duration;

use spoke_shop::customer::Customer;
use spoke_shop::demo::{self, Backends, Distributed, Part, Shop};
use spoke_shop::web::CallError;

const CATCH_UP: Duration = Duration::from_secs(10);

async fn backends(test: &str) -> Option<Backends> {
    let postgres = spoke::testing::postgres_or_skip(test).await?;
    let nats = spoke::testing::nats_or_skip(test).await?;
    Some(Backends {
        postgres,
        nats,
        catalog_postgres: None,
    })
}

fn customer(id: &str, name: &str) -> Customer {
    Customer {
        id: id.into(),
        name: name.into(),
        email: format!("{id}@example.com"),
        preferred_name: None,
        payment_method_id: "pm_test".into(),
    }
}

/// A running distributed shop with `c` created and arrived in the copy.
async fn shop_with(backends: Backends, c: &Customer) -> Shop {
    let shop = Shop::start_distributed(backends)
        .await
        .expect("the distributed shop starts");
    let written = shop.create_customer(c).await.expect("customer created");
    shop.wait_for_copy(&c.id, CATCH_UP, |r| r.version >= written.version)
        .await
        .expect("the customer reaches the copy");
    shop
}

async fn admin(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    client
}

/// Asserts that nothing the shop created is left: schemas, role, streams.
async fn assert_removed(backends: &Backends, d: &Distributed) {
    let pg = admin(&backends.postgres).await;
    let schemas: i64 = pg
        .query_one(
            "SELECT count(*) FROM pg_namespace WHERE nspname = ANY($1)",
            &[&vec![d.copies_schema.clone(), d.orders_schema.clone()]],
        )
        .await
        .unwrap()
        .get(0);
    let roles: i64 = pg
        .query_one(
            "SELECT count(*) FROM pg_roles WHERE rolname = $1",
            &[&d.app_role],
        )
        .await
        .unwrap()
        .get(0);
    let storefront: i64 = pg
        .query_one(
            "SELECT count(*) FROM pg_namespace WHERE nspname = $1",
            &[&d.storefront_schema],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        (schemas, roles, storefront),
        (0, 0, 0),
        "schemas and role dropped"
    );
    let js = async_nats::jetstream::new(async_nats::connect(&backends.nats).await.unwrap());
    let options = d.jetstream();
    for stream in [
        options.log_stream("customers"),
        options.state_stream("customers"),
        options.log_stream("products"),
        options.state_stream("products"),
    ] {
        assert!(
            js.get_stream(&stream).await.is_err(),
            "stream {stream} deleted"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_step_of_the_distributed_demo_holds() {
    let Some(backends) = backends("distributed demo").await else {
        return;
    };
    let mut out: Vec<u8> = Vec::new();
    let report = demo::run_distributed(&mut out, backends.clone())
        .await
        .expect("the demo runs");
    let narration = String::from_utf8_lossy(&out);
    let numbers: Vec<usize> = report.steps.iter().map(|s| s.number).collect();
    assert_eq!(
        numbers,
        (1..=8).collect::<Vec<_>>(),
        "eight steps ran\n{narration}"
    );
    for step in &report.steps {
        assert!(
            step.held,
            "step {} ({}) failed: {:?}\n{narration}",
            step.number, step.title, step.failures
        );
        assert!(
            !step.measured.is_empty(),
            "step {} measured nothing\n{narration}",
            step.number
        );
    }
    assert!(report.all_held());
    assert!(narration.contains("8 of 8 steps held"), "{narration}");
    assert!(
        !narration.contains("\n   hub "),
        "no hub in the distributed shop\n{narration}"
    );
    assert!(
        narration.contains("LEFT JOIN") && narration.contains("._spoke_copies s ON"),
        "step 2 shows the one JOIN query\n{narration}"
    );
    assert!(
        narration.contains("→ permission denied for view customers"),
        "step 7 shows PostgreSQL refusing Order Service's role\n{narration}"
    );
    assert!(
        narration.contains(&format!("→ {}", demo::READ_ONLY_MESSAGE)),
        "step 7 shows the trigger refusing a privileged session\n{narration}"
    );
    assert!(
        report.elapsed_ms < 20_000,
        "the demo took {} ms\n{narration}",
        report.elapsed_ms
    );
    // Everything it created is gone: find the role it named.
    let role = narration
        .split("(role ")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .expect("the narration names Order Service's role");
    let base = role.strip_suffix("_app").expect("role name");
    let pg = admin(&backends.postgres).await;
    let left: i64 = pg
        .query_one(
            "SELECT (SELECT count(*) FROM pg_namespace WHERE nspname LIKE $1 || '%') + (SELECT count(*) FROM pg_roles WHERE rolname LIKE $1 || '%')",
            &[&base],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "the demo removed its schemas and role ({base}_*)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_postgres_order_join_returns_the_copys_current_name_after_a_rename() {
    let Some(backends) = backends("postgres order join").await else {
        return;
    };
    let c = customer("c-1", "Ada Lovelace");
    let shop = shop_with(backends.clone(), &c).await;
    let d = shop.distributed().unwrap().clone();
    let placed = shop.place_order("c-1", &[("ms-01", 2)]).await.unwrap();

    // The order lives in Order Service's PostgreSQL schema, not in a file.
    assert!(
        !shop.order_db().exists(),
        "no order.db in the distributed shop"
    );
    let app = admin(&d.app_url()).await;
    let stored: i64 = app
        .query_one(
            &format!("SELECT count(*) FROM \"{}\".orders", d.orders_schema),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 1);

    let sql = shop.orders().unwrap().order_sql().to_owned();
    assert!(
        sql.contains(&format!("\"{}\".customers", d.copies_schema))
            && sql.contains(&format!("\"{}\"._spoke_copies", d.copies_schema))
            && sql.contains(&format!("\"{}\".orders", d.orders_schema)),
        "{sql}"
    );
    // The query itself, as Order Service's role runs it: name and freshness in one read.

    let rows = app.query(&sql, &[&placed.id]).await.unwrap();
    assert_eq!(rows.len(), 1, "one row per order line");
    assert_eq!(
        (
            rows[0].get::<_, Option<String>>(6).as_deref(),
            rows[0].get::<_, Option<i64>>(8)
        ),
        (Some("Ada Lovelace"), Some(1))
    );
    assert!(
        rows[0].get::<_, Option<i64>>(9).is_some_and(|f| f > 0),
        "the copy's freshness row is joined"
    );
    let got = shop.order(placed.id).await.unwrap();
    assert_eq!(
        got.customer.as_ref().map(|c| (c.name.as_str(), c.version)),
        Some(("Ada Lovelace", 1))
    );

    let mut renamed = c.clone();
    renamed.name = "Ada King".into();
    let w = shop.update_customer("c-1", &renamed.input()).await.unwrap();
    shop.wait_for_copy("c-1", CATCH_UP, |r| r.version >= w.version)
        .await
        .unwrap();
    let rows = app.query(&sql, &[&placed.id]).await.unwrap();
    assert_eq!(
        (
            rows[0].get::<_, Option<String>>(6).as_deref(),
            rows[0].get::<_, Option<i64>>(8)
        ),
        (Some("Ada King"), Some(2)),
        "the JOIN reads the copy's current name"
    );
    let got = shop.order(placed.id).await.unwrap();
    let on_order = got.customer.expect("still in the copy");
    assert_eq!((on_order.name.as_str(), on_order.version), ("Ada King", 2));
    assert_eq!(got.lines[0].qty, 2);
    assert!(got.customer_copy.within_budget, "{:?}", got.customer_copy);
    drop(app);
    shop.shutdown().await.unwrap();
    assert_removed(&backends, &d).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_order_while_customer_service_is_down_uses_the_copy() {
    let Some(backends) = backends("order with the owner down").await else {
        return;
    };
    let mut shop = shop_with(backends.clone(), &customer("c-1", "Ada")).await;
    let d = shop.distributed().unwrap().clone();
    shop.stop_part(Part::Relay).await.unwrap();
    shop.stop_part(Part::Customer).await.unwrap();
    assert!(
        !shop.answers(Part::Customer).await,
        "customer-service is down"
    );

    let o = shop.place_order("c-1", &[("ms-01", 1)]).await.unwrap();
    assert_eq!(o.customer.as_ref().map(|c| c.name.as_str()), Some("Ada"));
    assert!(
        o.customer_copy.fresh_as_of.is_some(),
        "{:?}",
        o.customer_copy
    );
    assert!(o.customer_copy.within_budget, "{:?}", o.customer_copy);
    assert_eq!(o.customer_copy.staleness_budget, "1h");

    // With the agent down too the copy goes on answering, and its staleness grows.
    shop.stop_part(Part::Agent).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let later = shop.place_order("c-1", &[("ms-01", 1)]).await.unwrap();
    assert_eq!(
        later.customer.as_ref().map(|c| c.name.as_str()),
        Some("Ada")
    );
    let (s1, s2) = (
        o.customer_copy.staleness_ms.unwrap(),
        later.customer_copy.staleness_ms.unwrap(),
    );
    assert!(s2 >= s1 + 1_000, "staleness grew: {s1} → {s2} ms");
    assert_eq!(shop.orders().unwrap().count_orders().await.unwrap(), 2);

    // A customer the copy does not hold cannot order: there is no call to the owner.
    match shop.place_order("c-nobody", &[("ms-01", 1)]).await {
        Err(CallError::Refused { status, message }) => {
            assert_eq!(status, 422, "{message}");
            assert!(message.contains("not in Order Service's copy"), "{message}");
        }
        other => panic!("expected a 422 refusal, got {other:?}"),
    }
    shop.shutdown().await.unwrap();
    assert_removed(&backends, &d).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dropped_distributed_shop_removes_what_it_created() {
    let Some(backends) = backends("distributed shop cleanup on drop").await else {
        return;
    };
    let shop = shop_with(backends.clone(), &customer("c-1", "Ada")).await;
    let d = shop.distributed().unwrap().clone();
    drop(shop);
    assert_removed(&backends, &d).await;
}

/// Catalog's own PostgreSQL with `wal_level=logical`, started by the test
/// (skipped, or failed under CI, without the server binaries).
fn catalog_postgres(dir: &std::path::Path) -> Option<spoke::testing::PrivatePostgres> {
    spoke::testing::PrivatePostgres::start(&dir.join("catalog-pg"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_price_change_in_catalogs_postgres_reaches_the_storefront_by_cdc_and_orders_keep_their_price(
) {
    let Some(mut backends) = backends("catalog captured by cdc").await else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(pg) = tokio::task::spawn_blocking({
        let dir = dir.path().to_owned();
        move || catalog_postgres(&dir)
    })
    .await
    .unwrap() else {
        return;
    };
    backends.catalog_postgres = Some(pg.url());
    let ada = customer("c-ada", "Ada Lovelace");
    let shop = shop_with(backends.clone(), &ada).await;
    let d = shop.distributed().expect("distributed").clone();
    let storefront = shop.storefront().expect("storefront");

    // The CDC snapshot brought every product, without its price.
    let before = storefront
        .get("products", "kb-01")
        .await
        .unwrap()
        .expect("kb-01 in the storefront's copy");
    assert_eq!(before.fields["name"], "Mechanical keyboard");
    assert!(!before.fields.contains_key("unit_price_cents"));

    let first = shop.place_order("c-ada", &[("kb-01", 1)]).await.unwrap();
    assert_eq!(first.lines[0].unit_price_cents, 8_900);
    let repriced = shop.set_price("kb-01", 7_900).await.unwrap();
    assert_eq!(repriced.unit_price_cents, 7_900);
    let copied = Shop::wait_until(CATCH_UP, "the price change reaches the copy", || async {
        Ok(storefront
            .get("products", "kb-01")
            .await?
            .filter(|r| r.version > before.version))
    })
    .await
    .expect("the CDC source carries the change");
    let captured = shop
        .captured_product("kb-01")
        .await
        .unwrap()
        .expect("kb-01 in the feed");
    assert_eq!(
        captured.version, copied.version,
        "the copy holds the captured change"
    );
    assert_eq!(captured.fields["unit_price_cents"], 7_900);
    assert!(!copied.fields.contains_key("unit_price_cents"));

    let kept = shop.order(first.id).await.unwrap();
    assert_eq!(kept.lines[0].unit_price_cents, 8_900, "the snapshot stays");
    let next = shop.place_order("c-ada", &[("kb-01", 1)]).await.unwrap();
    assert_eq!(
        next.lines[0].unit_price_cents, 7_900,
        "checkout asks Catalog"
    );

    shop.shutdown().await.expect("a clean shutdown");
    assert_removed(&backends, &d).await;
    let catalog = admin(&pg.url()).await;
    let left: (i64, i64, i64) = {
        let row = catalog
            .query_one(
                "SELECT (SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1),
                        (SELECT count(*) FROM pg_publication WHERE pubname = $2),
                        (SELECT count(*) FROM pg_namespace WHERE nspname = $3)",
                &[&d.cdc_slot, &d.cdc_publication, &d.catalog_schema],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1), row.get(2))
    };
    assert_eq!(
        left,
        (0, 0, 0),
        "slot, publication and Catalog's schema dropped"
    );
}
