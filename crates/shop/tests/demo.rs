//! `spoke demo` end to end: every step must hold.

use spoke_shop::demo;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_step_of_the_demo_holds() {
    let mut out: Vec<u8> = Vec::new();
    let report = demo::run(&mut out).await.expect("the demo runs");
    let narration = String::from_utf8_lossy(&out);
    let numbers: Vec<usize> = report.steps.iter().map(|s| s.number).collect();
    assert_eq!(
        numbers,
        (1..=9).collect::<Vec<_>>(),
        "nine steps ran\n{narration}"
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
    assert!(
        narration.contains("Summary") && narration.contains("9 of 9 steps held"),
        "{narration}"
    );
    assert!(
        narration.contains(demo::READ_ONLY_MESSAGE),
        "step 7 shows the refusal\n{narration}"
    );
    assert!(
        narration.contains("repaired stale   c-ada")
            && narration.contains("repaired missing c-alan")
            && narration.contains("repaired extra   c-mallory"),
        "step 8 lists the three repairs\n{narration}"
    );
    let ttl = &report.steps[8];
    assert_eq!(ttl.failures, Vec::<String>::new());
    for claim in [
        "a miss, read from Catalog → \"Peripherals\"",
        "second read: a cache hit",
        "Catalog counted 2 category reads for 22 reads",
        "is read from Catalog again (3 Catalog reads in all)",
    ] {
        assert!(
            narration.contains(claim),
            "step 9 shows {claim:?}\n{narration}"
        );
    }
    assert!(
        ttl.measured.contains("23 reads, 3 Catalog calls"),
        "{}",
        ttl.measured
    );
    assert!(
        report.elapsed_ms < 20_000,
        "the demo took {} ms\n{narration}",
        report.elapsed_ms
    );
}
