//! The committed media fixture and the playlists built on it (pure functions of the clock).

use std::fmt::Write;
use std::time::Duration;

/// The fixture's MPEG-TS segments (`media/segment{N}.ts`, made by `media/make.sh`): 2 s each of a
/// 320x180 H.264 Constrained Baseline picture, each starting with a keyframe.
pub const FIXTURE: [&[u8]; 4] = [
    include_bytes!("../media/segment0.ts"),
    include_bytes!("../media/segment1.ts"),
    include_bytes!("../media/segment2.ts"),
    include_bytes!("../media/segment3.ts"),
];

/// Duration of every fixture segment, in milliseconds.
pub const SEGMENT_MILLIS: u64 = 2000;

/// The codecs of the fixture, as an HLS `CODECS` / MSE type would name them.
pub const CODECS: &str = "avc1.42E01E";

/// Times the VOD playlist loops the fixture: 30 x 8 s = 4 minutes, longer than any player
/// buffers, so a test sees whether a player stops by itself or plays out a long buffer.
pub const VOD_LOOPS: u64 = 30;

/// Segments in the VOD playlist.
pub const VOD_SEGMENTS: u64 = VOD_LOOPS * FIXTURE.len() as u64;

/// Segments in the live-like playlist's sliding window (20 s: a player that falls behind, on a
/// busy machine, still finds its next segment listed).
pub const LIVE_WINDOW: u64 = 10;

/// The fixture segment behind a segment number of either playlist.
pub fn fixture_segment(number: u64) -> &'static [u8] {
    FIXTURE[(number % FIXTURE.len() as u64) as usize]
}

/// The bytes for a segment URI of either playlist: `segment{N}.ts` (VOD, N below
/// [`VOD_SEGMENTS`]) or `live{SEQ}.ts` (live-like, any media sequence number).
pub fn segment_for_uri(name: &str) -> Option<&'static [u8]> {
    let stem = name.strip_suffix(".ts")?;
    if let Some(n) = stem.strip_prefix("segment") {
        let n: u64 = n.parse().ok()?;
        (n < VOD_SEGMENTS).then(|| fixture_segment(n))
    } else {
        let seq: u64 = stem.strip_prefix("live")?.parse().ok()?;
        Some(fixture_segment(seq))
    }
}

fn header(m3u8: &mut String) {
    m3u8.push_str("#EXTM3U\n#EXT-X-VERSION:3\n");
    let _ = writeln!(
        m3u8,
        "#EXT-X-TARGETDURATION:{}",
        SEGMENT_MILLIS.div_ceil(1000)
    );
}

fn entry(m3u8: &mut String, uri: &str) {
    let _ = writeln!(
        m3u8,
        "#EXTINF:{}.{:03},\n{uri}",
        SEGMENT_MILLIS / 1000,
        SEGMENT_MILLIS % 1000
    );
}

/// The VOD playlist: the fixture [`VOD_LOOPS`] times; each loop restarts the timestamps, so it
/// is marked with `EXT-X-DISCONTINUITY`.
pub fn vod_playlist() -> String {
    let mut m3u8 = String::new();
    header(&mut m3u8);
    m3u8.push_str("#EXT-X-PLAYLIST-TYPE:VOD\n#EXT-X-MEDIA-SEQUENCE:0\n");
    for n in 0..VOD_SEGMENTS {
        if n > 0 && n % FIXTURE.len() as u64 == 0 {
            m3u8.push_str("#EXT-X-DISCONTINUITY\n");
        }
        entry(&mut m3u8, &format!("segment{n}.ts"));
    }
    m3u8.push_str("#EXT-X-ENDLIST\n");
    m3u8
}

/// The live-like playlist at `now` (time since the stream began): the [`LIVE_WINDOW`] segments
/// up to the one being "recorded" now, numbered by that clock so every reload agrees. A
/// discontinuity precedes each loop of the fixture; `EXT-X-DISCONTINUITY-SEQUENCE` counts those
/// before the window.
pub fn live_playlist(now: Duration) -> String {
    let loop_len = FIXTURE.len() as u64;
    // The newest complete segment is the one that ended before now.
    let newest = (now.as_millis() as u64 / SEGMENT_MILLIS).saturating_sub(1);
    let first = newest.saturating_sub(LIVE_WINDOW - 1);
    let mut m3u8 = String::new();
    header(&mut m3u8);
    let _ = writeln!(m3u8, "#EXT-X-MEDIA-SEQUENCE:{first}");
    let _ = writeln!(m3u8, "#EXT-X-DISCONTINUITY-SEQUENCE:{}", first / loop_len);
    for seq in first..=newest {
        if seq > first && seq % loop_len == 0 {
            m3u8.push_str("#EXT-X-DISCONTINUITY\n");
        }
        entry(&mut m3u8, &format!("live{seq}.ts"));
    }
    m3u8
}

