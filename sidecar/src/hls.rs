//! HLS playlists passing through the enforcing proxy get the playback token added to every URI
//! they hold, so native players (which cannot set headers) carry it on each request.
//!
//! The rewriter works line by line (RFC 8216 section 4.1): a line not starting with `#` is a
//! URI (a segment or a variant stream); a tag line's `URI="..."` attribute is a URI too
//! (`EXT-X-KEY`, `EXT-X-SESSION-KEY`, `EXT-X-MAP`, `EXT-X-MEDIA` renditions,
//! `EXT-X-I-FRAME-STREAM-INF`, `EXT-X-PART`, `EXT-X-PRELOAD-HINT`, `EXT-X-RENDITION-REPORT`,
//! `EXT-X-SESSION-DATA`). Every other byte is kept as it was: tags this code does not know,
//! comments, attribute order, line endings. A full parse and re-serialization would drop or
//! reorder what its model does not cover; the proxy must pass the origin's playlist on
//! faithfully.
//!
//! Only URIs that come back through this proxy get the token: relative ones, and absolute ones
//! naming the host the playlist was fetched from. A URI to another host (a CDN, a key server)
//! is left alone, so the token is not handed to third parties; nor are `data:` or `skd:` URIs.

/// The query parameter carrying the playback token.
pub const TOKEN_PARAM: &str = "sg";

