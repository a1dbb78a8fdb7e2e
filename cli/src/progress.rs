//! The progress line: drawn to stderr while a run lasts, hidden when stderr is not a terminal so
//! that logs and pipes stay clean.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar over `duration` (position in milliseconds) with a free-form message.
pub fn bar(duration: Duration, show: bool) -> ProgressBar {
    let target = if show && std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let length = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
    let bar = ProgressBar::with_draw_target(Some(length), target);
    bar.set_style(
        ProgressStyle::with_template("[{elapsed_precise}] {bar:20} {msg}")
            .expect("the template is valid"),
    );
    bar
}
