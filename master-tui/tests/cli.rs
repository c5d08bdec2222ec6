//! `kiln-master` end to end in a temporary spool, through the real binary.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod kiln_cli;
use kiln_cli::{kiln, kiln_ok as ok};

fn fails(spool: &Path, args: &[&str], code: i32, says: &str) {
    let out = kiln(spool, args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(code),
        "kiln-master {args:?}: {stderr}"
    );
    assert!(
        stderr.contains(says),
        "kiln-master {args:?} said {stderr:?}, expected {says:?}"
    );
}

fn list(spool: &Path) -> Vec<Value> {
    serde_json::from_str::<Value>(&ok(spool, &["list", "--json"]))
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn job(id: &str, priority: u32, payload: &str, blake3: Option<&str>) -> String {
    let pin = blake3
        .map(|h| format!("blake3 = \"{h}\"\n"))
        .unwrap_or_default();
    format!(
        "# operator's comment survives pinning\nid = \"{id}\"\npriority = {priority}\ntime_limit = \"20m\"\n\
         [disk]\n[[disk.partitions]]\nlabel = \"root\"\nsize = \"rest\"\nkind = \"linux\"\nfs = \"ext4\"\nmount = \"/\"\n\
         [[payloads]]\nname = \"{payload}\"\n{pin}"
    )
}

#[test]
fn headless_flow() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    fails(&spool, &["list"], 2, "is not a spool");
    assert!(ok(&spool, &["init"]).contains("spool ready"));
    assert!(spool.join("jobs.toml").exists());

    let archive = dir.path().join("base.tar");
    std::fs::write(&archive, b"not really a tar, but bytes to hash").unwrap();
    let out = ok(
        &spool,
        &[
            "payload",
            "add",
            archive.to_str().unwrap(),
            "--name",
            "os/base.tar",
        ],
    );
    let hash = blake3::hash(b"not really a tar, but bytes to hash")
        .to_hex()
        .to_string();
    assert!(out.starts_with(&hash), "{out}");
    assert_eq!(
        std::fs::read(spool.join("payloads/os/base.tar")).unwrap(),
        std::fs::read(&archive).unwrap()
    );
    // The same bytes again are fine; other bytes under the same name are refused, and nothing is lost.
    ok(
        &spool,
        &[
            "payload",
            "add",
            archive.to_str().unwrap(),
            "--name",
            "os/base.tar",
        ],
    );
    let other = dir.path().join("other.tar");
    std::fs::write(&other, b"different").unwrap();
    fails(
        &spool,
        &[
            "payload",
            "add",
            other.to_str().unwrap(),
            "--name",
            "os/base.tar",
        ],
        2,
        "already exists",
    );
    fails(
        &spool,
        &[
            "payload",
            "add",
            other.to_str().unwrap(),
            "--name",
            "../escape",
        ],
        2,
        "\"..\" component",
    );
    assert_eq!(
        std::fs::read(spool.join("payloads/os/base.tar")).unwrap(),
        std::fs::read(&archive).unwrap()
    );

    let files = dir.path();
    std::fs::write(files.join("low.toml"), job("low", 100, "os/base.tar", None)).unwrap();
    std::fs::write(
        files.join("high.toml"),
        job("high", 900, "os/base.tar", Some(&hash)),
    )
    .unwrap();
    std::fs::write(
        files.join("wrong.toml"),
        job("wrong", 500, "os/base.tar", Some(&"0".repeat(64))),
    )
    .unwrap();
    std::fs::write(
        files.join("missing.toml"),
        job("missing", 500, "os/none.tar", None),
    )
    .unwrap();
    std::fs::write(
        files.join("bad.toml"),
        job("bad", 5000, "os/base.tar", None),
    )
    .unwrap();
    let out = ok(
        &spool,
        &[
            "add",
            files.join("low.toml").to_str().unwrap(),
            files.join("high.toml").to_str().unwrap(),
        ],
    );
    assert!(
        out.contains("queued low") && out.contains("queued high"),
        "{out}"
    );
    let pinned = std::fs::read_to_string(spool.join("jobs/low.toml")).unwrap();
    assert!(pinned.contains(&format!("blake3 = \"{hash}\"")), "{pinned}");
    assert!(
        pinned.starts_with("# operator's comment survives pinning"),
        "{pinned}"
    );
    fails(
        &spool,
        &["add", files.join("wrong.toml").to_str().unwrap()],
        2,
        "payloads[0].blake3: 0000",
    );
    fails(
        &spool,
        &["add", files.join("missing.toml").to_str().unwrap()],
        2,
        "payloads[0].name: \"os/none.tar\" is not in the spool",
    );
    fails(
        &spool,
        &["add", files.join("bad.toml").to_str().unwrap()],
        2,
        "bad.toml: priority: 5000 is out of range",
    );
    fails(
        &spool,
        &["add", files.join("low.toml").to_str().unwrap()],
        2,
        "already exists",
    );

    let jobs = list(&spool);
    let ids: Vec<&str> = jobs.iter().map(|j| j["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["high", "low"], "priority order, rejected jobs absent");
    assert_eq!(jobs[0]["state"], "queued");
    assert_eq!(jobs[0]["attempts"], 0);
    assert_eq!(jobs[0]["max_attempts"], 3);
    let table = ok(&spool, &["list"]);
    assert!(table.lines().next().unwrap().starts_with("ID"), "{table}");

    ok(&spool, &["priority", "low", "950"]);
    let ids: Vec<String> = list(&spool)
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["low", "high"]);
    fails(&spool, &["priority", "low", "1001"], 2, "out of range");
    fails(&spool, &["priority", "nope", "1"], 2, "no job \"nope\"");
    fails(&spool, &["show", "../etc"], 2, "job id");

    ok(&spool, &["cancel", "high"]);
    assert_eq!(list(&spool)[1]["state"], "cancelled");
    fails(&spool, &["cancel", "high"], 1, "is cancelled");
    ok(&spool, &["requeue", "high"]);
    assert_eq!(list(&spool)[1]["state"], "queued");
    fails(&spool, &["requeue", "high"], 1, "is queued");

    let show: Value = serde_json::from_str(&ok(&spool, &["show", "low", "--json"])).unwrap();
    assert_eq!(show["job"]["priority"], 950);
    assert!(show["spec"].as_str().unwrap().contains("id = \"low\""));
    assert!(ok(&spool, &["show", "low"]).contains("priority   950"));

    assert_eq!(ok(&spool, &["reap"]).trim(), "nothing to do");
    // A job file dropped into jobs/ by hand is taken in by reap, or marked invalid.
    std::fs::write(
        spool.join("jobs/dropped.toml"),
        job("dropped", 10, "os/base.tar", Some(&"f".repeat(64))),
    )
    .unwrap();
    let out = ok(&spool, &["reap"]);
    assert!(out.contains("invalid dropped"), "{out}");
    let dropped = list(&spool)
        .into_iter()
        .find(|j| j["id"] == "dropped")
        .unwrap();
    assert_eq!(dropped["state"], "invalid");
    assert!(
        dropped["message"]
            .as_str()
            .unwrap()
            .contains("payloads[0].blake3"),
        "{dropped}"
    );
}

#[test]
fn serve_stops_cleanly_on_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path();
    ok(spool, &["init"]);
    std::fs::write(spool.join("jobs/late.toml"), job("late", 10, "x.tar", None)).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_kiln-master"))
        .args([
            "--spool",
            spool.to_str().unwrap(),
            "serve",
            "--interval",
            "100ms",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The first pass marks the dropped job invalid (its payload is missing).
    let deadline = Instant::now() + Duration::from_secs(20);
    while !list(spool)
        .iter()
        .any(|j| j["id"] == "late" && j["state"] == "invalid")
    {
        assert!(Instant::now() < deadline, "serve never reaped");
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "serve exited with {:?}", out.status);
    assert!(String::from_utf8_lossy(&out.stderr).contains("stopped"));
}

#[test]
fn pxe_writes_a_boot_directory() {
    let dir = tempfile::tempdir().unwrap();
    let (kernel, initramfs, out) = (
        dir.path().join("vmlinuz-x"),
        dir.path().join("i.img"),
        dir.path().join("tftp"),
    );
    std::fs::write(&kernel, b"kernel bytes").unwrap();
    fails(
        dir.path(),
        &[
            "pxe",
            "--out",
            out.to_str().unwrap(),
            "--kernel",
            kernel.to_str().unwrap(),
            "--initramfs",
            initramfs.to_str().unwrap(),
        ],
        2,
        "--initramfs",
    );
    std::fs::write(&initramfs, b"initramfs bytes").unwrap();
    ok(
        dir.path(),
        &[
            "pxe",
            "--out",
            out.to_str().unwrap(),
            "--kernel",
            kernel.to_str().unwrap(),
            "--initramfs",
            initramfs.to_str().unwrap(),
            "--cmdline",
            "console=ttyS0 kiln.debug=1",
        ],
    );
    assert_eq!(std::fs::read(out.join("vmlinuz")).unwrap(), b"kernel bytes");
    assert_eq!(
        std::fs::read(out.join("initramfs.img")).unwrap(),
        b"initramfs bytes"
    );
    let script = std::fs::read_to_string(out.join("boot.ipxe")).unwrap();
    assert_eq!(
        script,
        "#!ipxe\nkernel vmlinuz console=ttyS0 kiln.debug=1\ninitrd initramfs.img\nboot\n"
    );
}
