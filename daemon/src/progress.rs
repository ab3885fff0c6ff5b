//! Terminal output helpers: progress bars on stderr (hidden when stderr is not a
//! terminal) and byte counts.

use indicatif::{HumanBytes, ProgressBar, ProgressStyle};

/// "1.2 MiB stored, 2.4 MiB raw (2.00x)".
pub fn stored_vs_raw(stored: u64, raw: u64) -> String {
    let ratio = if stored > 0 {
        raw as f64 / stored as f64
    } else {
        0.0
    };
    format!(
        "{} stored, {} raw ({ratio:.2}x)",
        HumanBytes(stored),
        HumanBytes(raw)
    )
}

/// A progress bar counting images.
pub struct Bar(ProgressBar);

impl Bar {
    /// A bar with `len` units, labelled `what`.
    pub fn new(len: u64, what: &str) -> Self {
        let bar = ProgressBar::new(len);
        bar.set_style(
            ProgressStyle::with_template(&format!(
                "{{spinner}} {what} {{bar:40}} {{pos}}/{{len}} [{{elapsed_precise}}<{{eta_precise}}, {{per_sec}}] {{msg}}"
            ))
            .expect("valid template"),
        );
        Bar(bar)
    }

    /// Advances by `n`.
    pub fn inc(&self, n: u64) {
        self.0.inc(n);
    }

    /// Sets the number of units (when it becomes known).
    pub fn set_length(&self, len: u64) {
        self.0.set_length(len);
    }

    /// Shows `msg` after the bar.
    pub fn message(&self, msg: &str) {
        self.0.set_message(msg.to_owned());
    }

    /// Removes the bar.
    pub fn finish(&self) {
        self.0.finish_and_clear();
    }
}

impl byol_ingest::Progress for Bar {
    fn add_total(&self, n: u64) {
        self.0.inc_length(n);
    }
    fn advance(&self, n: u64) {
        self.0.inc(n);
    }
}
