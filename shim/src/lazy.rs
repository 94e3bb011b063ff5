//! Lazy restore: CRIU restores a container's processes without their memory, and a
//! `criu lazy-pages` daemon fills it in from the local images, through userfaultfd, while the
//! program already runs.
//!
//! A restore writes every page of the checkpoint into fresh memory before the program may run
//! again; at 256 MiB and more that is most of a migration's downtime (on the VMs here 0.5-4 s
//! per GiB, see the README). Restored lazily, the program runs again as soon as its
//! processes, files and mappings are back; a page it touches before the daemon has copied it
//! is copied on the fault. Measured by hand with memhog (`runc restore` of the same images,
//! until its tick changes): 256 MiB 0.5-1.3 s eager -> 0.27-0.36 s lazy; 1 GiB 2.3 s -> 0.3 s,
//! with the daemon done 1.7 s after the start. At 16 MiB it buys nothing (the daemon costs a
//! little more than it saves), hence the threshold of [`LazyPages::Auto`].
//!
//! The pages come from the node's own copy of the checkpoint, never from another node, so a
//! migration still moves all of a checkpoint before it restores it, and the origin keeps its
//! checkpoint until the destination has all of it in memory: the shim's `Start` returns only
//! when the daemon has copied every page (the program runs meanwhile). If the daemon fails,
//! the container is killed (a process must never run on with pages it lacks) and `Start`
//! fails with the daemon's log, so the migration rolls back to the origin's checkpoint.

use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use containerd_shim::asynchronous::monitor::{Subscription, monitor_unsubscribe};
use containerd_shim::monitor::Subject;

use crate::error::{Error, Result};

/// The socket `criu lazy-pages` listens on, in the work dir it shares with the restore.
const SOCKET: &str = "lazy-pages.socket";
/// Its log, in the same work dir.
pub const LOG: &str = "lazy-pages.log";
/// How long the daemon may take to listen.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// When a CRIU restore is lazy (runtime option `CriuLazyPages`, or `MIG_CRIU_LAZY_PAGES`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LazyPages {
    /// Lazy when the kernel has userfaultfd and the checkpoint holds at least
    /// [`AUTO_MIN_PAGE_BYTES`] of pages.
    #[default]
    Auto,
    /// Always lazy: a restore fails where the kernel has no userfaultfd.
    Always,
    /// Never: every page is in place before the program runs (CRIU's default).
    Never,
}

/// The size of page images from which [`LazyPages::Auto`] restores lazily.
pub const AUTO_MIN_PAGE_BYTES: u64 = 64 << 20;

impl LazyPages {
    /// Parses a configured value; `what` names where it came from, for the error.
    pub fn parse(s: &str, what: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "always" => Ok(Self::Always),
            "never" => Ok(Self::Never),
            other => Err(Error::InvalidArgument(format!(
                "{what}: unknown lazy pages mode {other:?}; expected auto, always or never"
            ))),
        }
    }

    /// Whether a restore of `page_bytes` of pages is lazy, on a kernel with (`uffd`) or
    /// without userfaultfd.
    pub fn choose(self, page_bytes: u64, uffd: bool) -> Result<bool> {
        match self {
            Self::Never => Ok(false),
            Self::Auto => Ok(uffd && page_bytes >= AUTO_MIN_PAGE_BYTES),
            Self::Always if uffd => Ok(true),
            Self::Always => Err(Error::FailedPrecondition(
                "lazy pages are configured always (CriuLazyPages or MIG_CRIU_LAZY_PAGES), but \
                 this kernel has no userfaultfd (no /proc/sys/vm/unprivileged_userfaultfd); \
                 configure auto or never"
                    .into(),
            )),
        }
    }
}

/// Whether the kernel has userfaultfd with the events CRIU needs (the sysctl exists from 5.2,
/// years after those events).
pub fn kernel_has_userfaultfd() -> bool {
    Path::new("/proc/sys/vm/unprivileged_userfaultfd").exists()
}

/// The bytes of memory pages in a CRIU images dir (its `pages-*.img`).
pub fn page_bytes(images: &Path) -> u64 {
    let Ok(dir) = std::fs::read_dir(images) else {
        return 0;
    };
    dir.flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with("pages-") && name.ends_with(".img")
        })
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// A running `criu lazy-pages` daemon serving one restore.
pub struct Fill {
    pid: i32,
    sub: Subscription,
    log: PathBuf,
    started: Instant,
    /// Post-copy: the pages come from the origin through this bridge, told the daemon's exit
    /// status ([`crate::postcopy::fetch`]).
    remote: Option<Remote>,
}

/// The bridge of a post-copy fill: told the daemon's exit status, it answers whether the
/// origin heard that every page is in.
type Remote = (
    tokio::sync::oneshot::Sender<i32>,
    tokio::task::JoinHandle<std::result::Result<(), String>>,
);

impl Fill {
    /// Starts `criu lazy-pages` on `images`, sharing `work` with the restore to come, and
    /// returns once it listens.
    pub async fn start(images: &Path, work: &Path) -> Result<Self> {
        Self::start_with(images, work, None).await
    }

    /// Post-copy ([`crate::postcopy`]): as [`Fill::start`], but the daemon fetches the pages
    /// from the origin's page server, reached through `pages_socket`.
    pub async fn start_remote(images: &Path, work: &Path, pages_socket: &Path) -> Result<Self> {
        Self::start_with(images, work, Some(pages_socket)).await
    }

