//! Schema changes, row images and statements CDC cannot key, against a
//! private PostgreSQL: each stops the source with a clear error, and the
//! transaction that carried it is neither published nor acknowledged.

mod cdc_support;

use std::time::Duration;

use cdc_support::*;
use spoke::cdc::CdcError;

const T: Duration = Duration::from_secs(60);

async fn current_lsn(db: &tokio_postgres::Client) -> u64 {
    let s: String = db
        .query_one("SELECT (pg_current_wal_lsn() - '0/0')::text", &[])
        .await
        .unwrap()
        .get(0);
    s.parse::<f64>().unwrap() as u64
}

/// Starts a source on the items table and waits until it streams.
async fn streaming(env: &Env, prefix: &str) -> (String, Running) {
    env.db
        .batch_execute(
            "INSERT INTO items (id, name, qty, owner_note) VALUES ('a', 'A', 1, 'note-a')",
        )
        .await
        .unwrap();
    let slot = spoke::testing::unique_name(prefix);
    let running = env.spawn(env.config(&slot));
    wait_snapshot_done(&env.db, &slot).await;
    env.converge(T).await;
    (slot, running)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_added_column_passes() {
    let Some(env) = Env::start().await else {
        return;
    };
    let (_slot, running) = streaming(&env, "cdc_add").await;
    env.db
        .batch_execute(
            "ALTER TABLE items ADD COLUMN added text DEFAULT 'x';
             INSERT INTO items (id, name, added) VALUES ('b', 'B', 'new');
             UPDATE items SET qty = 2 WHERE id = 'a';",
        )
        .await
        .unwrap();
    env.converge(T).await;
    assert!(!running.task.is_finished(), "the source keeps running");
    let entries = log(env.feed.as_ref(), "items").await;
    assert!(
        entries
            .iter()
            .all(|e| !e.change.fields.contains_key("added")),
        "columns the dataset does not declare are not published"
    );
    running.stop().await;
}

/// Runs `ddl`, then a transaction that must stop the source; checks the
/// error and that nothing of that transaction was published or acknowledged.
async fn stops_on(env: &Env, prefix: &str, ddl: &str, dml: &str) -> String {
    let (slot, running) = streaming(env, prefix).await;
    env.db.batch_execute(ddl).await.unwrap();
    let before = current_lsn(&env.db).await;
    let head_before = log(env.feed.as_ref(), "items").await.len();
    env.db.batch_execute(dml).await.unwrap();
    let e = running.error(T).await;
    let msg = e.to_string();
    assert_eq!(
        log(env.feed.as_ref(), "items").await.len(),
        head_before,
        "nothing of the transaction was published: {msg}"
    );
    // Give a wrongly sent acknowledgement time to arrive, then check none did.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let confirmed = slot_row(&env.db, &slot).await.expect("slot").0;
    assert!(
        confirmed <= before,
        "the slot was not confirmed past the failed transaction ({confirmed} > {before})"
    );
    // A restart stops again (the change is still there to be read).
    let again = env.spawn(env.config(&slot)).error(T).await;
    assert_eq!(
        std::mem::discriminant(&again),
        std::mem::discriminant(&e),
        "{again}"
    );
    msg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_projected_column_stops_the_source_naming_table_column_and_consumer() {
    let Some(env) = Env::start().await else {
        return;
    };
    let msg = stops_on(
        &env,
        "cdc_drop",
        "ALTER TABLE items DROP COLUMN qty",
        "BEGIN; INSERT INTO items (id, name) VALUES ('z', 'Z'); UPDATE items SET name = 'A2' WHERE id = 'a'; COMMIT;",
    )
    .await;
    assert!(
        msg.contains("public.items")
            && msg.contains("'qty'")
            && msg.contains("dropped")
            && msg.contains("reader-svc")
            && !msg.contains("audit-svc"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retyping_a_projected_column_stops_the_source_naming_table_column_and_consumers() {
    let Some(env) = Env::start().await else {
        return;
    };
    let msg = stops_on(
        &env,
        "cdc_retype",
        "ALTER TABLE items ALTER COLUMN name TYPE integer USING length(name)",
        "INSERT INTO items (id, name) VALUES ('z', 5)",
    )
    .await;
    assert!(
        msg.contains("public.items")
            && msg.contains("'name' is now integer")
            && msg.contains("audit-svc, reader-svc"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_stops_the_source() {
    let Some(env) = Env::start().await else {
        return;
    };
    let msg = stops_on(&env, "cdc_trunc", "SELECT 1", "TRUNCATE items").await;
    assert!(
        msg.contains("TRUNCATE of table public.items") && msg.contains("--resnapshot"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_without_the_key_in_its_old_row_names_replica_identity() {
    let Some(env) = Env::start().await else {
        return;
    };
    let msg = stops_on(
        &env,
        "cdc_ident",
        "ALTER TABLE items ALTER owner_note SET NOT NULL;
         CREATE UNIQUE INDEX items_note ON items (owner_note);
         ALTER TABLE items REPLICA IDENTITY USING INDEX items_note;",
        "DELETE FROM items WHERE id = 'a'",
    )
    .await;
    assert!(
        msg.contains("public.items")
            && msg.contains("key column 'id'")
            && msg.contains("REPLICA IDENTITY FULL"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_whose_identity_cannot_key_deletes_is_refused_at_start() {
    let Some(env) = Env::start_with(
        MANIFEST,
        "CREATE TABLE items (serial_id serial PRIMARY KEY, id text UNIQUE NOT NULL, name text NOT NULL,
            qty integer, price numeric, active boolean, at timestamptz, doc jsonb, body text)",
    )
    .await
    else {
        return;
    };
    let slot = spoke::testing::unique_name("cdc_nokey");
    let e = env.spawn(env.config(&slot)).error(T).await;
    assert!(matches!(e, CdcError::ReplicaIdentity { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("key column 'id'")
            && msg.contains("ALTER TABLE \"public\".\"items\" REPLICA IDENTITY FULL"),
        "{msg}"
    );
    assert!(
        slot_row(&env.db, &slot).await.is_none(),
        "no slot was created"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_toast_values_need_the_old_row_image() {
    let Some(env) = Env::start().await else {
        return;
    };
    // Incompressible text, large enough to be stored out of line.
    let big: String = {
        let mut rng = fastrand::Rng::with_seed(3);
        (0..20_000).map(|_| rng.alphanumeric()).collect()
    };
    env.db
        .execute(
            "INSERT INTO items (id, name, body) VALUES ('t', 'T', $1)",
            &[&big],
        )
        .await
        .unwrap();
    // With REPLICA IDENTITY FULL the old row carries the value.
    env.db
        .batch_execute("ALTER TABLE items REPLICA IDENTITY FULL")
        .await
        .unwrap();
    let slot = spoke::testing::unique_name("cdc_toast");
    let running = env.spawn(env.config(&slot));
    wait_snapshot_done(&env.db, &slot).await;
    env.db
        .batch_execute("UPDATE items SET qty = 7 WHERE id = 't'")
        .await
        .unwrap();
    env.converge(T).await;
    let entries = log(env.feed.as_ref(), "items").await;
    let last = entries.iter().rev().find(|e| e.change.key == "t").unwrap();
    assert_eq!(last.change.fields["qty"], 7);
    assert_eq!(
        last.change.fields["body"].as_str().map(str::len),
        Some(20_000)
    );
    running.stop().await;

    // With the default identity it does not: a clear error, not a lost value.
    env.db
        .batch_execute("ALTER TABLE items REPLICA IDENTITY DEFAULT")
        .await
        .unwrap();
    let running = env.spawn(env.config(&slot));
    env.db
        .batch_execute("UPDATE items SET qty = 8 WHERE id = 't'")
        .await
        .unwrap();
    let e = running.error(T).await;
    assert!(matches!(e, CdcError::Toast { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("'body'") && msg.contains("key 't'") && msg.contains("REPLICA IDENTITY FULL"),
        "{msg}"
    );
}
