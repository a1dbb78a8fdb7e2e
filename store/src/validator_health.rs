//! How each session validator has been answering lately, kept next to the validation records
//! (same hash tag, `{sg-validation:NAMESPACE}`): the sidecars count every call's outcome, the
//! operator reads the counts to say on the StreamingPolicy's status which validator has been
//! failing (the sidecars have no Kubernetes API access).
//!
//! One Redis hash per namespace, policy and validator, `…:health:POLICY:VALIDATOR`, with
//! per-minute counters (`ok:MINUTE`, `fail:MINUTE`, minutes of the Redis server's clock so the
//! sidecars' and the operator's clocks do not matter), `lastOkAt`, `lastFailAt`, `lastFailKind`
//! and `failingSince` (the first failure after [`WINDOW`] without any). Each call is one script
//! run; counters older than the window are dropped as the hash grows, and the hash expires
//! [`TTL`] after the validator was last called. A denial is an answer, not a failure.

use std::collections::HashMap;
use std::time::Duration;

/// The span the counts cover: the current minute and the four before it.
pub const WINDOW: Duration = Duration::from_secs(5 * 60);

/// Minutes of counters kept, current one included.
pub const WINDOW_MINUTES: i64 = 5;

/// How long a validator's hash outlives its last call.
pub const TTL: Duration = Duration::from_secs(15 * 60);

/// Longest failure kind stored (the sidecar's own labels are much shorter).
pub const MAX_KIND_LEN: usize = 64;

/// The key of `validator`'s health in `policy` of `namespace`. Policy and validator names are
/// Kubernetes names (no `:`), so the key names one pair.
pub fn validator_health_key(namespace: &str, policy: &str, validator: &str) -> String {
    format!(
        "{}:health:{policy}:{validator}",
        crate::validation_record::validation_key_prefix(namespace)
    )
}

/// Records one call's outcome. KEYS[1] the health hash; ARGV[1] `1` for a failure, `0` for an
/// answer; ARGV[2] the failure's kind; ARGV[3] the window in ms; ARGV[4] the TTL in ms; ARGV[5]
/// the minutes of counters to keep.
pub const RECORD_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local minute = math.floor(now / 60000)
if ARGV[1] == '1' then
  redis.call('HINCRBY', KEYS[1], 'fail:' .. minute, 1)
  local last = tonumber(redis.call('HGET', KEYS[1], 'lastFailAt'))
  if (not last) or now - last > tonumber(ARGV[3]) then
    redis.call('HSET', KEYS[1], 'failingSince', now)
  end
  redis.call('HSET', KEYS[1], 'lastFailAt', now, 'lastFailKind', ARGV[2])
else
  redis.call('HINCRBY', KEYS[1], 'ok:' .. minute, 1)
  redis.call('HSET', KEYS[1], 'lastOkAt', now)
end
if redis.call('HLEN', KEYS[1]) > 4 * tonumber(ARGV[5]) + 4 then
  local oldest = minute - tonumber(ARGV[5]) + 1
  for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
    local m = tonumber(string.match(field, '^%a+:(%d+)$'))
    if m and m < oldest then
      redis.call('HDEL', KEYS[1], field)
    end
  end
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[4]))
return 1
";

/// Reads health hashes. KEYS the hashes (one slot: one namespace). Returns the Redis server's
/// time in ms, then each hash's HGETALL.
pub const READ_LUA: &str = r"
local t = redis.call('TIME')
local out = { tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) }
for i, key in ipairs(KEYS) do
  out[i + 1] = redis.call('HGETALL', key)
end
return out
";

/// What the store says about one validator's recent calls.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ValidatorStats {
    /// Calls that got an answer (allow or deny) within [`WINDOW`].
    pub answered: u64,
    /// Calls that got none (timeout, connection error, 5xx, malformed answer) within [`WINDOW`].
    pub failed: u64,
    /// The last failure: when (ms, Redis server clock) and its kind, as stored (untrusted text).
    pub last_failure: Option<(i64, String)>,
    /// The first failure after a failure-free [`WINDOW`] (ms).
    pub failing_since: Option<i64>,
    /// The last answer (ms).
    pub last_answer_at: Option<i64>,
    /// The Redis server's time when read (ms).
    pub now_ms: i64,
}

impl ValidatorStats {
    /// Whether anything was recorded within the window.
    pub fn called(&self) -> bool {
        self.answered + self.failed > 0
    }
}

/// The stats of a health hash's fields (`HGETALL` pairs) read at `now_ms`. Fields it does not
/// know, counters outside the window and unparsable numbers are ignored.
pub fn stats_from_fields(fields: &HashMap<String, String>, now_ms: i64) -> ValidatorStats {
    let minute = now_ms.div_euclid(60_000);
    let in_window = |m: i64| m <= minute && m > minute - WINDOW_MINUTES;
    let mut stats = ValidatorStats {
        now_ms,
        ..Default::default()
    };
    let number = |name: &str| fields.get(name).and_then(|v| v.parse::<i64>().ok());
    for (field, value) in fields {
        let Some((counter, m)) = field.split_once(':') else {
            continue;
        };
        let (Ok(m), Ok(n)) = (m.parse::<i64>(), value.parse::<u64>()) else {
            continue;
        };
        if !in_window(m) {
            continue;
        }
        match counter {
            "ok" => stats.answered = stats.answered.saturating_add(n),
            "fail" => stats.failed = stats.failed.saturating_add(n),
            _ => {}
        }
    }
    if let Some(at) = number("lastFailAt") {
        let kind = fields.get("lastFailKind").cloned().unwrap_or_default();
        stats.last_failure = Some((at, kind.chars().take(MAX_KIND_LEN).collect()));
    }
    stats.failing_since = number("failingSince");
    stats.last_answer_at = number("lastOkAt");
    stats
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_key_per_policy_and_validator_in_the_namespaces_slot() {
        assert_eq!(
            validator_health_key("streaming", "vip", "geo"),
            "{sg-validation:streaming}:health:vip:geo"
        );
    }

    #[test]
    fn only_counters_of_the_window_count() {
        let now = 100 * 60_000 + 5_000;
        let fields: HashMap<String, String> = [
            ("ok:100", "2"),
            ("ok:96", "1"),
            ("ok:95", "50"),
            ("fail:99", "3"),
            ("fail:101", "7"),
            ("fail:x", "9"),
            ("lastFailAt", "6000123"),
            ("lastFailKind", "timeout"),
            ("failingSince", "5000000"),
            ("other", "1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let stats = stats_from_fields(&fields, now);
        assert_eq!((stats.answered, stats.failed), (3, 3));
        assert_eq!(stats.last_failure, Some((6_000_123, "timeout".into())));
        assert_eq!(stats.failing_since, Some(5_000_000));
        assert!(stats.called());
        assert!(!stats_from_fields(&HashMap::new(), now).called());
    }
}
