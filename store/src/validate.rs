//! Validation of caller-supplied identifiers (`account`, `streamId`) and session ids.

pub use streamgate_policy::id::{IdProblem, MAX_ID_LEN, check_id};

/// A session id as stores issue it: 40 lowercase hex digits (128 random bits and a 32-bit tag).
pub fn is_session_id(id: &str) -> bool {
    id.len() == 40 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_are_40_hex() {
        assert!(is_session_id("0123456789abcdef0123456789abcdef01234567"));
        assert!(!is_session_id("0123456789ABCDEF0123456789abcdef01234567"));
        assert!(!is_session_id("0123456789abcdef0123456789abcdef"));
        assert!(!is_session_id("abc"));
    }
}
