//! A session's media use as every sidecar sees it: the client networks it was used from
//! (sharing detection) and the long-lived responses it has in flight (one session, one stream).
//!
//! A viewer's requests reach any sidecar of the service, so neither rule can be kept by one
//! sidecar alone: two players on one session behind two sidecars would each look like the only
//! one. The store keeps both per session, next to the session itself, and forgets them when the
//! session stops being active. The rules are the pure functions here; the memory store runs them
//! directly and the Redis store's scripts (`lua/media.lua`) mirror them, and the contract suite
//! holds both to the same answers.
//!
//! A long-lived response holds a *lease*, renewed while it streams and released when it ends,
//! so a sidecar that dies mid-stream blocks the session's next stream for one lease at most.

/// A client network as the store records it: the /64 of an IPv6 address, or the /24 of an IPv4
/// address as `0:0:0:0:0:a:b:c` (inside `::/8`, where no IPv6 network a client uses lives).
pub type NetworkKey = [u8; 8];

/// One long-lived response, as its claim on a session's streams is recorded: random per
/// response.
pub type StreamHolder = [u8; 8];

/// Networks remembered per session at most, whatever the policy allows (`maxNetworks` is at
/// most 100): the rule needs only to know that there is one more than allowed.
pub const MAX_NETWORKS_KEPT: u32 = 101;

/// What a claim on a session's streams found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamClaim {
    /// The claim holds (new or renewed) until one lease from now.
    Held {
        /// The session's long-lived responses in flight, this one included.
        streams: u32,
    },
    /// The session already has its maximum of long-lived responses in flight elsewhere.
    Full {
        /// The session's long-lived responses in flight.
        streams: u32,
    },
    /// The session is not active (cut, ended, expired or unknown).
    Gone,
}

/// One session's media use.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MediaUse {
    /// Networks seen, with when each was last seen (ms), most recent first.
    pub networks: Vec<(NetworkKey, i64)>,
    /// Long-lived responses in flight, with when each claim lapses unless renewed (ms).
    pub streams: Vec<(StreamHolder, i64)>,
}

impl MediaUse {
    /// Records a use from `network` at `now_ms` and forgets networks not seen within
    /// `window_ms`, keeping at most `keep` (at least 1, at most [`MAX_NETWORKS_KEPT`]), the
    /// most recent. Returns the distinct networks remembered, this one included.
    pub fn note_network(
        &mut self,
        network: NetworkKey,
        now_ms: i64,
        window_ms: i64,
        keep: u32,
    ) -> u32 {
        let keep = keep.clamp(1, MAX_NETWORKS_KEPT) as usize;
        self.networks.sort_by_key(|n| std::cmp::Reverse(n.1));
        let mut kept = vec![(network, now_ms)];
        kept.extend(
            self.networks
                .iter()
                .filter(|(n, seen)| *n != network && *seen > now_ms - window_ms)
                .take(keep - 1),
        );
        self.networks = kept;
        self.networks.len() as u32
    }

    /// Claims (or renews the claim of) `holder` on one of the session's at most `max`
    /// long-lived responses until `now_ms + lease_ms`, after forgetting claims that lapsed.
    pub fn claim_stream(
        &mut self,
        holder: StreamHolder,
        now_ms: i64,
        lease_ms: i64,
        max: u32,
    ) -> StreamClaim {
        self.streams.retain(|(_, until)| *until > now_ms);
        let until = now_ms + lease_ms;
        if let Some(claim) = self.streams.iter_mut().find(|(h, _)| *h == holder) {
            claim.1 = until;
        } else if self.streams.len() < max as usize {
            self.streams.push((holder, until));
        } else {
            return StreamClaim::Full {
                streams: self.streams.len() as u32,
            };
        }
        StreamClaim::Held {
            streams: self.streams.len() as u32,
        }
    }

    /// Drops `holder`'s claim (its response ended).
    pub fn release_stream(&mut self, holder: StreamHolder) {
        self.streams.retain(|(h, _)| *h != holder);
    }

    /// True when nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.networks.is_empty() && self.streams.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: NetworkKey = [0, 0, 0, 0, 0, 203, 0, 113];
    const B: NetworkKey = [0, 0, 0, 0, 0, 198, 51, 100];
    const C: NetworkKey = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 1];

    #[test]
    fn networks_are_counted_once_each_within_the_window() {
        let mut media = MediaUse::default();
        assert_eq!(media.note_network(A, 1_000, 60_000, 10), 1);
        assert_eq!(media.note_network(A, 2_000, 60_000, 10), 1);
        assert_eq!(media.note_network(B, 3_000, 60_000, 10), 2);
        assert_eq!(media.note_network(C, 4_000, 60_000, 10), 3);
        // A was last seen at 2 s: past the window at 62 s, B and C still in it.
        assert_eq!(media.note_network(B, 62_500, 60_000, 10), 2);
        assert_eq!(media.networks.len(), 2);
    }

    #[test]
    fn only_the_most_recent_networks_are_kept() {
        let mut media = MediaUse::default();
        media.note_network(A, 1_000, 60_000, 2);
        media.note_network(B, 2_000, 60_000, 2);
        assert_eq!(media.note_network(C, 3_000, 60_000, 2), 2);
        assert_eq!(media.networks, vec![(C, 3_000), (B, 2_000)]);
    }

    #[test]
    fn a_claim_holds_until_its_lease_lapses_and_renews_in_place() {
        let mut media = MediaUse::default();
        let (one, two) = ([1; 8], [2; 8]);
        assert_eq!(
            media.claim_stream(one, 0, 15_000, 1),
            StreamClaim::Held { streams: 1 }
        );
        assert_eq!(
            media.claim_stream(two, 1_000, 15_000, 1),
            StreamClaim::Full { streams: 1 }
        );
        // Renewed by its holder: still one claim, lasting longer.
        assert_eq!(
            media.claim_stream(one, 10_000, 15_000, 1),
            StreamClaim::Held { streams: 1 }
        );
        assert_eq!(
            media.claim_stream(two, 20_000, 15_000, 1),
            StreamClaim::Full { streams: 1 }
        );
        // Its holder died: the lease lapses and the next stream gets it.
        assert_eq!(
            media.claim_stream(two, 25_000, 15_000, 1),
            StreamClaim::Held { streams: 1 }
        );
        media.release_stream(two);
        assert!(media.is_empty());
    }

    #[test]
    fn a_session_may_hold_up_to_its_maximum_of_streams() {
        let mut media = MediaUse::default();
        for (n, holder) in [[1; 8], [2; 8], [3; 8]].into_iter().enumerate() {
            assert_eq!(
                media.claim_stream(holder, 0, 15_000, 3),
                StreamClaim::Held {
                    streams: n as u32 + 1
                }
            );
        }
        assert_eq!(
            media.claim_stream([4; 8], 0, 15_000, 3),
            StreamClaim::Full { streams: 3 }
        );
        media.release_stream([2; 8]);
        assert_eq!(
            media.claim_stream([4; 8], 0, 15_000, 3),
            StreamClaim::Held { streams: 3 }
        );
    }
}
