//! One admission rule: the Lua `decide()` that the Redis scripts apply agrees with
//! `admission::decide` on every row of the shared decision table, run on a real Redis.

mod common;

use streamgate_sidecar::admission::{Decision, OverLimit, decision_table};
use streamgate_sidecar::policy::{Mode, OnLimitExceeded};

const COMMON_LUA: &str = include_str!("../../store/src/lua/common.lua");

#[tokio::test]
async fn the_lua_rule_follows_the_shared_decision_table() {
    let client = redis::Client::open(common::redis_env("STREAMGATE_TEST_REDIS")).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let script = redis::Script::new(&format!(
        // common.lua declares locals KEYS and ARGV (set by each function of the library), which
        // hide this script's own: keep a reference first.
        "local call_args = ARGV\n{COMMON_LUA}\nlocal d, e, w = decide(tonumber(call_args[1]), tonumber(call_args[2]), call_args[3], call_args[4])\nreturn {{d, e, w}}"
    ));
    let table = decision_table();
    assert!(table.len() >= 15);
    for row in table {
        let on_limit = match row.on_limit {
            OnLimitExceeded::RejectNew => "reject",
            OnLimitExceeded::EvictOldest => "evict",
        };
        let mode = match row.mode {
            Mode::Enforce => "enforce",
            Mode::DryRun => "dryrun",
        };
        let (decision, evict, would): (String, usize, String) = script
            .arg(row.active)
            .arg(row.limit)
            .arg(on_limit)
            .arg(mode)
            .invoke_async(&mut connection)
            .await
            .unwrap();
        let lua = match (decision.as_str(), would.as_str()) {
            ("admit", _) => Decision::Admit,
            ("refuse", _) => Decision::Refuse,
            ("evict", _) => Decision::AdmitEvicting(evict),
            ("dryrun", "refuse") => Decision::AdmitDryRun(OverLimit::Refuse),
            ("dryrun", "evict") => Decision::AdmitDryRun(OverLimit::Evict(evict)),
            other => panic!("unknown Lua decision {other:?}"),
        };
        assert_eq!(lua, row.expected, "{row:?}");
    }
}