    async fn start_with(images: &Path, work: &Path, pages_socket: Option<&Path>) -> Result<Self> {
        std::fs::create_dir_all(work).map_err(Error::io(format!("create {}", work.display())))?;
        let page_server = match pages_socket {
            Some(_) => Some(
                tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .map_err(Error::io("listen on 127.0.0.1 for the lazy pages daemon"))?,
            ),
            None => None,
        };
        let socket = work.join(SOCKET);
        let _ = std::fs::remove_file(&socket);
        let log = work.join(LOG);
        let mut cmd = Command::new("criu");
        cmd.arg("lazy-pages")
            .arg("--images-dir")
            .arg(images)
            .arg("--work-dir")
            .arg(work)
            .args(["--log-file", LOG, "-v2"]);
        if let Some(listener) = &page_server {
            let port = listener
                .local_addr()
                .map_err(Error::io("the page server bridge's address"))?
                .port();
            cmd.args(["--page-server", "--address", "127.0.0.1", "--port"])
                .arg(port.to_string());
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        let (child, sub) = crate::runc::spawn_watched(&mut cmd).await?;
        let pid = child.id() as i32;
        let remote = match (page_server, pages_socket) {
            (Some(listener), Some(socket)) => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                let fetch = tokio::spawn(crate::postcopy::fetch(
                    listener,
                    pid,
                    socket.to_path_buf(),
                    rx,
                ));
                Some((tx, fetch))
            }
            _ => None,
        };
        let mut fill = Self {
            pid,
            sub,
            log,
            started: Instant::now(),
            remote,
        };
        while !socket.exists() {
            if let Some(code) = fill.exited() {
                let _ = monitor_unsubscribe(fill.sub.id).await;
                return Err(fill.failure(format!("exited with status {code} before listening")));
            }
            if fill.started.elapsed() > READY_TIMEOUT {
                let e = fill.failure(format!(
                    "did not listen on {} within {READY_TIMEOUT:?}",
                    socket.display()
                ));
                fill.abandon().await;
                return Err(e);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok(fill)
    }

    /// The daemon's exit status, if it has exited.
    fn exited(&mut self) -> Option<i32> {
        while let Ok(e) = self.sub.rx.try_recv() {
            if matches!(e.subject, Subject::Pid(p) if p == self.pid) {
                return Some(e.exit_code);
            }
        }
        None
    }

    /// Waits until the daemon has copied every page and exited.
    pub async fn wait(mut self) -> Result<Duration> {
        let code = crate::runc::wait_exit(self.pid, &mut self.sub).await;
        let _ = monitor_unsubscribe(self.sub.id).await;
        if let Some((exited, fetch)) = self.remote.take() {
            let _ = exited.send(code);
            // The origin must hear that every page is in, or it resumes the workload: then
            // this copy must not run on either.
            match fetch.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) if code == 0 => {
                    return Err(self.failure(format!(
                        "had every page, but the origin could not be told so ({e}); the \
                         origin resumes the workload"
                    )));
                }
                Ok(Err(_)) => {}
                Err(e) => return Err(self.failure(format!("bridge to the origin failed: {e}"))),
            }
        }
        if code == 0 {
            Ok(self.started.elapsed())
        } else {
            Err(self.failure(format!("exited with status {code}")))
        }
    }

    fn kill(&self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }

    /// Ends the daemon (a restore that failed) and waits for it.
    pub async fn abandon(self) {
        self.kill();
        let _ = self.wait().await;
    }

    fn failure(&self, what: String) -> Error {
        Error::Other(crate::runc::with_criu_log(
            format!("the lazy pages daemon (criu lazy-pages) {what}"),
            &self.log,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_bad_ones_say_what_is_expected() {
        assert_eq!(LazyPages::parse("auto", "x").unwrap(), LazyPages::Auto);
        assert_eq!(LazyPages::parse("always", "x").unwrap(), LazyPages::Always);
        assert_eq!(LazyPages::parse("never", "x").unwrap(), LazyPages::Never);
        let e = LazyPages::parse("yes", "the runtime option CriuLazyPages")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("CriuLazyPages") && e.contains("\"yes\"") && e.contains("auto, always"),
            "{e}"
        );
    }

    #[test]
    fn auto_is_lazy_for_large_checkpoints_on_kernels_with_userfaultfd() {
        let big = AUTO_MIN_PAGE_BYTES;
        assert!(LazyPages::Auto.choose(big, true).unwrap());
        assert!(!LazyPages::Auto.choose(big - 1, true).unwrap());
        assert!(!LazyPages::Auto.choose(big, false).unwrap());
        assert!(!LazyPages::Never.choose(big, true).unwrap());
        assert!(LazyPages::Always.choose(0, true).unwrap());
        let e = LazyPages::Always.choose(0, false).unwrap_err().to_string();
        assert!(
            e.contains("userfaultfd") && e.contains("auto or never"),
            "{e}"
        );
    }

    #[test]
    fn page_bytes_counts_page_images_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pages-1.img"), vec![0u8; 4096]).unwrap();
        std::fs::write(dir.path().join("pages-2.img"), vec![0u8; 8192]).unwrap();
        std::fs::write(dir.path().join("pagemap-1.img"), vec![0u8; 100]).unwrap();
        std::fs::write(dir.path().join("core-1.img"), vec![0u8; 100]).unwrap();
        assert_eq!(page_bytes(dir.path()), 12288);
        assert_eq!(page_bytes(&dir.path().join("missing")), 0);
    }
}
