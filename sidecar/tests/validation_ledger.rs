//! The validation ledger's contract, on every ledger: the in-memory one, Redis and Redis
//! Cluster (real servers). Checks are claimed when due, leased, claimed again when the lease
//! runs out, and gone when done; records round-trip and expire.

mod common;

use std::sync::Arc;
use std::time::Duration;

use streamgate_sidecar::session::{SessionId, ValidationState};
use streamgate_sidecar::store::RedisTarget;
use streamgate_sidecar::validation::{
    MemoryLedger, RedisLedger, RequestFacts, ValidationLedger, ValidationRecord,
};

fn ledgers() -> Vec<(&'static str, Arc<dyn ValidationLedger>)> {
    let namespace = format!("ledger-{:08x}", rand::random::<u32>());
    let redis = |env: &str| -> Arc<dyn ValidationLedger> {
        Arc::new(RedisLedger::new(
            RedisTarget::parse(&common::redis_env(env)).unwrap(),
            &namespace,
            Duration::from_secs(2),
        ))
    };
    vec![
        ("memory", Arc::new(MemoryLedger::default())),
        ("redis", redis("STREAMGATE_TEST_REDIS")),
        ("redis-cluster", redis("STREAMGATE_TEST_REDIS_CLUSTER")),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn due_checks_are_claimed_once_per_lease_and_records_round_trip() {
    for (name, ledger) in ledgers() {
        let (due, later) = (SessionId::for_account("a"), SessionId::for_account("b"));
        ledger.schedule(due, Duration::ZERO).await.unwrap();
        ledger
            .schedule(later, Duration::from_secs(60))
            .await
            .unwrap();
        let lease = Duration::from_millis(300);
        let claimed = ledger.claim(lease, 10).await.unwrap();
        assert_eq!(claimed, [due], "{name}");
        assert!(
            ledger.claim(lease, 10).await.unwrap().is_empty(),
            "{name}: leased"
        );
        // Another claimant gets it once the lease has run out.
        common::eventually("the lease runs out", async || {
            ledger.claim(lease, 10).await.unwrap() == [due]
        })
        .await;
        ledger.done(due).await.unwrap();
        ledger.done(later).await.unwrap();
        assert_eq!(ledger.scheduled().await.unwrap(), 0, "{name}");

        let mut facts = RequestFacts::default();
        facts.client.user_agent = Some("Player/1.0".into());
        let record = ValidationRecord {
            state: ValidationState::Denied,
            validator: Some("geo".into()),
            message: Some("not here".into()),
            facts,
            admitted_at_ms: 1,
            checks: 1,
        };
        let ttl = Duration::from_secs(60);
        ledger.put(due, &record, ttl).await.unwrap();
        assert_eq!(ledger.get(due, ttl).await.unwrap(), Some(record), "{name}");
        assert_eq!(ledger.get(later, ttl).await.unwrap(), None, "{name}");
        ledger
            .put(
                later,
                &ledger.get(due, ttl).await.unwrap().unwrap(),
                Duration::from_millis(50),
            )
            .await
            .unwrap();
        common::eventually("the record expires", async || {
            ledger
                .get(later, Duration::from_millis(50))
                .await
                .unwrap()
                .is_none()
        })
        .await;
    }
}

/// The operator's reader (store crate) finds the states the sidecars' ledger writes, one MGET
/// per page on Redis and Redis Cluster, and reading does not keep a record alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operators_reader_sees_the_ledgers_records_without_renewing_them() {
    use streamgate_sidecar::store::validation_record::ValidationReader;
    for env in ["STREAMGATE_TEST_REDIS", "STREAMGATE_TEST_REDIS_CLUSTER"] {
        let namespace = format!("reader-{:08x}", rand::random::<u32>());
        let target = RedisTarget::parse(&common::redis_env(env)).unwrap();
        let ledger = RedisLedger::new(target.clone(), &namespace, Duration::from_secs(2));
        let reader = ValidationReader::new(target, Duration::from_secs(2));
        let record = |state| ValidationRecord {
            state,
            validator: Some("entitlement".into()),
            message: None,
            facts: RequestFacts::default(),
            admitted_at_ms: 0,
            checks: 1,
        };
        let (allowed, denied, unchecked, short) = (
            SessionId::for_account("a"),
            SessionId::for_account("b"),
            SessionId::for_account("c"),
            SessionId::for_account("d"),
        );
        let long = Duration::from_secs(60);
        ledger
            .put(allowed, &record(ValidationState::Allowed), long)
            .await
            .unwrap();
        ledger
            .put(denied, &record(ValidationState::Denied), long)
            .await
            .unwrap();
        let ids: Vec<String> = [allowed, denied, unchecked]
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            reader.states(&namespace, &ids).await.unwrap(),
            [
                Some(ValidationState::Allowed),
                Some(ValidationState::Denied),
                None
            ],
            "{env}"
        );
        assert_eq!(
            reader.states("other-namespace", &ids).await.unwrap(),
            [None, None, None],
            "{env}: records are per namespace"
        );

        ledger
            .put(
                short,
                &record(ValidationState::Pending),
                Duration::from_millis(500),
            )
            .await
            .unwrap();
        let short = [short.to_string()];
        assert_eq!(
            reader.states(&namespace, &short).await.unwrap(),
            [Some(ValidationState::Pending)]
        );
        // Read over and over, it still expires with its TTL.
        common::eventually("the record expires although read", async || {
            reader.states(&namespace, &short).await.unwrap() == [None]
        })
        .await;
    }
}

