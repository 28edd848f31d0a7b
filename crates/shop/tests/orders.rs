//! Order Service against the running shop: snapshotted prices, synchronous
//! inventory, and orders read back JOINed with the copy of customers.

use std::time::Duration;

use spoke_shop::customer::Customer;
use spoke_shop::demo::{Part, Shop};
use spoke_shop::web::CallError;

const CATCH_UP: Duration = Duration::from_secs(10);

fn customer(id: &str, name: &str) -> Customer {
    Customer {
        id: id.into(),
        name: name.into(),
        email: format!("{id}@example.com"),
        preferred_name: None,
        payment_method_id: "pm_test".into(),
    }
}

/// A running shop with `c` created and arrived in Order Service's copy.
async fn shop_with(c: &Customer) -> Shop {
    let shop = Shop::start().await.expect("the shop starts");
    let written = shop.create_customer(c).await.expect("customer created");
    shop.wait_for_copy(&c.id, CATCH_UP, |r| r.version >= written.version)
        .await
        .expect("the customer reaches the copy");
    shop
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_order_keeps_the_price_snapshotted_at_order_time() {
    let shop = shop_with(&customer("c-1", "Ada")).await;
    let before = shop.product("kb-01").await.unwrap().unit_price_cents;
    let first = shop.place_order("c-1", &[("kb-01", 2)]).await.unwrap();
    assert_eq!(first.lines[0].unit_price_cents, before);
    assert_eq!(first.lines[0].product_name, "Mechanical keyboard");
    assert_eq!(first.total_cents, 2 * before);

    let after = before + 555;
    shop.set_price("kb-01", after).await.unwrap();
    let reread = shop.order(first.id).await.unwrap();
    assert_eq!(
        reread.lines[0].unit_price_cents, before,
        "the stored order keeps its price"
    );
    assert_eq!(reread.total_cents, 2 * before);

    let second = shop.place_order("c-1", &[("kb-01", 1)]).await.unwrap();
    assert_eq!(
        second.lines[0].unit_price_cents, after,
        "a new order asks Catalog again"
    );
    let charges = shop.charges().await.unwrap();
    assert_eq!(
        charges.iter().map(|c| c.amount_cents).collect::<Vec<_>>(),
        vec![2 * before, after]
    );
    shop.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_order_while_inventory_is_down_is_refused() {
    let mut shop = shop_with(&customer("c-1", "Ada")).await;
    let stock = shop.stock("mn-27").await.unwrap().available;
    shop.stop_part(Part::Inventory).await.unwrap();

    let refused = shop.place_order("c-1", &[("mn-27", 1)]).await;
    match refused {
        Err(CallError::Refused { status, message }) => {
            assert_eq!(status, 503, "{message}");
            assert!(
                message.contains("inventory-service is unreachable"),
                "{message}"
            );
            assert!(message.contains("order refused"), "{message}");
        }
        other => panic!("expected a 503 refusal, got {other:?}"),
    }
    assert_eq!(
        shop.orders().unwrap().count_orders().await.unwrap(),
        0,
        "no order stored"
    );
    assert!(shop.charges().await.unwrap().is_empty(), "nobody charged");

    shop.start_part(Part::Inventory).await.unwrap();
    assert_eq!(
        shop.stock("mn-27").await.unwrap().available,
        stock,
        "stock untouched by the refused order"
    );
    let taken = shop.place_order("c-1", &[("mn-27", 1)]).await.unwrap();
    assert_eq!(taken.lines[0].sku, "mn-27");
    assert_eq!(shop.stock("mn-27").await.unwrap().available, stock - 1);
    shop.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_payment_gives_the_stock_back() {
    let shop = shop_with(&customer("c-1", "Ada")).await;
    let stock = shop.stock("mn-27").await.unwrap().available;
    // 5 monitors are above Payment's per-charge limit.
    match shop.place_order("c-1", &[("mn-27", 5)]).await {
        Err(CallError::Refused { status, message }) => {
            assert_eq!(status, 402, "{message}");
            assert!(message.contains("released"), "{message}");
        }
        other => panic!("expected a 402 refusal, got {other:?}"),
    }
    assert_eq!(shop.stock("mn-27").await.unwrap().available, stock);
    assert_eq!(shop.orders().unwrap().count_orders().await.unwrap(), 0);
    shop.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn getting_an_order_joins_the_copy_of_customers() {
    let c = customer("c-1", "Ada Lovelace");
    let shop = shop_with(&c).await;
    let placed = shop.place_order("c-1", &[("ms-01", 1)]).await.unwrap();
    let got = shop.order(placed.id).await.unwrap();
    let on_order = got.customer.clone().expect("the customer is in the copy");
    assert_eq!(
        (on_order.name.as_str(), on_order.version),
        ("Ada Lovelace", 1)
    );
    assert_eq!(on_order.email, "c-1@example.com");
    assert!(got.customer_copy.within_budget, "{:?}", got.customer_copy);
    assert!(
        got.customer_copy.staleness_ms.is_some_and(|s| s < 5_000),
        "{:?}",
        got.customer_copy
    );
    assert_eq!(got.customer_copy.staleness_budget, "1h");

    // A rename reaches the order through the copy: nothing was snapshotted.
    let mut renamed = c.clone();
    renamed.name = "Ada King".into();
    let w = shop.update_customer("c-1", &renamed.input()).await.unwrap();
    shop.wait_for_copy("c-1", CATCH_UP, |r| r.version >= w.version)
        .await
        .unwrap();
    let got = shop.order(placed.id).await.unwrap();
    let on_order = got.customer.expect("still in the copy");
    assert_eq!((on_order.name.as_str(), on_order.version), ("Ada King", 2));

    // A customer deleted by its owner disappears from the JOIN, not the order.
    let url = format!("{}/customers/c-1", shop.url(Part::Customer));
    reqwest::Client::new()
        .delete(url)
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap();
    Shop::wait_until(CATCH_UP, "the delete reaching the copy", || async {
        Ok(shop.copied("c-1").await?.is_none().then_some(()))
    })
    .await
    .unwrap();
    let got = shop.order(placed.id).await.unwrap();
    assert_eq!(got.customer, None);
    assert_eq!(got.lines.len(), 1);
    shop.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_customer_not_in_the_copy_cannot_order_and_the_copy_refuses_writes() {
    let shop = shop_with(&customer("c-1", "Ada")).await;
    match shop.place_order("c-nobody", &[("ms-01", 1)]).await {
        Err(CallError::Refused { status, message }) => {
            assert_eq!(status, 422, "{message}");
            assert!(message.contains("not in Order Service's copy"), "{message}");
        }
        other => panic!("expected a 422 refusal, got {other:?}"),
    }
    let e = shop
        .orders()
        .unwrap()
        .execute("UPDATE customers SET name = 'Mallory' WHERE id = 'c-1'")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains(spoke_shop::demo::READ_ONLY_MESSAGE), "{e}");
    let read = shop.copied("c-1").await.unwrap().unwrap();
    assert_eq!(read.fields["name"], "Ada");
    shop.shutdown().await.unwrap();
}