/// Whether a response is an HLS playlist, by its content type or, failing that, the path.
pub fn is_playlist(path: &str, content_type: Option<&str>) -> bool {
    let media_type = content_type
        .map(|ct| {
            ct.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    matches!(
        media_type.as_str(),
        "application/vnd.apple.mpegurl" | "application/x-mpegurl" | "audio/mpegurl"
    ) || path.to_ascii_lowercase().ends_with(".m3u8")
}

/// Whether a request path looks like a playlist; such requests are fetched uncompressed so
/// they can be rewritten.
pub fn looks_like_playlist(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    lower.ends_with(".m3u8") || lower.ends_with(".m3u")
}

/// What a playlist is, for how long the tokens written into it must live.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PlaylistKind {
    /// A master (multivariant) playlist: its variant and rendition playlists are fetched with
    /// the token written here, possibly much later (a switch of quality or language), and a
    /// live variant is re-fetched with it for as long as the viewer watches.
    Master,
    /// A media playlist with `#EXT-X-ENDLIST` (VOD, or a live event that ended): a player loads
    /// it once and fetches its segments with the token written here until the end.
    Ended {
        /// The sum of its segments' `#EXTINF` durations, in seconds.
        duration_seconds: f64,
    },
    /// A live media playlist: the player re-fetches it every target duration and so gets fresh
    /// tokens as it goes.
    Live,
}

/// Classifies `playlist` (RFC 8216 section 4): master if it has a tag only master playlists
/// have, else ended if it has `#EXT-X-ENDLIST`, else live.
pub fn classify(playlist: &str) -> PlaylistKind {
    const MASTER_TAGS: [&str; 5] = [
        "#EXT-X-STREAM-INF",
        "#EXT-X-I-FRAME-STREAM-INF",
        "#EXT-X-MEDIA:",
        "#EXT-X-SESSION-DATA",
        "#EXT-X-SESSION-KEY",
    ];
    let mut ended = false;
    let mut duration_seconds = 0.0_f64;
    for line in playlist.lines() {
        let line = line.trim();
        if MASTER_TAGS.iter().any(|tag| line.starts_with(tag)) {
            return PlaylistKind::Master;
        }
        if line.starts_with("#EXT-X-ENDLIST") {
            ended = true;
        } else if let Some(rest) = line.strip_prefix("#EXTINF:") {
            let seconds = rest.split(',').next().unwrap_or("").trim();
            // A malformed or absurd duration adds nothing; the lifetime is capped anyway.
            if let Ok(seconds) = seconds.parse::<f64>()
                && seconds.is_finite()
                && seconds > 0.0
            {
                duration_seconds += seconds;
            }
        }
    }
    if ended {
        PlaylistKind::Ended { duration_seconds }
    } else {
        PlaylistKind::Live
    }
}

/// `playlist` with `token` added to every URI that comes back through this proxy (see the
/// module docs). `host` is the `Host` the playlist was requested with.
pub fn rewrite(playlist: &str, token: &str, host: Option<&str>) -> String {
    let mut out = String::with_capacity(playlist.len() + 64);
    for line in playlist.split_inclusive('\n') {
        let (content, ending) = split_ending(line);
        let trimmed = content.trim();
        if trimmed.is_empty() {
            out.push_str(line);
        } else if trimmed.starts_with("#EXT") {
            out.push_str(&rewrite_tag(content, token, host));
            out.push_str(ending);
        } else if trimmed.starts_with('#') {
            out.push_str(line);
        } else {
            let start = content.len() - content.trim_start().len();
            let end = start + trimmed.len();
            out.push_str(&content[..start]);
            out.push_str(&with_token(trimmed, token, host));
            out.push_str(&content[end..]);
            out.push_str(ending);
        }
    }
    out
}

fn split_ending(line: &str) -> (&str, &str) {
    if let Some(content) = line.strip_suffix("\r\n") {
        (content, "\r\n")
    } else if let Some(content) = line.strip_suffix('\n') {
        (content, "\n")
    } else {
        (line, "")
    }
}

/// Rewrites the value of every `URI="..."` attribute of a tag line. An attribute name starts
/// after the tag's `:` or after a `,` outside quotes, so `URI=` inside another attribute's
/// quoted value is not mistaken for one.
fn rewrite_tag(line: &str, token: &str, host: Option<&str>) -> String {
    let Some(colon) = line.find(':') else {
        return line.to_string();
    };
    let mut out = String::with_capacity(line.len() + 64);
    out.push_str(&line[..=colon]);
    let rest = &line[colon + 1..];
    let mut at_name = true;
    let mut in_quotes = false;
    let mut i = 0;
    let bytes = rest.as_bytes();
    while i < bytes.len() {
        if at_name && !in_quotes && rest[i..].starts_with("URI=\"") {
            let value_start = i + 5;
            if let Some(len) = rest[value_start..].find('"') {
                let value = &rest[value_start..value_start + len];
                out.push_str("URI=\"");
                out.push_str(&with_token(value, token, host));
                out.push('"');
                i = value_start + len + 1;
                at_name = false;
                continue;
            }
        }
        let c = bytes[i];
        match c {
            b'"' => in_quotes = !in_quotes,
            b',' if !in_quotes => {
                at_name = true;
                out.push(',');
                i += 1;
                continue;
            }
            _ => {}
        }
        at_name = false;
        // Copy one whole character (attribute values may hold UTF-8).
        let next = rest[i..]
            .char_indices()
            .nth(1)
            .map_or(rest.len(), |(n, _)| i + n);
        out.push_str(&rest[i..next]);
        i = next;
    }
    out
}

/// Whether `uri` is fetched through this proxy: relative, or absolute on `host`.
fn comes_back_here(uri: &str, host: Option<&str>) -> bool {
    let lower = uri.to_ascii_lowercase();
    if let Some(rest) = lower
        .strip_prefix("http://")
        .or_else(|| lower.strip_prefix("https://"))
    {
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        return host.is_some_and(|h| h.eq_ignore_ascii_case(authority));
    }
    if let Some(rest) = lower.strip_prefix("//") {
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        return host.is_some_and(|h| h.eq_ignore_ascii_case(authority));
    }
    // Any other scheme (`data:`, `skd:`, ...) is not ours. A scheme is letters, digits, `+`,
    // `-`, `.` before the first `:`, and comes before any `/`, `?` or `#`.
    let before_delimiter = lower.split(['/', '?', '#']).next().unwrap_or("");
    if let Some((scheme, _)) = before_delimiter.split_once(':')
        && !scheme.is_empty()
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
    {
        return false;
    }
    true
}

/// `uri` with `sg=<token>` in its query (replacing one already there), before any fragment.
fn with_token(uri: &str, token: &str, host: Option<&str>) -> String {
    if !comes_back_here(uri, host) {
        return uri.to_string();
    }
    let (before_fragment, fragment) = match uri.find('#') {
        Some(at) => (&uri[..at], &uri[at..]),
        None => (uri, ""),
    };
    let (path, query) = match before_fragment.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (before_fragment, None),
    };
    let mut pairs: Vec<&str> = query
        .map(|q| {
            q.split('&')
                .filter(|p| !p.is_empty() && p.split('=').next() != Some(TOKEN_PARAM))
                .collect()
        })
        .unwrap_or_default();
    let param = format!("{TOKEN_PARAM}={token}");
    pairs.push(&param);
    format!("{path}?{}{fragment}", pairs.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "v1.k.p.s";

    #[test]
    fn segment_and_variant_uris_get_the_token() {
        let media = "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:4\n#EXTINF:4.0,\nsegment0.ts\n#EXTINF:4.0,title, with comma\nsub/segment1.ts?x=1\n#EXT-X-ENDLIST\n";
        let out = rewrite(media, T, Some("edge:8080"));
        assert_eq!(
            out,
            "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:4\n#EXTINF:4.0,\nsegment0.ts?sg=v1.k.p.s\n#EXTINF:4.0,title, with comma\nsub/segment1.ts?x=1&sg=v1.k.p.s\n#EXT-X-ENDLIST\n"
        );
    }

    #[test]
    fn uri_attributes_of_keys_maps_and_renditions_get_the_token() {
        let master = "#EXTM3U\r\n#EXT-X-MEDIA:TYPE=AUDIO,GROUP-ID=\"aud\",NAME=\"English, URI=x\",URI=\"audio/en.m3u8\"\r\n#EXT-X-STREAM-INF:BANDWIDTH=800000,AUDIO=\"aud\"\r\nlow/index.m3u8\r\n#EXT-X-I-FRAME-STREAM-INF:BANDWIDTH=100000,URI=\"low/iframes.m3u8\"\r\n";
        let out = rewrite(master, T, None);
        assert!(
            out.contains(",URI=\"audio/en.m3u8?sg=v1.k.p.s\"\r\n"),
            "{out}"
        );
        assert!(out.contains("\r\nlow/index.m3u8?sg=v1.k.p.s\r\n"), "{out}");
        assert!(
            out.contains("URI=\"low/iframes.m3u8?sg=v1.k.p.s\""),
            "{out}"
        );
        let media = "#EXT-X-KEY:METHOD=AES-128,URI=\"https://edge:8080/keys/k1?v=2\",IV=0x1\n#EXT-X-MAP:URI=\"init.mp4\",BYTERANGE=\"700@0\"\n#EXT-X-KEY:METHOD=SAMPLE-AES,URI=\"skd://key-id\"\n#EXT-X-KEY:METHOD=AES-128,URI=\"https://keys.example.com/k\"\n";
        let out = rewrite(media, T, Some("edge:8080"));
        assert!(out.contains("URI=\"https://edge:8080/keys/k1?v=2&sg=v1.k.p.s\",IV=0x1\n"));
        assert!(out.contains("#EXT-X-MAP:URI=\"init.mp4?sg=v1.k.p.s\",BYTERANGE=\"700@0\""));
        // Not fetched through us: left alone, the token is not handed out.
        assert!(out.contains("URI=\"skd://key-id\""));
        assert!(out.contains("URI=\"https://keys.example.com/k\""));
    }

    #[test]
    fn an_old_token_is_replaced_and_fragments_and_comments_kept() {
        let out = rewrite("# a comment: seg.ts\nseg.ts?sg=old&a=b#t=1\n", T, None);
        assert_eq!(out, "# a comment: seg.ts\nseg.ts?a=b&sg=v1.k.p.s#t=1\n");
    }

    #[test]
    fn playlists_are_classified_master_ended_or_live() {
        let master = "#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=1\nlow.m3u8\n";
        assert_eq!(classify(master), PlaylistKind::Master);
        let renditions_only =
            "#EXTM3U\n#EXT-X-MEDIA:TYPE=AUDIO,GROUP-ID=\"a\",NAME=\"x\",URI=\"a.m3u8\"\n";
        assert_eq!(classify(renditions_only), PlaylistKind::Master);
        let vod = "#EXTM3U\r\n#EXT-X-TARGETDURATION:4\r\n#EXTINF:4.0,\r\na.ts\r\n#EXTINF:2.5,title, with comma\r\nb.ts\r\n#EXTINF:nonsense,\r\nc.ts\r\n#EXT-X-ENDLIST\r\n";
        assert_eq!(
            classify(vod),
            PlaylistKind::Ended {
                duration_seconds: 6.5
            }
        );
        let live = "#EXTM3U\n#EXT-X-MEDIA-SEQUENCE:7\n#EXTINF:2.0,\nlive7.ts\n";
        assert_eq!(classify(live), PlaylistKind::Live);
        // A VOD type without the end tag is still being written: reloaded like live.
        assert_eq!(
            classify("#EXTM3U\n#EXT-X-PLAYLIST-TYPE:EVENT\n#EXTINF:2,\na.ts\n"),
            PlaylistKind::Live
        );
        assert_eq!(
            classify(&six_two_second_segments()),
            PlaylistKind::Ended {
                duration_seconds: 12.0
            }
        );
    }

    fn six_two_second_segments() -> String {
        let mut text = String::from("#EXTM3U\n#EXT-X-PLAYLIST-TYPE:VOD\n");
        for n in 0..6 {
            text.push_str(&format!("#EXTINF:2.000,\nsegment{n}.ts\n"));
        }
        text + "#EXT-X-ENDLIST\n"
    }

    #[test]
    fn playlists_are_known_by_type_or_path() {
        assert!(is_playlist("/x", Some("application/vnd.apple.mpegurl")));
        assert!(is_playlist(
            "/x",
            Some("Application/X-MpegURL; charset=utf-8")
        ));
        assert!(is_playlist("/hls/index.m3u8", None));
        assert!(!is_playlist("/hls/seg.ts", Some("video/mp2t")));
    }
}
