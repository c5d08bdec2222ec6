//! The real `kiln-master tui` in a real terminal: tmux at 100x30. A job added
//! with the CLI from outside appears, `+` changes jobs.toml, and `q` leaves
//! the terminal as it was (alternate screen left, same stty settings, the
//! shell's prompt back).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_kiln-master");
const PROMPT: &str = "kiln-test$ ";

/// A tmux server of our own, killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn start(name: &str, cwd: &Path, log: &Path) -> Tmux {
        let socket = format!("kiln-tui-{name}-{}", std::process::id());
        let tmux = Tmux { socket };
        let out = tmux.run(&[
            "-f",
            "/dev/null",
            "new-session",
            "-d",
            "-s",
            "tui",
            "-x",
            "100",
            "-y",
            "30",
            "-c",
            cwd.to_str().unwrap(),
            "-e",
            &format!("PS1={PROMPT}"),
            "-e",
            &format!("KILN_TUI_LOG={}", log.display()),
            "-e",
            "TERM=xterm-256color",
            "bash",
            "--norc",
            "--noprofile",
        ]);
        assert!(
            out.status.success(),
            "starting tmux: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        tmux
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("running tmux")
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", "tui"]).stdout).into_owned()
    }

    fn alternate_screen(&self) -> bool {
        let out = self.run(&["display-message", "-p", "-t", "tui", "#{alternate_on}"]);
        String::from_utf8_lossy(&out.stdout).trim() == "1"
    }

    fn type_line(&self, text: &str) {
        assert!(self
            .run(&["send-keys", "-t", "tui", "-l", text])
            .status
            .success());
        assert!(self
            .run(&["send-keys", "-t", "tui", "Enter"])
            .status
            .success());
    }

    fn key(&self, key: &str) {
        assert!(self
            .run(&["send-keys", "-t", "tui", "-l", key])
            .status
            .success());
    }

    /// Polls `cond` until it holds; fails with the screen and `log` if it
    /// does not within `secs`.
    fn wait(&self, what: &str, secs: u64, log: &Path, mut cond: impl FnMut(&Tmux) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            if cond(self) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "timed out after {secs} s waiting for {what}\n--- screen ---\n{}\n--- console log ---\n{}",
            self.screen(),
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

fn cli(spool: &Path, args: &[&str]) {
    let out = Command::new(BIN)
        .arg("--spool")
        .arg(spool)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kiln-master {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn priority_in(spool: &Path, id: &str) -> Option<u32> {
    let list = kiln_spool::queue::read_job_list(&kiln_spool::LocalSpool::new(spool)).ok()?;
    list.get(id).map(|e| e.priority)
}

#[test]
fn console_in_tmux_sees_the_cli_changes_the_spool_and_restores_the_terminal() {
    assert!(
        Command::new("tmux").arg("-V").output().is_ok(),
        "tmux is not installed (scripts/install-deps.sh): the real-terminal test of `kiln-master tui` cannot run"
    );
    let dir = tempfile::tempdir().unwrap();
    let spool: PathBuf = dir.path().join("spool");
    let log = dir.path().join("console.log");
    cli(&spool, &["init"]);
    let job = dir.path().join("alpha.toml");
    std::fs::write(
        &job,
        "id = \"alpha\"\n[disk]\n[[disk.partitions]]\nlabel = \"root\"\nsize = \"rest\"\nkind = \"linux\"\nfs = \"ext4\"\nmount = \"/\"\n",
    )
    .unwrap();

    let tmux = Tmux::start("cli", dir.path(), &log);
    tmux.wait("the shell prompt", 10, &log, |t| {
        t.screen().contains(PROMPT.trim_end())
    });
    tmux.type_line(&format!(
        "stty -g > before; {BIN} --spool {} tui; echo \"tui exited with $?\"; stty -g > after",
        spool.display()
    ));
    tmux.wait("the console", 20, &log, |t| {
        t.alternate_screen() && t.screen().contains("no jobs yet")
    });
    let screen = tmux.screen();
    assert_eq!(
        screen.lines().count(),
        30,
        "the console fills 100x30:\n{screen}"
    );

    cli(&spool, &["add", job.to_str().unwrap()]);
    tmux.wait("the job added by the CLI on screen", 5, &log, |t| {
        let s = t.screen();
        s.contains("Jobs (1)") && s.contains("alpha") && s.contains("1 queued")
    });

    assert_eq!(priority_in(&spool, "alpha"), Some(500));
    tmux.key("+");
    tmux.wait("jobs.toml to hold the new priority", 5, &log, |_| {
        priority_in(&spool, "alpha") == Some(510)
    });
    tmux.wait("the new priority on screen", 5, &log, |t| {
        t.screen().contains("alpha: priority 500 -> 510")
    });

    tmux.key("q");
    tmux.wait("the console to exit", 10, &log, |t| {
        !t.alternate_screen() && t.screen().contains("tui exited with 0")
    });
    tmux.wait("the shell prompt back", 5, &log, |t| {
        t.screen().lines().rev().find(|l| !l.trim().is_empty()) == Some(PROMPT.trim_end())
    });
    let before = std::fs::read_to_string(dir.path().join("before")).unwrap();
    let after = std::fs::read_to_string(dir.path().join("after")).unwrap();
    assert_eq!(
        before, after,
        "the terminal settings are as before (raw mode left)"
    );
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(
        log_text.contains("alpha: priority 500 -> 510"),
        "the log file has the action:\n{log_text}"
    );
}

/// A signal from outside (here SIGTERM) takes the same orderly way out as `q`.
#[test]
fn console_restores_the_terminal_on_sigterm() {
    assert!(
        Command::new("tmux").arg("-V").output().is_ok(),
        "tmux is not installed (scripts/install-deps.sh): the real-terminal test of `kiln-master tui` cannot run"
    );
    let dir = tempfile::tempdir().unwrap();
    let spool: PathBuf = dir.path().join("spool");
    let log = dir.path().join("console.log");
    cli(&spool, &["init"]);
    let tmux = Tmux::start("signal", dir.path(), &log);
    tmux.wait("the shell prompt", 10, &log, |t| {
        t.screen().contains(PROMPT.trim_end())
    });
    tmux.type_line(&format!(
        "stty -g > before; sh -c 'echo $$ > pid; exec {BIN} --spool {} tui'; echo \"tui exited with $?\"; stty -g > after",
        spool.display()
    ));
    tmux.wait("the console", 20, &log, |t| {
        t.alternate_screen() && t.screen().contains("no jobs yet")
    });
    let pid = std::fs::read_to_string(dir.path().join("pid")).unwrap();
    let status = Command::new("kill")
        .args(["-TERM", pid.trim()])
        .status()
        .unwrap();
    assert!(status.success());
    tmux.wait("the console to exit", 10, &log, |t| {
        !t.alternate_screen() && t.screen().contains("tui exited with 0")
    });
    let before = std::fs::read_to_string(dir.path().join("before")).unwrap();
    let after = std::fs::read_to_string(dir.path().join("after")).unwrap();
    assert_eq!(before, after, "the terminal settings are as before");
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(log_text.contains("stopping on a signal"), "{log_text}");
}
