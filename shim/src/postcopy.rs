//! Post-copy migration (CRIU's lazy migration): the origin checkpoints everything but the
//! memory pages, the destination restores at once and fetches the pages from the origin while
//! the workload already runs.
//!
//! ```text
//! origin                                             destination
//! criu dump --lazy-pages                             criu lazy-pages --page-server
//!   (processes frozen, page server on 127.0.0.1)       (connects to 127.0.0.1 here)
//!        ^ TCP, connected by the shim as soon              | TCP, accepted by the shim
//!        | as CRIU listens                                 v
//! [origin bridge] <- unix socket <- node agents -> unix socket <- [destination bridge]
//!   <state>/pages/<key>.sock        (HTTP upgrade)   (incoming mark's pages_socket)
//! ```
//!
//! The downtime no longer grows with the memory: on this project's VMs a 1 GiB process ran on
//! the destination 0.48 s after its dump began (by hand, `runc checkpoint --lazy-pages` and a
//! lazy `runc restore` in one run), against 5-7 s for a stop-and-copy.
//!
//! What can go wrong, and how nothing is lost:
//! - CRIU ends a lazy dump successfully, killing the frozen processes, as soon as its page
//!   client closes the connection, whether it had every page or not (seen by hand: a
//!   `lazy-pages` daemon killed mid-fill, and the origin's processes were gone). So the
//!   bytes never go straight from one CRIU to the other: each side's shim bridges them, and
//!   the destination's bridge adds one thing to the stream: after the daemon's bytes, a
//!   [`COMPLETE`] frame, sent only once the daemon has exited 0 (every page is in place).
//!   The origin's bridge passes the end of the stream on to CRIU only after that frame; any
//!   other end (the destination died, the node agents lost the connection, a client that
//!   connects and closes: what a node agent does to abort) resets CRIU's connection, and CRIU
//!   then fails the dump and unfreezes the processes: the workload runs on at the origin
//!   from where it was frozen, and the shim removes its page-less checkpoint.
//! - The destination kills its container when the daemon fails (as any lazy restore,
//!   [`crate::lazy`]): a process must never run on with pages it lacks.
//! - The origin node dying during the fill loses the workload: its memory existed only
//!   there. That is the price of post-copy; a migration asks for it explicitly.
//!
//! CRIU's page server speaks plain TCP without authentication, so it listens on 127.0.0.1
//! only, and the origin's shim connects to it the moment CRIU reports it listening (CRIU
//! serves one connection); between nodes the bytes travel through the node agents'
//! authenticated connection.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UnixListener, UnixStream},
    sync::oneshot,
};

/// The file a post-copy checkpoint carries among its CRIU images (listed in its manifest like
/// them): its pages are not there.
pub const MARKER: &str = "mig-post-copy";

/// Whether the CRIU images in `images` are a post-copy checkpoint's.
pub fn is_post_copy(images: &Path) -> bool {
    images.join(MARKER).exists()
}

/// The frame length that says the daemon has every page (no data follows).
pub const COMPLETE: u32 = u32::MAX;
/// The largest data frame the destination sends.
const MAX_FRAME: usize = 64 << 10;
/// How long the origin waits for the destination to connect before it gives up (resuming
/// the workload).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the origin passes CRIU's last bytes on after the destination said it is complete.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// How the origin's pages were served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Served {
    /// The destination has every page.
    Complete,
    /// It did not say so; CRIU's connection was reset (the dump fails, the processes resume).
    Aborted(String),
}

/// Binds the origin's pages socket at `path` (root only), replacing a stale one.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// The pipe size CRIU's page server asks for (`PIPE_MAX_SIZE` pages of 4 KiB) to serve pages.
const CRIU_PIPE_BYTES: u64 = 4 << 20;

/// CRIU's lazy page server sets its pipes to 4 MiB and, when that fails, serves nothing
/// (every request fails with "splice: Bad file descriptor", CRIU 4.2). Root may exceed
/// `fs.pipe-max-size` (1 MiB by default) only with CAP_SYS_RESOURCE, which some container
/// hosts withhold: say so before the dump rather than after.
pub fn check_pipe_size() -> crate::error::Result<()> {
    let max: u64 = std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(u64::MAX);
    if max >= CRIU_PIPE_BYTES || has_sys_resource() {
        return Ok(());
    }
    Err(crate::error::Error::FailedPrecondition(format!(
        "post-copy: CRIU's page server needs pipes of {CRIU_PIPE_BYTES} bytes, but \
         fs.pipe-max-size is {max} and the shim lacks CAP_SYS_RESOURCE to exceed it; raise it \
         (sysctl -w fs.pipe-max-size={CRIU_PIPE_BYTES}; scripts/setup.sh does) or migrate \
         without post-copy"
    )))
}

