//! The daemon's console lines, derived from its typed log events: every `tracing`
//! event with an `event` field is emitted once, and this layer prints its message for
//! people — INFO on stdout, WARN and ERROR on stderr as `warning: …` and `error: …` —
//! whatever `BYOL_LOG` filters out of the log itself.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

/// Prints the message of each typed event (see the module docs).
pub struct ConsoleLines;

/// The parts of an event this layer reads.
#[derive(Default)]
struct Line {
    typed: bool,
    message: String,
}

impl Visit for Line {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "event" => self.typed = true,
            "message" => self.message = value.to_owned(),
            _ => {}
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        match field.name() {
            "event" => self.typed = true,
            // A format string's arguments print as the formatted text.
            "message" => self.message = format!("{value:?}"),
            _ => {}
        }
    }
}

impl<S: Subscriber> Layer<S> for ConsoleLines {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut line = Line::default();
        event.record(&mut line);
        if !line.typed {
            return;
        }
        match *event.metadata().level() {
            Level::ERROR => eprintln!("error: {}", line.message),
            Level::WARN => eprintln!("warning: {}", line.message),
            Level::INFO => println!("{}", line.message),
            _ => {}
        }
    }
}
