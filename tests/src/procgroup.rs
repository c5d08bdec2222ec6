//! One process group for a test's children: QEMU, helpers, and whatever
//! they fork stay in it, and the guard kills the whole group on drop.

use std::process::{Child, Command, ExitStatus};
use std::time::Duration;

use anyhow::{Context, Result};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::os::unix::process::CommandExt;

use crate::wait::wait_until;

/// Children spawned into one process group; on drop the group gets SIGKILL
/// and the children are reaped.
#[derive(Default)]
pub struct ProcessGroup {
    /// The current group id, once the first child made the group.
    pgid: Option<i32>,
    /// Every group this guard made (a new one only after the last emptied).
    groups: Vec<i32>,
    children: Vec<(String, Child)>,
}

/// A child of a [`ProcessGroup`], by index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChildId(usize);

impl ProcessGroup {
    pub fn new() -> Self {
        Self::default()
    }

    /// The group id, once a child runs.
    pub fn pgid(&self) -> Option<i32> {
        self.pgid
    }

    /// Spawns `cmd` into the group; `name` appears in errors and logs.
    pub fn spawn(&mut self, name: &str, cmd: &mut Command) -> Result<ChildId> {
        // The first child leads the group; the kernel keeps its pid from
        // being reused while anything is left in the group, so killpg never
        // hits a stranger. Once everything in it has exited the group is
        // gone and the next child starts a new one.
        if self.pgid.is_some() && self.all_exited() {
            self.pgid = None;
        }
        cmd.process_group(self.pgid.unwrap_or(0));
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        if self.pgid.is_none() {
            self.pgid = Some(child.id() as i32);
            self.groups.push(child.id() as i32);
        }
        self.children.push((name.to_owned(), child));
        Ok(ChildId(self.children.len() - 1))
    }

    fn all_exited(&mut self) -> bool {
        self.children
            .iter_mut()
            .all(|(_, c)| matches!(c.try_wait(), Ok(Some(_))))
    }

    /// The process id of a child.
    pub fn pid(&self, id: ChildId) -> u32 {
        self.children[id.0].1.id()
    }

    /// The child's exit status once it has exited.
    pub fn exit_status(&mut self, id: ChildId) -> Result<Option<ExitStatus>> {
        let (name, child) = &mut self.children[id.0];
        child
            .try_wait()
            .with_context(|| format!("checking whether {name} exited"))
    }

    /// Waits up to `timeout` for a child to exit.
    pub fn wait_exit(&mut self, id: ChildId, timeout: Duration) -> Result<ExitStatus> {
        let name = self.children[id.0].0.clone();
        wait_until(timeout, &format!("{name} to exit"), || self.exit_status(id))
    }

    /// Kills one child (not the rest of the group) and reaps it.
    pub fn kill_child(&mut self, id: ChildId) {
        let (name, child) = &mut self.children[id.0];
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        if let Err(e) = child.kill().and_then(|_| child.wait().map(|_| ())) {
            eprintln!("procgroup: killing {name} (pid {}): {e}", child.id());
        }
    }

    /// Sends SIGKILL to the whole group (children and their descendants that
    /// did not leave it) and reaps the children.
    pub fn kill_all(&mut self) {
        for pgid in &self.groups {
            // ESRCH when everything has exited already: nothing to do.
            let _ = killpg(Pid::from_raw(*pgid), Signal::SIGKILL);
        }
        for (name, child) in &mut self.children {
            if let Err(e) = child.wait() {
                eprintln!("procgroup: reaping {name} (pid {}): {e}", child.id());
            }
        }
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.kill_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alive(pid: i32) -> bool {
        // A zombie still answers kill(0); read its state to tell.
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => !stat
                .rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z')),
            Err(_) => false,
        }
    }

    #[test]
    fn children_and_grandchildren_die_with_the_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("grandchild.pid");
        let mut group = ProcessGroup::new();
        let a = group
            .spawn("sleeper", Command::new("sleep").arg("600"))
            .unwrap();
        let b = group
            .spawn(
                "forker",
                Command::new("sh")
                    .arg("-c")
                    .arg(format!("sleep 600 & echo $! > {}; wait", pidfile.display())),
            )
            .unwrap();
        let pids = [group.pid(a) as i32, group.pid(b) as i32];
        let grandchild: i32 = wait_until(Duration::from_secs(10), "the grandchild's pid", || {
            Ok(std::fs::read_to_string(&pidfile)
                .ok()
                .and_then(|s| s.trim().parse().ok()))
        })
        .unwrap();
        assert_eq!(group.pgid(), Some(pids[0]));
        assert_eq!(
            nix::unistd::getpgid(Some(Pid::from_raw(grandchild))).unwrap(),
            Pid::from_raw(pids[0])
        );
        drop(group);
        for pid in pids {
            assert!(!alive(pid), "child {pid} survived the group");
        }
        crate::wait::wait_for(Duration::from_secs(10), "the grandchild to die", || {
            !alive(grandchild)
        })
        .unwrap();
    }

    #[test]
    fn an_exited_child_reports_its_status() {
        let mut group = ProcessGroup::new();
        let id = group.spawn("false", &mut Command::new("false")).unwrap();
        let status = group.wait_exit(id, Duration::from_secs(10)).unwrap();
        assert_eq!(status.code(), Some(1));
        let err = group
            .spawn("missing", &mut Command::new("/nonexistent/tool"))
            .unwrap_err();
        assert!(err.to_string().contains("starting missing"), "{err}");
    }
}