/// Each validator call is one script run on the namespace's slot; the operator's reader sees
/// the counts (a denial is an answer, not a failure), and old counters do not pile up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validator_calls_are_counted_for_the_operator_and_old_counters_go() {
    use streamgate_sidecar::validation::FailureKind;
    use streamgate_store::validation_record::ValidationReader;
    use streamgate_store::validator_health::{TTL, validator_health_key};
    for env in ["STREAMGATE_TEST_REDIS", "STREAMGATE_TEST_REDIS_CLUSTER"] {
        let namespace = format!("health-{:08x}", rand::random::<u32>());
        let target = RedisTarget::parse(&common::redis_env(env)).unwrap();
        let ledger = RedisLedger::new(target.clone(), &namespace, Duration::from_secs(2));
        // Counters of long-gone minutes, as a validator called an hour ago would have left.
        let key = validator_health_key(&namespace, "vip", "geo");
        let url = common::redis_env("STREAMGATE_TEST_REDIS");
        if env == "STREAMGATE_TEST_REDIS" {
            let mut c = redis::Client::open(url.as_str())
                .unwrap()
                .get_connection()
                .unwrap();
            for minute in 1..40 {
                let _: () = redis::cmd("HSET")
                    .arg(&key)
                    .arg(format!("ok:{minute}"))
                    .arg(1)
                    .query(&mut c)
                    .unwrap();
            }
        }
        for failure in [
            None,
            None,
            Some(FailureKind::Timeout),
            Some(FailureKind::Http(503)),
        ] {
            ledger.record_call("vip", "geo", failure).await.unwrap();
        }
        let reader = ValidationReader::new(target, Duration::from_secs(2));
        let pairs = [
            ("vip".to_string(), "geo".to_string()),
            ("vip".to_string(), "never-called".to_string()),
        ];
        let stats = reader.validator_health(&namespace, &pairs).await.unwrap();
        assert_eq!((stats[0].answered, stats[0].failed), (2, 2), "{env}");
        assert_eq!(
            stats[0].last_failure.as_ref().unwrap().1,
            "HTTP 503",
            "{env}"
        );
        assert!(stats[0].failing_since <= stats[0].last_failure.as_ref().map(|f| f.0));
        assert!(!stats[1].called(), "{env}");
        if env == "STREAMGATE_TEST_REDIS" {
            let mut c = redis::Client::open(url.as_str())
                .unwrap()
                .get_connection()
                .unwrap();
            let fields: usize = redis::cmd("HLEN").arg(&key).query(&mut c).unwrap();
            assert!(fields <= 8, "old counters dropped: {fields} fields left");
            let ttl: i64 = redis::cmd("PTTL").arg(&key).query(&mut c).unwrap();
            assert!(ttl > 0 && ttl <= TTL.as_millis() as i64, "expires: {ttl}");
        }
    }
}
