//! The terminal while the console runs: raw mode and the alternate screen,
//! restored on drop, on panic and on Ctrl-C; and the log file.

use std::fs::{File, OpenOptions};
use std::io::{self, Stdout};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, Once};

use anyhow::Context;
use crossterm::cursor::Show;
use crossterm::event::{DisableBracketedPaste, EnableBracketedPaste};
use crossterm::execute;
use crossterm::terminal::{
    disable_raw_mode, enable_raw_mode, EnterAlternateScreen, LeaveAlternateScreen,
};
use ratatui::backend::CrosstermBackend;
use ratatui::Terminal;

/// Set while the terminal is in raw mode on the alternate screen.
static ACTIVE: AtomicBool = AtomicBool::new(false);
/// Set once a panic has restored the terminal, so the main loop stops drawing.
pub static PANICKED: AtomicBool = AtomicBool::new(false);
static HOOK: Once = Once::new();

/// Puts the terminal back as the shell left it. Safe to call twice.
pub fn restore() {
    if ACTIVE.swap(false, Ordering::SeqCst) {
        let _ = disable_raw_mode();
        let _ = execute!(
            io::stdout(),
            DisableBracketedPaste,
            LeaveAlternateScreen,
            Show
        );
    }
}

/// The terminal in raw mode on the alternate screen; `Drop` restores it.
pub struct TerminalGuard {
    pub terminal: Terminal<CrosstermBackend<Stdout>>,
}

impl TerminalGuard {
    pub fn enter() -> anyhow::Result<TerminalGuard> {
        HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                // Restore first, or the message is lost on the alternate
                // screen and the shell is left in raw mode.
                restore();
                PANICKED.store(true, Ordering::SeqCst);
                tracing::error!("panic: {info}");
                previous(info);
            }));
        });
        enable_raw_mode().context("switching the terminal to raw mode")?;
        ACTIVE.store(true, Ordering::SeqCst);
        let result = (|| {
            execute!(io::stdout(), EnterAlternateScreen, EnableBracketedPaste)
                .context("entering the alternate screen")?;
            let mut terminal = Terminal::new(CrosstermBackend::new(io::stdout()))
                .context("setting up the terminal")?;
            terminal.clear().context("clearing the terminal")?;
            Ok(TerminalGuard { terminal })
        })();
        if result.is_err() {
            restore();
        }
        result
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        restore();
    }
}

/// Where the console logs: `$KILN_TUI_LOG`, else
/// `$XDG_STATE_HOME/kiln/master-tui.log` (`~/.local/state` by default).
pub fn log_path() -> PathBuf {
    if let Some(p) = std::env::var_os("KILN_TUI_LOG").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let state = std::env::var_os("XDG_STATE_HOME")
        .filter(|p| Path::new(p).is_absolute())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|h| !h.is_empty())
                .map(|h| Path::new(&h).join(".local/state"))
        })
        .unwrap_or_else(std::env::temp_dir);
    state.join("kiln").join("master-tui.log")
}

/// A tracing dispatcher that appends to the log file. The console sets it on
/// each of its threads rather than globally, so it never fights a subscriber
/// the binary may have installed for the headless commands.
pub fn log_dispatch(path: &Path) -> anyhow::Result<tracing::Dispatch> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the log directory {}", dir.display()))?;
    }
    let file: File = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening the log file {}", path.display()))?;
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let subscriber = tracing_subscriber::fmt()
        .with_writer(Mutex::new(file))
        .with_ansi(false)
        .with_env_filter(filter)
        .finish();
    Ok(tracing::Dispatch::new(subscriber))
}