#[cfg(test)]
mod tests {
    use super::*;

    /// MPEG-TS: 188-byte packets, each starting with the sync byte 0x47.
    #[test]
    fn fixture_segments_are_mpeg_ts() {
        for segment in FIXTURE {
            assert!(segment.len() > 10 * 188);
            assert_eq!(segment.len() % 188, 0);
            assert!(segment.chunks(188).all(|packet| packet[0] == 0x47));
        }
    }

    #[test]
    fn vod_playlist_loops_the_fixture_with_discontinuities() {
        let m3u8 = vod_playlist();
        assert!(m3u8.starts_with("#EXTM3U\n"));
        assert!(m3u8.ends_with("#EXT-X-ENDLIST\n"));
        assert_eq!(m3u8.matches("#EXTINF:2.000,").count() as u64, VOD_SEGMENTS);
        assert_eq!(
            m3u8.matches("#EXT-X-DISCONTINUITY\n").count() as u64,
            VOD_LOOPS - 1
        );
        assert!(m3u8.contains("#EXTINF:2.000,\nsegment3.ts\n#EXT-X-DISCONTINUITY\n"));
        let last = format!("segment{}.ts\n", VOD_SEGMENTS - 1);
        assert!(m3u8.contains(&last));
    }

    #[test]
    fn live_playlist_slides_with_the_clock() {
        // At 100.5 s the segment 50 (100..102 s) is still being recorded: 40..=49 are listed.
        let m3u8 = live_playlist(Duration::from_millis(100_500));
        assert!(m3u8.contains("#EXT-X-MEDIA-SEQUENCE:40\n"), "{m3u8}");
        // 40 / 4 = 10 loops began before the window; seqs 44 and 48 start the next ones.
        assert!(
            m3u8.contains("#EXT-X-DISCONTINUITY-SEQUENCE:10\n"),
            "{m3u8}"
        );
        assert!(m3u8.contains("live47.ts\n#EXT-X-DISCONTINUITY\n#EXTINF:2.000,\nlive48.ts\n"));
        assert_eq!(m3u8.matches("#EXT-X-DISCONTINUITY\n").count(), 2);
        assert_eq!(m3u8.matches("#EXTINF").count() as u64, LIVE_WINDOW);
        assert!(!m3u8.contains("ENDLIST"));
        // Two seconds later the window moved by one segment.
        let later = live_playlist(Duration::from_millis(102_500));
        assert!(later.contains("#EXT-X-MEDIA-SEQUENCE:41\n"));
        assert!(later.contains("live50.ts\n"));
    }

    #[test]
    fn a_window_starting_on_a_loop_boundary_has_no_leading_discontinuity() {
        // At 116 s the newest complete segment is 57, so the window starts at 48 = 12 x 4.
        let m3u8 = live_playlist(Duration::from_millis(116_000));
        assert!(m3u8.contains("#EXT-X-MEDIA-SEQUENCE:48\n"), "{m3u8}");
        // Counted by the sequence tag, not marked again; the next loops (52, 56) are marked.
        assert!(m3u8.contains("#EXT-X-DISCONTINUITY-SEQUENCE:12\n#EXTINF:2.000,\nlive48.ts\n"));
        assert_eq!(m3u8.matches("#EXT-X-DISCONTINUITY\n").count(), 2);
        assert!(m3u8.contains("#EXT-X-DISCONTINUITY\n#EXTINF:2.000,\nlive52.ts\n"));
    }

    #[test]
    fn segment_uris_map_to_fixture_segments() {
        assert_eq!(segment_for_uri("segment0.ts"), Some(FIXTURE[0]));
        assert_eq!(segment_for_uri("segment5.ts"), Some(FIXTURE[1]));
        assert_eq!(segment_for_uri("live1234567.ts"), Some(FIXTURE[3]));
        let past_the_end = format!("segment{VOD_SEGMENTS}.ts");
        for bad in [
            past_the_end.as_str(),
            "segment.ts",
            "segment-1.ts",
            "live.ts",
            "segment0.mp4",
            "index.m3u8",
        ] {
            assert_eq!(segment_for_uri(bad), None, "{bad}");
        }
    }
}
