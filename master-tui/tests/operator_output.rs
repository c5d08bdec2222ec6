//! What agents write reaches the operator's terminal escaped: through the
//! real `kiln-master` binary, `list`, `show`, `reap` and `serve` print no
//! raw ESC, C1 control, CR or bidi override from a status or lease, and
//! `--json` output keeps the value intact while escaping the same characters.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_spool::agent::claim::{claim_next, heartbeat};
use kiln_spool::lease::Lease;
use kiln_spool::status::{AgentState, Phase, Status};
use kiln_spool::time::Timestamp;
use kiln_spool::LocalSpool;
use serde_json::Value;

mod kiln_cli;
use kiln_cli::kiln;

const AGENT: &str = "evil\x1b]0;pwned\x07\u{9b}2J";
const MESSAGE: &str = "\x1b]52;c;cm0gLXJmIH4=\x07copied\rok\u{202e}gnp.exe";
const SERVER: &str = "\x1b[31m10.0.0.9:22";

fn job(id: &str, priority: u32) -> String {
    format!(
        "id = \"{id}\"\npriority = {priority}\ntime_limit = \"1h\"\nmax_attempts = 1\n\
         [disk]\n[[disk.partitions]]\nlabel = \"root\"\nsize = \"rest\"\nkind = \"linux\"\nfs = \"ext4\"\nmount = \"/\"\n"
    )
}

fn ok(spool: &Path, args: &[&str]) -> String {
    let out = kiln(spool, args);
    assert!(
        out.status.success(),
        "kiln-master {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    checked(&format!("kiln-master {args:?}"), &out.stdout)
}

/// The output as text, failing on any byte or character a terminal would
/// obey: ESC and the other C0 controls but newline, DEL, C1 controls (as
/// UTF-8 or as lone bytes), bidi controls.
fn checked(what: &str, bytes: &[u8]) -> String {
    let text = String::from_utf8(bytes.to_vec())
        .unwrap_or_else(|e| panic!("{what} printed bytes that are not UTF-8: {e}"));
    let bad: Vec<char> = text
        .chars()
        .filter(|&c| {
            (c.is_control() && c != '\n')
                || ('\u{202a}'..='\u{202e}').contains(&c)
                || ('\u{2066}'..='\u{2069}').contains(&c)
        })
        .collect();
    assert!(bad.is_empty(), "{what} printed {bad:?}:\n{text}");
    text
}

/// A spool with two jobs held by a hostile agent: `bad-1` building with a
/// hostile heartbeat, `bad-2` reported failed with a hostile message.
fn hostile_spool(root: &Path) -> LocalSpool {
    ok(root, &["init"]);
    let files = root.join("jobfiles");
    std::fs::create_dir_all(&files).unwrap();
    for (id, priority) in [("bad-1", 900), ("bad-2", 800)] {
        let file = files.join(format!("{id}.toml"));
        std::fs::write(&file, job(id, priority)).unwrap();
        ok(root, &["add", file.to_str().unwrap()]);
    }
    let spool = LocalSpool::new(root);
    let now = Timestamp::now();
    for state in [AgentState::Building, AgentState::Failed] {
        let lease = claim_next(&spool, AGENT, now)
            .expect("claiming")
            .expect("a job to claim");
        beat(&spool, &lease, state, now);
    }
    spool
}

fn beat(spool: &LocalSpool, lease: &Lease, state: AgentState, now: Timestamp) {
    let status = Status {
        job: lease.job.clone(),
        agent: lease.agent.clone(),
        token: lease.token.clone(),
        server: SERVER.into(),
        state,
        phase: Phase::Payloads,
        progress: 0.5,
        bytes_done: 0,
        bytes_total: 0,
        message: MESSAGE.into(),
        started: now,
        updated: now,
    };
    heartbeat(spool, lease, &status).expect("writing a heartbeat");
}

#[test]
fn list_show_and_reap_print_agent_text_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    hostile_spool(root);

    let table = ok(root, &["list"]);
    assert!(table.contains(r"evil\x1b]0;pwned"), "{table}");
    let shown = ok(root, &["show", "bad-1"]);
    assert!(
        shown.contains(r"evil\x1b]0;pwned\x07\u{9b}2J (token "),
        "{shown}"
    );

    let reaped = ok(root, &["reap"]);
    assert!(
        reaped.contains(r"\x1b]52;c;cm0gLXJmIH4=\x07copied\rok\u{202e}gnp.exe"),
        "the reaper's line quotes the message, escaped:\n{reaped}"
    );
    // Failed now: `list` and `show` print the message the reaper kept.
    let table = ok(root, &["list"]);
    assert!(table.contains(r"\x1b]52;c;"), "{table}");
    let shown = ok(root, &["show", "bad-2"]);
    assert!(shown.contains(r"message    "), "{shown}");
    ok(root, &["show", "bad-1"]);
}

#[test]
fn json_is_escaped_and_reads_back_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    hostile_spool(root);

    let listed: Value = serde_json::from_str(&ok(root, &["list", "--json"])).unwrap();
    let bad1 = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["id"] == "bad-1")
        .expect("bad-1 listed");
    assert_eq!(bad1["holder"], AGENT);
    assert_eq!(bad1["phase"], "payloads");

    let shown: Value = serde_json::from_str(&ok(root, &["show", "bad-1", "--json"])).unwrap();
    assert_eq!(shown["lease"]["agent"], AGENT);
}

#[test]
fn serve_prints_agent_text_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    hostile_spool(root);
    let child = Command::new(env!("CARGO_BIN_EXE_kiln-master"))
        .arg("--spool")
        .arg(root)
        .args(["serve", "--interval", "100ms"])
        .env_remove("KILN_SPOOL")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running kiln-master serve");
    // Its first pass fails bad-2 and says why.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let listed: Value = serde_json::from_str(&ok(root, &["list", "--json"])).unwrap();
        if listed
            .as_array()
            .unwrap()
            .iter()
            .any(|j| j["id"] == "bad-2" && j["state"] == "failed")
        {
            break;
        }
        assert!(Instant::now() < deadline, "serve never failed bad-2");
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("running kill");
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "serve exited with {:?}", out.status);
    let printed = checked("kiln-master serve", &out.stdout);
    checked("kiln-master serve's stderr", &out.stderr);
    assert!(
        printed.contains(r"failed in payloads: \x1b]52;c;"),
        "{printed}"
    );
}