/// Whether this process has CAP_SYS_RESOURCE (bit 24 of CapEff).
fn has_sys_resource() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << 24) != 0)
}

/// A free port on 127.0.0.1 for CRIU's page server.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Origin: pipes one client of `listener` to CRIU's page server connection `criu`: CRIU's
/// bytes as they are, the client's unframed. Only a [`COMPLETE`] frame lets CRIU see the end
/// of the stream; anything else resets its connection.
pub async fn serve(listener: UnixListener, criu: TcpStream, wait: Duration) -> Served {
    let client = match tokio::time::timeout(wait, listener.accept()).await {
        Ok(Ok((client, _))) => client,
        Ok(Err(e)) => return reset(criu, format!("accepting the destination failed: {e}")),
        Err(_) => {
            return reset(
                criu,
                format!("no destination fetched the pages within {wait:?}"),
            );
        }
    };
    drop(listener);
    // Page requests and answers are small and go one by one: no Nagle delay.
    let _ = criu.set_nodelay(true);
    let mut criu = criu;
    let mut client = client;
    let end = {
        let (mut criu_r, mut criu_w) = criu.split();
        let (mut client_r, mut client_w) = client.split();
        let down = async {
            let _ = copy_large(&mut criu_r, &mut client_w).await;
            let _ = client_w.shutdown().await;
        };
        let up = async {
            let end = unframe(&mut client_r, &mut criu_w).await;
            if end.is_ok() {
                // Every page is in place: CRIU may end the dump (and the frozen processes).
                let _ = criu_w.shutdown().await;
            }
            end
        };
        tokio::pin!(down, up);
        let mut down_done = false;
        let end = loop {
            tokio::select! {
                end = &mut up => break end,
                _ = &mut down, if !down_done => down_done = true,
            }
        };
        if end.is_ok() && !down_done {
            // CRIU closes once the dump is over; the client gets that end too.
            let _ = tokio::time::timeout(DRAIN_TIMEOUT, &mut down).await;
        }
        end
    };
    match end {
        Ok(()) => Served::Complete,
        Err(why) => reset(criu, why),
    }
}

/// Copies `from` to `to` until `from` ends, in pieces of up to 256 KiB: the pages come in
/// answers of up to megabytes (`tokio::io::copy` reads and writes 8 KiB at a time).
async fn copy_large<R, W>(from: &mut R, to: &mut W) -> std::io::Result<u64>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 256 << 10];
    let mut total = 0;
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return Ok(total);
        }
        to.write_all(&buf[..n]).await?;
        total += n as u64;
    }
}

/// Copies data frames from `from` to `to` until a [`COMPLETE`] frame (`Ok`); `Err` says how
/// the stream ended otherwise.
async fn unframe<R, W>(from: &mut R, to: &mut W) -> Result<(), String>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; MAX_FRAME];
    loop {
        let len = match from.read_u32().await {
            Ok(len) => len,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err("the destination closed before it had every page".into());
            }
            Err(e) => return Err(format!("reading from the destination failed: {e}")),
        };
        if len == COMPLETE {
            return Ok(());
        }
        let len = len as usize;
        if len == 0 || len > MAX_FRAME {
            return Err(format!(
                "the destination sent a frame of {len} bytes; expected 1 to {MAX_FRAME}"
            ));
        }
        from.read_exact(&mut buf[..len])
            .await
            .map_err(|e| format!("the destination's stream broke mid-frame: {e}"))?;
        to.write_all(&buf[..len])
            .await
            .map_err(|e| format!("CRIU's page server stopped reading: {e}"))?;
    }
}

/// Closes CRIU's connection with a reset, so that the dump fails and the processes resume.
fn reset(criu: TcpStream, why: String) -> Served {
    reset_connection(criu);
    Served::Aborted(why)
}

/// Closes `conn` with a reset (SO_LINGER 0) instead of an orderly end of stream.
pub fn reset_connection(conn: TcpStream) {
    // Deprecated because a non-zero linger blocks the thread on drop; a zero one does not.
    #[allow(deprecated)]
    let _ = conn.set_linger(Some(Duration::ZERO));
    drop(conn);
}

