//! Throughput of the checkpoint stream (issue 4), without containerd or the network: one
//! checkpoint in a store on disk, sent by `mig_server::stream` into a socket pair and received
//! on the other end into a second store, next to `zstd -1 -T1 | cat` of the same bytes.
//!
//!   cargo run --release -p mig-server --example stream-throughput [MiB]   (default 256)
//!
//! The stores are under `/var/tmp` (disk); `STREAM_DIR=/dev/shm` puts them in memory, as a
//! migration's checkpoints are where the node has the room (README, "Checkpoints in memory").
//!
//! Rows: page images of random bytes (do not compress: stored) and of repeated text
//! (compress). Columns, MiB/s of checkpoint bytes: send (into `io::sink`), receive (from the
//! recorded stream in memory, hashing and writing), end to end (both at once, through a socket pair,
//! as two agents run), and `zstd -1 -T1` of the page image into `cat >/dev/null`.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Instant;

use mig_checkpoint::{EngineInfo, Store, WorkloadIdentity};
use mig_server::containerd::ContainerInfo;
use mig_server::stream::{receive_checkpoint, send_checkpoint};

fn main() {
    let mib: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("size in MiB"))
        .unwrap_or(256);
    let base = std::env::var_os("STREAM_DIR").unwrap_or_else(|| "/var/tmp".into());
    let dir = tempfile::tempdir_in(&base).expect("temp dir");
    println!("stream-throughput: {mib} MiB page image, MiB/s of checkpoint bytes");
    println!(
        "{:<8} | {:>8} {:>8} {:>8} | {:>8} | {:>7}",
        "payload", "send", "receive", "e2e", "zstd|cat", "ratio"
    );
    for kind in ["random", "text"] {
        let payload = payload(kind, mib << 20);
        let origin = Store::open(dir.path().join(format!("o-{kind}"))).expect("store");
        let identity = WorkloadIdentity::container("bench", "stream").expect("identity");
        let writer = origin.begin(&identity).expect("begin");
        let images = writer.images_dir().expect("images");
        let pages = images.join("pages-1.img");
        let rel = pages
            .strip_prefix(writer.dir())
            .expect("inside")
            .to_path_buf();
        std::fs::write(&pages, &payload).expect("write");
        let ckpt = writer
            .commit(EngineInfo::new("criu", "4.2.1"), "bench")
            .expect("commit");
        let info = ContainerInfo {
            namespace: "bench".into(),
            id: "stream".into(),
            image: "bench".into(),
            runtime: "io.containerd.mig.v2".into(),
            labels: Default::default(),
            spec: serde_json::json!({}),
        };
        let rate = |secs: f64| payload.len() as f64 / (1 << 20) as f64 / secs;

        let t = Instant::now();
        send_checkpoint(ckpt.dir(), &info, std::io::sink(), 1).expect("send");
        let send = rate(t.elapsed().as_secs_f64());
        let mut wire = Vec::new();
        send_checkpoint(ckpt.dir(), &info, &mut wire, 1).expect("send");

        let dest = Store::open(dir.path().join(format!("d-{kind}"))).expect("store");
        let t = Instant::now();
        receive_checkpoint(&wire[..], &dest, None, |_, _| Ok(())).expect("receive");
        let receive = rate(t.elapsed().as_secs_f64());
        let ratio = wire.len() as f64 / payload.len() as f64;
        drop(wire);

        let dest = Store::open(dir.path().join(format!("e-{kind}"))).expect("store");
        let (reader, writer) = std::os::unix::net::UnixStream::pair().expect("socket pair");
        let t = Instant::now();
        std::thread::scope(|s| {
            let ckpt_dir = ckpt.dir();
            let info = &info;
            s.spawn(move || {
                let mut w = std::io::BufWriter::with_capacity(1 << 16, writer);
                send_checkpoint(ckpt_dir, info, &mut w, 1).expect("send");
                w.flush().expect("flush");
            });
            receive_checkpoint(reader, &dest, None, |_, _| Ok(())).expect("receive");
        });
        let e2e = rate(t.elapsed().as_secs_f64());

        let t = Instant::now();
        let ok = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "zstd -1 -T1 -c '{}' | cat >/dev/null",
                ckpt.dir().join(&rel).display()
            ))
            .stdout(Stdio::null())
            .status()
            .expect("zstd")
            .success();
        let zstd = if ok {
            rate(t.elapsed().as_secs_f64())
        } else {
            f64::NAN
        };
        println!("{kind:<8} | {send:>8.0} {receive:>8.0} {e2e:>8.0} | {zstd:>8.0} | {ratio:>7.3}");
    }
}

fn payload(kind: &str, len: usize) -> Vec<u8> {
    match kind {
        "random" => {
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
            let mut v = Vec::with_capacity(len);
            while v.len() < len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                v.extend_from_slice(&x.to_le_bytes());
            }
            v.truncate(len);
            v
        }
        _ => b"counter=41 ticks; session open; "
            .iter()
            .copied()
            .cycle()
            .take(len)
            .collect(),
    }
}
