//! Styles, with colour only when it is wanted (`NO_COLOR` turns it off and
//! leaves bold, reverse and dim to carry the meaning).

use kiln_spool::master::JobState;
use ratatui::style::{Color, Modifier, Style};

#[derive(Debug, Clone, Copy)]
pub struct Theme {
    pub color: bool,
}

impl Theme {
    fn fg(self, c: Color) -> Style {
        if self.color {
            Style::new().fg(c)
        } else {
            Style::new()
        }
    }

    pub fn state(self, s: JobState) -> Style {
        match s {
            JobState::Queued => self.fg(Color::Cyan),
            JobState::Leased => self.fg(Color::Yellow),
            JobState::Uploading => self.fg(Color::Magenta),
            JobState::Done => self.fg(Color::Green),
            JobState::Failed | JobState::Invalid => {
                self.fg(Color::Red).add_modifier(Modifier::BOLD)
            }
            JobState::Cancelled => self.dim(),
        }
    }

    /// Something needing attention now: a lease about to run out, a stale agent.
    pub fn danger(self) -> Style {
        self.fg(Color::Red).add_modifier(Modifier::BOLD)
    }

    pub fn good(self) -> Style {
        self.fg(Color::Green)
    }

    pub fn dim(self) -> Style {
        if self.color {
            Style::new().fg(Color::DarkGray)
        } else {
            Style::new().add_modifier(Modifier::DIM)
        }
    }

    pub fn header(self) -> Style {
        Style::new().add_modifier(Modifier::BOLD)
    }

    pub fn selected(self) -> Style {
        Style::new().add_modifier(Modifier::REVERSED)
    }

    pub fn border(self, focused: bool) -> Style {
        if focused {
            self.fg(Color::Cyan).add_modifier(Modifier::BOLD)
        } else {
            self.dim()
        }
    }

    pub fn key(self) -> Style {
        self.fg(Color::Cyan).add_modifier(Modifier::BOLD)
    }

    pub fn note(self, error: bool) -> Style {
        if error {
            self.danger()
        } else {
            self.good()
        }
    }
}
