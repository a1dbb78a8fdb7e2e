//! Validation of caller-supplied identifiers (`account`, `streamId`): policies name accounts, so
//! the rule lives with the policy.

use std::fmt;

/// Longest accepted identifier, in characters.
pub const MAX_ID_LEN: usize = 128;

/// What is wrong with an identifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdProblem {
    /// Absent or empty.
    Empty,
    /// Longer than [`MAX_ID_LEN`].
    TooLong,
    /// Contains a character outside visible ASCII (0x21–0x7E).
    NotVisibleAscii,
}

impl fmt::Display for IdProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IdProblem::Empty => "must not be empty",
            IdProblem::TooLong => "must be at most 128 characters",
            IdProblem::NotVisibleAscii => {
                "must contain only visible ASCII characters (0x21-0x7E): no spaces, control or non-ASCII characters"
            }
        })
    }
}

/// Checks that `id` is 1–128 characters of visible ASCII.
pub fn check_id(id: &str) -> Result<(), IdProblem> {
    if id.is_empty() {
        return Err(IdProblem::Empty);
    }
    if !id.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(IdProblem::NotVisibleAscii);
    }
    // All bytes are ASCII here, so bytes == characters.
    if id.len() > MAX_ID_LEN {
        return Err(IdProblem::TooLong);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_visible_ascii_up_to_128() {
        assert_eq!(check_id("a"), Ok(()));
        assert_eq!(check_id("{acct}:1/~!"), Ok(()));
        assert_eq!(check_id(&"x".repeat(128)), Ok(()));
    }

    #[test]
    fn refuses_empty_long_and_invisible() {
        assert_eq!(check_id(""), Err(IdProblem::Empty));
        assert_eq!(check_id(&"x".repeat(129)), Err(IdProblem::TooLong));
        assert_eq!(check_id("a b"), Err(IdProblem::NotVisibleAscii));
        assert_eq!(check_id("a\tb"), Err(IdProblem::NotVisibleAscii));
        assert_eq!(check_id("é"), Err(IdProblem::NotVisibleAscii));
        assert_eq!(check_id("a\u{7f}"), Err(IdProblem::NotVisibleAscii));
    }
}