/// Destination: pipes the `criu lazy-pages` daemon's connection (the one `listener` accepts)
/// to `pages_socket`, framing the daemon's bytes, and ends with a [`COMPLETE`] frame once
/// `exited` says the daemon exited 0. `daemon` is the daemon's pid: a connection from any
/// other process is refused (it could feed the container pages of its own).
pub async fn fetch(
    listener: TcpListener,
    daemon: i32,
    pages_socket: PathBuf,
    mut exited: oneshot::Receiver<i32>,
) -> Result<(), String> {
    let conn = loop {
        let (conn, peer) = tokio::select! {
            accepted = listener.accept() => accepted
                .map_err(|e| format!("accepting the lazy pages daemon failed: {e}"))?,
            code = &mut exited => {
                return Err(format!(
                    "the lazy pages daemon exited (status {}) before it connected",
                    code.unwrap_or(-1)
                ));
            }
        };
        if connected_from(daemon, peer.port()) {
            break conn;
        }
        tracing::warn!(%peer, daemon, "refused a page server connection that is not the lazy pages daemon's");
    };
    drop(listener);
    let _ = conn.set_nodelay(true);
    let remote = UnixStream::connect(&pages_socket)
        .await
        .map_err(|e| format!("connect to {}: {e}", pages_socket.display()))?;
    let (mut daemon_r, mut daemon_w) = conn.into_split();
    let (mut remote_r, mut remote_w) = remote.into_split();
    let down = tokio::spawn(async move {
        let _ = copy_large(&mut remote_r, &mut daemon_w).await;
        let _ = daemon_w.shutdown().await;
    });
    let mut buf = vec![0u8; MAX_FRAME];
    loop {
        let n = daemon_r
            .read(&mut buf)
            .await
            .map_err(|e| format!("reading the lazy pages daemon failed: {e}"))?;
        if n == 0 {
            break;
        }
        remote_w
            .write_u32(n as u32)
            .await
            .map_err(|e| format!("the origin's pages connection broke: {e}"))?;
        remote_w
            .write_all(&buf[..n])
            .await
            .map_err(|e| format!("the origin's pages connection broke: {e}"))?;
    }
    let code = exited.await.unwrap_or(-1);
    // The daemon is gone: nothing more to pass on to it.
    down.abort();
    if code == 0 {
        remote_w
            .write_u32(COMPLETE)
            .await
            .map_err(|e| format!("telling the origin the pages are in failed: {e}"))?;
    }
    let _ = remote_w.shutdown().await;
    if code == 0 {
        Ok(())
    } else {
        Err(format!("the lazy pages daemon exited with status {code}"))
    }
}

/// Whether the TCP connection from local port `port` to this node's 127.0.0.1 belongs to
/// process `pid` or one of its descendants (one of their fds is that socket): `criu` may be a
/// wrapper that runs the real one.
fn connected_from(pid: i32, port: u16) -> bool {
    let Some(inode) = tcp_inode(port) else {
        return false;
    };
    let want = format!("socket:[{inode}]");
    let mut pids = vec![pid];
    while let Some(p) = pids.pop() {
        if let Ok(fds) = std::fs::read_dir(format!("/proc/{p}/fd"))
            && fds.flatten().any(|fd| {
                std::fs::read_link(fd.path())
                    .map(|l| l.to_string_lossy() == want)
                    .unwrap_or(false)
            })
        {
            return true;
        }
        pids.extend(children(p));
    }
    false
}

/// The children of `pid`, from `/proc/<pid>/task/*/children`.
fn children(pid: i32) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect()
}

/// The inode of the socket whose local address is 127.0.0.1:`port`, from `/proc/net/tcp`.
fn tcp_inode(port: u16) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let local = format!("0100007F:{port:04X}");
    table.lines().skip(1).find_map(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        (cols.get(1) == Some(&local.as_str()))
            .then(|| cols.get(9)?.parse().ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    /// The origin's bridge with a fake CRIU (`criu_far`), a client on its socket.
    async fn origin(dir: &Path) -> (tokio::task::JoinHandle<Served>, TcpStream, UnixStream) {
        let path = dir.join("pages").join("w.sock");
        let listener = bind(&path).unwrap();
        let (criu_near, criu_far) = pair().await;
        let served = tokio::spawn(serve(listener, criu_near, Duration::from_secs(5)));
        let client = UnixStream::connect(&path).await.unwrap();
        (served, criu_far, client)
    }

    #[tokio::test]
    async fn the_origin_passes_the_end_on_only_after_the_complete_frame() {
        let dir = tempfile::tempdir().unwrap();
        let (served, mut criu, mut client) = origin(dir.path()).await;
        client.write_u32(5).await.unwrap();
        client.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        criu.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        criu.write_all(b"pages").await.unwrap();
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"pages");
        client.write_u32(COMPLETE).await.unwrap();
        client.shutdown().await.unwrap();
        // CRIU sees a clean end of stream, then closes its side.
        assert_eq!(criu.read(&mut got).await.unwrap(), 0);
        drop(criu);
        assert_eq!(served.await.unwrap(), Served::Complete);
    }

    #[tokio::test]
    async fn a_destination_that_closes_without_the_complete_frame_resets_criu() {
        let dir = tempfile::tempdir().unwrap();
        let (served, mut criu, mut client) = origin(dir.path()).await;
        client.write_u32(3).await.unwrap();
        client.write_all(b"abc").await.unwrap();
        drop(client);
        let mut got = [0u8; 3];
        criu.read_exact(&mut got).await.unwrap();
        let err = criu.read(&mut got).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
        match served.await.unwrap() {
            Served::Aborted(why) => assert!(why.contains("before it had every page"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_bad_frame_or_no_client_resets_criu() {
        let dir = tempfile::tempdir().unwrap();
        let (served, mut criu, mut client) = origin(dir.path()).await;
        client.write_u32(0).await.unwrap();
        let mut got = [0u8; 1];
        assert!(criu.read(&mut got).await.is_err());
        match served.await.unwrap() {
            Served::Aborted(why) => assert!(why.contains("expected 1 to"), "{why}"),
            other => panic!("{other:?}"),
        }

        let listener = bind(&dir.path().join("x.sock")).unwrap();
        let (near, mut far) = pair().await;
        let served = serve(listener, near, Duration::from_millis(50)).await;
        assert!(
            matches!(&served, Served::Aborted(w) if w.contains("within")),
            "{served:?}"
        );
        assert!(far.read(&mut got).await.is_err());
    }

    #[tokio::test]
    async fn the_destination_frames_the_daemon_and_completes_only_on_a_clean_exit() {
        for code in [0, 1] {
            let dir = tempfile::tempdir().unwrap();
            let sock = dir.path().join("dest.sock");
            let origin = UnixListener::bind(&sock).unwrap();
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (tx, rx) = oneshot::channel();
            let me = std::process::id() as i32;
            let fetching = tokio::spawn(fetch(listener, me, sock.clone(), rx));
            let mut daemon = TcpStream::connect(addr).await.unwrap();
            let (mut o, _) = origin.accept().await.unwrap();
            daemon.write_all(b"get").await.unwrap();
            assert_eq!(o.read_u32().await.unwrap(), 3);
            let mut got = [0u8; 3];
            o.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"get");
            o.write_all(b"page").await.unwrap();
            let mut page = [0u8; 4];
            daemon.read_exact(&mut page).await.unwrap();
            assert_eq!(&page, b"page");
            drop(daemon);
            tx.send(code).unwrap();
            let mut rest = Vec::new();
            o.read_to_end(&mut rest).await.unwrap();
            if code == 0 {
                assert_eq!(rest, COMPLETE.to_be_bytes());
                fetching.await.unwrap().unwrap();
            } else {
                assert!(rest.is_empty(), "{rest:?}");
                let e = fetching.await.unwrap().unwrap_err();
                assert!(e.contains("status 1"), "{e}");
            }
        }
    }

    #[tokio::test]
    async fn the_destination_accepts_only_the_daemon() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (_tx, rx) = oneshot::channel();
        // A `sleep` (no socket, no children) stands for the daemon: this test's connection is
        // not its, so it is refused and the bridge waits on.
        let mut other = std::process::Command::new("sleep")
            .arg("10")
            .spawn()
            .unwrap();
        let fetching = tokio::spawn(fetch(
            listener,
            other.id() as i32,
            dir.path().join("none"),
            rx,
        ));
        let mut stranger = TcpStream::connect(addr).await.unwrap();
        let mut b = [0u8; 1];
        assert_eq!(stranger.read(&mut b).await.unwrap(), 0);
        assert!(!fetching.is_finished());
        fetching.abort();
        let _ = other.kill();
        let _ = other.wait();
    }
}
