//! Writing, verifying, replacing and consuming checkpoints.

mod common;

use std::fs::{self, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use mig_checkpoint::{
    Checkpoint, Corruption, EngineInfo, Error, SafeName, Store, Verified, WorkloadIdentity,
    sha256_file,
};
use tempfile::TempDir;

struct Fixture {
    tmp: TempDir,
    store: Store,
    identity: WorkloadIdentity,
    engine: EngineInfo,
    upper: PathBuf,
    volume: PathBuf,
}

fn fixture() -> Fixture {
    let tmp = TempDir::new().unwrap();
    let store = Store::open(tmp.path().join("state/checkpoints")).unwrap();
    let upper = tmp.path().join("upper");
    fs::create_dir_all(upper.join("etc")).unwrap();
    fs::write(upper.join("etc/app.conf"), b"mode=fast\n").unwrap();
    let volume = tmp.path().join("volume");
    fs::create_dir(&volume).unwrap();
    fs::write(volume.join("dump.rdb"), vec![7u8; 5000]).unwrap();
    Fixture {
        tmp,
        store,
        identity: WorkloadIdentity::kubernetes("default", "redis", "redis").unwrap(),
        engine: EngineInfo::new("criu", "4.2.1"),
        upper,
        volume,
    }
}

fn write_checkpoint(f: &Fixture, image: &str) -> Checkpoint {
    write_checkpoint_in(&f.store, f, image)
}

fn write_checkpoint_in(store: &Store, f: &Fixture, image: &str) -> Checkpoint {
    let mut writer = store.begin(&f.identity).unwrap();
    let images = writer.images_dir().unwrap();
    fs::write(images.join("pages-1.img"), vec![0xabu8; 10_000]).unwrap();
    fs::write(images.join("inventory.img"), b"inventory").unwrap();
    // Engines create files with their own modes; the commit must tighten them.
    fs::set_permissions(
        images.join("inventory.img"),
        fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    writer.add_upper_layer(&f.upper).unwrap();
    writer
        .add_volume(&SafeName::new("data").unwrap(), &f.volume)
        .unwrap();
    writer.commit(f.engine.clone(), image).unwrap()
}

fn hidden_entries(root: &Path) -> Vec<String> {
    fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

fn corruption(err: Error) -> (String, Corruption) {
    match err {
        Error::Corrupt { file, problem, .. } => (file, problem),
        other => panic!("expected a corruption error, got {other}"),
    }
}

#[test]
fn round_trip_writes_verifies_and_reads_the_manifest() {
    let f = fixture();
    let checkpoint = write_checkpoint(&f, "docker.io/library/redis:7");
    assert_eq!(checkpoint.dir(), f.store.path_for(&f.identity));
    assert!(checkpoint.dir().ends_with("k8s_default_redis_redis"));
    checkpoint.verify_for_restore(&f.engine).unwrap();

    let reopened = Checkpoint::open(checkpoint.dir()).unwrap();
    let manifest = reopened.manifest();
    assert_eq!(manifest, checkpoint.manifest());
    assert_eq!(manifest.format_version, mig_checkpoint::FORMAT_VERSION);
    assert_eq!(manifest.engine, f.engine);
    assert_eq!(manifest.identity, f.identity);
    assert_eq!(manifest.image, "docker.io/library/redis:7");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(now.abs_diff(manifest.created_unix) < 60);
    let paths: Vec<&str> = manifest.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "images/inventory.img",
            "images/pages-1.img",
            "rootfs/upper.tar",
            "volumes/data.tar"
        ]
    );
    for file in &manifest.files {
        let (size, sha) = sha256_file(&reopened.dir().join(&file.path)).unwrap();
        assert_eq!((size, sha.as_str()), (file.size, file.sha256.as_str()));
    }
    assert_eq!(
        reopened.upper_layer(),
        Some(reopened.dir().join("rootfs/upper.tar"))
    );
    assert_eq!(
        reopened.volumes(),
        vec![(
            SafeName::new("data").unwrap(),
            reopened.dir().join("volumes/data.tar")
        )]
    );
    assert_eq!(reopened.images_dir(), reopened.dir().join("images"));

    let pending = f
        .store
        .pending(&f.identity)
        .unwrap()
        .expect("pending checkpoint");
    assert_eq!(pending.manifest(), manifest);
    assert!(
        hidden_entries(f.store.root()).is_empty(),
        "temp dirs left behind"
    );

    // The archives unpack to what was packed.
    let out = f.tmp.path().join("restored-volume");
    mig_checkpoint::unpack_tree(&reopened.dir().join("volumes/data.tar"), &out).unwrap();
    assert_eq!(fs::read(out.join("dump.rdb")).unwrap(), vec![7u8; 5000]);
}

#[test]
fn written_checkpoint_is_private() {
    let f = fixture();
    let checkpoint = write_checkpoint(&f, "img");
    let mut seen = 0;
    let mut stack = vec![checkpoint.dir().to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = fs::symlink_metadata(&path).unwrap();
        let mode = meta.mode() & 0o7777;
        if meta.is_dir() {
            assert_eq!(mode, 0o700, "{}", path.display());
            stack.extend(fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        } else {
            assert!(meta.is_file(), "{}", path.display());
            assert_eq!(mode, 0o600, "{}", path.display());
            seen += 1;
        }
        if common::is_root() {
            assert_eq!((meta.uid(), meta.gid()), (0, 0), "{}", path.display());
        }
    }
    assert_eq!(
        seen, 6,
        "four payload files, the manifest and the verified stamp"
    );
    let root_mode = fs::metadata(f.store.root()).unwrap().mode() & 0o777;
    assert_eq!(root_mode, 0o700);
}

#[test]
fn tampered_file_is_rejected_with_both_digests() {
    let f = fixture();
    let checkpoint = write_checkpoint(&f, "img");
    let path = checkpoint.dir().join("images/pages-1.img");
    let mut file = OpenOptions::new().write(true).open(&path).unwrap();
    file.seek(SeekFrom::Start(4321)).unwrap();
    file.write_all(&[0xac]).unwrap();
    drop(file);

    let err = checkpoint.verify_for_restore(&f.engine).unwrap_err();
    let message = err.to_string();
    let listed = checkpoint
        .manifest()
        .file("images/pages-1.img")
        .unwrap()
        .sha256
        .clone();
    let (file, problem) = corruption(err);
    assert_eq!(file, "images/pages-1.img");
    let Corruption::Sha256Mismatch {
        manifest,
        file: actual,
    } = problem
    else {
        panic!("expected a sha256 mismatch, got {problem}");
    };
    assert_eq!(manifest, listed);
    assert_ne!(actual, listed);
    assert!(
        message.contains(&format!(
            "images/pages-1.img: sha256 mismatch (manifest {listed}, file {actual})"
        )),
        "{message}"
    );
}

#[test]
fn truncated_file_is_rejected() {
    let f = fixture();
    let checkpoint = write_checkpoint(&f, "img");
    let path = checkpoint.dir().join("rootfs/upper.tar");
    let size = fs::metadata(&path).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(size / 2)
        .unwrap();
    let err = checkpoint.verify().unwrap_err();
    assert!(
        err.to_string().contains("rootfs/upper.tar: truncated"),
        "{err}"
    );
    assert_eq!(
        corruption(err),
        (
            "rootfs/upper.tar".to_owned(),
            Corruption::SizeMismatch {
                manifest: size,
                file: size / 2
            }
        )
    );
}

#[test]
fn missing_listed_file_is_rejected() {
    let f = fixture();
    let checkpoint = write_checkpoint(&f, "img");
    fs::remove_file(checkpoint.dir().join("volumes/data.tar")).unwrap();
    let err = checkpoint.verify().unwrap_err();
    assert_eq!(
        corruption(err),
        ("volumes/data.tar".to_owned(), Corruption::Missing)
    );
}

#[test]
fn extra_files_are_rejected() {
    let f = fixture();
    let checkpoint = write_checkpoint(&f, "img");

    let extra = checkpoint.dir().join("images/pages-2.img");
    fs::write(&extra, b"smuggled").unwrap();
    let err = checkpoint.verify().unwrap_err();
    assert!(
        err.to_string().contains("images/pages-2.img: not listed"),
        "{err}"
    );
    assert_eq!(
        corruption(err),
        ("images/pages-2.img".to_owned(), Corruption::Unlisted)
    );
    fs::remove_file(&extra).unwrap();

    fs::write(checkpoint.dir().join("README"), b"top level").unwrap();
    let err = checkpoint.verify().unwrap_err();
    assert_eq!(corruption(err), ("README".to_owned(), Corruption::Unlisted));
    fs::remove_file(checkpoint.dir().join("README")).unwrap();

    std::os::unix::fs::symlink("/etc/shadow", checkpoint.dir().join("volumes/x.tar")).unwrap();
    let err = checkpoint.verify().unwrap_err();
    assert_eq!(
        corruption(err),
        (
            "volumes/x.tar".to_owned(),
            Corruption::NotARegularFile { kind: "symlink" }
        )
    );
    fs::remove_file(checkpoint.dir().join("volumes/x.tar")).unwrap();
    checkpoint.verify().unwrap();
}

#[test]
fn missing_manifest_is_rejected() {
    let f = fixture();
    let checkpoint = write_checkpoint(&f, "img");
    fs::remove_file(checkpoint.dir().join("manifest.json")).unwrap();
    let err = Checkpoint::open(checkpoint.dir()).unwrap_err();
    assert!(matches!(err, Error::MissingManifest { .. }), "{err}");
    assert!(err.to_string().contains("no manifest.json"), "{err}");
    let err = f.store.pending(&f.identity).unwrap_err();
    assert!(matches!(err, Error::MissingManifest { .. }), "{err}");
}

#[test]
fn wrong_engine_or_version_is_refused_naming_both() {
    let f = fixture();
    let checkpoint = write_checkpoint(&f, "img");
    let err = checkpoint
        .verify_for_restore(&EngineInfo::new("dmtcp", "4.2.0"))
        .unwrap_err();
    assert!(matches!(err, Error::EngineMismatch { .. }));
    let message = err.to_string();
    assert!(
        message.contains("made by criu 4.2.1") && message.contains("restores with dmtcp 4.2.0"),
        "{message}"
    );
    let err = checkpoint
        .verify_for_restore(&EngineInfo::new("criu", "4.1.1"))
        .unwrap_err();
    assert!(err.to_string().contains("criu 4.1.1"), "{err}");
    checkpoint.verify_for_restore(&f.engine).unwrap();
}

fn edit_manifest(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("manifest.json");
    let mut value: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    edit(&mut value);
    fs::write(&path, serde_json::to_vec(&value).unwrap()).unwrap();
}

#[test]
fn unknown_format_version_is_refused() {
    let f = fixture();
    let checkpoint = write_checkpoint(&f, "img");
    edit_manifest(checkpoint.dir(), |m| {
        m["format_version"] = 2.into();
        m["files"] = "a future shape".into();
    });
    let err = Checkpoint::open(checkpoint.dir()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::UnsupportedFormat {
                found: 2,
                supported: 1,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn manifest_paths_escaping_the_checkpoint_are_refused() {
    let f = fixture();
    let checkpoint = write_checkpoint(&f, "img");
    for bad in [
        "../outside",
        "/etc/passwd",
        "images/../../x",
        "images",
        "other/x",
        "images//x",
    ] {
        edit_manifest(checkpoint.dir(), |m| m["files"][0]["path"] = bad.into());
        let err = Checkpoint::open(checkpoint.dir()).unwrap_err();
        match corruption(err) {
            (file, Corruption::InvalidPath { .. }) => assert_eq!(file, bad),
            other => panic!("{bad}: {other:?}"),
        }
    }
}

#[test]
fn new_checkpoint_replaces_the_previous_one() {
    let f = fixture();
    write_checkpoint(&f, "first");
    let second = write_checkpoint(&f, "second");
    assert_eq!(second.manifest().image, "second");
    let pending = f.store.pending(&f.identity).unwrap().unwrap();
    assert_eq!(pending.manifest().image, "second");
    pending.verify().unwrap();
    assert!(hidden_entries(f.store.root()).is_empty());
}

#[test]
fn abandoned_writer_leaves_nothing() {
    let f = fixture();
    let writer = f.store.begin(&f.identity).unwrap();
    let tmp = writer.dir().to_path_buf();
    fs::write(writer.images_dir().unwrap().join("pages-1.img"), b"x").unwrap();
    assert!(tmp.exists());
    drop(writer);
    assert!(!tmp.exists());
    assert!(f.store.pending(&f.identity).unwrap().is_none());
    assert!(fs::read_dir(f.store.root()).unwrap().next().is_none());
}

#[test]
fn adding_a_part_twice_is_an_error() {
    let f = fixture();
    let mut writer = f.store.begin(&f.identity).unwrap();
    writer.add_upper_layer(&f.upper).unwrap();
    let err = writer.add_upper_layer(&f.upper).unwrap_err();
    assert!(matches!(err, Error::AlreadyAdded { .. }), "{err}");
}

#[test]
fn consume_deletes_and_remove_reports_presence() {
    let f = fixture();
    write_checkpoint(&f, "img");
    let pending = f.store.pending(&f.identity).unwrap().unwrap();
    f.store.consume(pending).unwrap();
    assert!(f.store.pending(&f.identity).unwrap().is_none());
    assert!(hidden_entries(f.store.root()).is_empty());

    write_checkpoint(&f, "img");
    assert!(f.store.remove(&f.identity).unwrap());
    assert!(!f.store.remove(&f.identity).unwrap());
}

#[test]
fn consume_keeps_a_newer_checkpoint() {
    let f = fixture();
    write_checkpoint(&f, "old");
    let opened = f.store.pending(&f.identity).unwrap().unwrap();
    write_checkpoint(&f, "new");
    let err = f.store.consume(opened).unwrap_err();
    assert!(matches!(err, Error::Replaced { .. }), "{err}");
    let pending = f.store.pending(&f.identity).unwrap().unwrap();
    assert_eq!(pending.manifest().image, "new");
    pending.verify().unwrap();
}

#[test]
fn pending_refuses_a_checkpoint_of_another_workload() {
    let f = fixture();
    let checkpoint = write_checkpoint(&f, "img");
    let other = WorkloadIdentity::kubernetes("default", "postgres", "db").unwrap();
    fs::rename(checkpoint.dir(), f.store.path_for(&other)).unwrap();
    let err = f.store.pending(&other).unwrap_err();
    assert!(matches!(err, Error::IdentityMismatch { .. }), "{err}");
}

fn copy_tree(from: &Path, to: &Path) {
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            fs::create_dir_all(&target).unwrap();
            copy_tree(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target).unwrap();
        }
    }
}

#[test]
fn received_checkpoint_is_verified_then_installed() {
    let f = fixture();
    let sent = write_checkpoint(&f, "img");
    let destination = Store::open(f.tmp.path().join("node-b")).unwrap();

    let writer = destination.begin(&f.identity).unwrap();
    copy_tree(sent.dir(), writer.dir());
    let received = writer.commit_received().unwrap();
    assert_eq!(received.dir(), destination.path_for(&f.identity));
    received.verify_for_restore(&f.engine).unwrap();

    // A corrupted transfer is refused and nothing is installed.
    destination.remove(&f.identity).unwrap();
    let writer = destination.begin(&f.identity).unwrap();
    copy_tree(sent.dir(), writer.dir());
    fs::write(writer.dir().join("images/inventory.img"), b"inventorY").unwrap();
    let err = writer.commit_received().unwrap_err();
    assert!(
        err.to_string()
            .contains("images/inventory.img: sha256 mismatch"),
        "{err}"
    );
    assert!(destination.pending(&f.identity).unwrap().is_none());
    assert!(fs::read_dir(destination.root()).unwrap().next().is_none());
}

#[test]
fn stale_leftovers_are_removed() {
    let f = fixture();
    let writer = f.store.begin(&f.identity).unwrap();
    let tmp = writer.dir().to_path_buf();
    // Simulates a crash: the writer's Drop never runs.
    std::mem::forget(writer);
    assert_eq!(
        f.store
            .remove_stale(std::time::Duration::from_secs(3600))
            .unwrap(),
        0
    );
    assert_eq!(f.store.remove_stale(std::time::Duration::ZERO).unwrap(), 1);
    assert!(!tmp.exists());
}

/// Overwrites one byte of `path` in place, keeping its size, then puts its mtime back.
fn flip_byte_keeping_size_and_mtime(path: &Path, at: u64) {
    let before = fs::metadata(path).unwrap().modified().unwrap();
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut byte = [0u8];
    file.seek(SeekFrom::Start(at)).unwrap();
    std::io::Read::read_exact(&mut file, &mut byte).unwrap();
    file.seek(SeekFrom::Start(at)).unwrap();
    file.write_all(&[byte[0] ^ 0x01]).unwrap();
    file.set_modified(before).unwrap();
}

#[test]
fn valid_stamp_skips_hashing_and_changed_metadata_forces_it() {
    let f = fixture();
    let checkpoint = write_checkpoint(&f, "img");
    assert_eq!(checkpoint.stamp_status(), Ok(()));
    // Stamp valid: nothing is hashed.
    assert_eq!(
        checkpoint.verify_for_restore(&f.engine).unwrap(),
        Verified::ByStamp
    );
    // A full verify of the same checkpoint agrees.
    checkpoint.verify().unwrap();

    let path = checkpoint.dir().join("images/pages-1.img");
    flip_byte_keeping_size_and_mtime(&path, 1234);
    // The write moved ctime, which only a clock change could set back: the stamp no longer
    // matches, and
    // the full verification finds the flipped byte even though size and mtime are as before.
    let reason = checkpoint.stamp_status().unwrap_err();
    assert!(reason.contains("images/pages-1.img changed"), "{reason}");
    let err = checkpoint.verify_for_restore(&f.engine).unwrap_err();
    let (file, problem) = corruption(err);
    assert_eq!(file, "images/pages-1.img");
    assert!(
        matches!(problem, Corruption::Sha256Mismatch { .. }),
        "{problem}"
    );
}

#[test]
fn stamp_is_not_trusted_after_manifest_or_file_replacement() {
    let f = fixture();
    let checkpoint = write_checkpoint(&f, "img");
    // Replacing a file by an identical copy (new inode) voids the stamp; the hash passes.
    let path = checkpoint.dir().join("images/inventory.img");
    let copy = checkpoint.dir().join("images/inventory.copy");
    fs::copy(&path, &copy).unwrap();
    fs::rename(&copy, &path).unwrap();
    assert!(checkpoint.stamp_status().is_err());
    assert_eq!(
        checkpoint.verify_for_restore(&f.engine).unwrap(),
        Verified::Hashed
    );

    // A stamp that is not private is ignored.
    let f = fixture();
    let checkpoint = write_checkpoint(&f, "img");
    let stamp = checkpoint.dir().join("verified.json");
    fs::set_permissions(&stamp, fs::Permissions::from_mode(0o644)).unwrap();
    assert!(checkpoint.stamp_status().is_err());
    checkpoint.verify_for_restore(&f.engine).unwrap();

    // A stamp from another boot (data not fsynced on a destination may have been lost in a
    // crash while the metadata survived) is not trusted.
    let f = fixture();
    let checkpoint = write_checkpoint(&f, "img");
    let mut value: serde_json::Value =
        serde_json::from_slice(&fs::read(stamp_path(&checkpoint)).unwrap()).unwrap();
    value["boot_id"] = serde_json::Value::String("00000000-0000-0000-0000-000000000000".into());
    fs::write(stamp_path(&checkpoint), serde_json::to_vec(&value).unwrap()).unwrap();
    let reason = checkpoint.stamp_status().unwrap_err();
    assert!(reason.contains("another boot"), "{reason}");
    assert_eq!(
        checkpoint.verify_for_restore(&f.engine).unwrap(),
        Verified::Hashed
    );

    // An edited manifest voids the stamp (and is then caught by the hash).
    let f = fixture();
    let checkpoint = write_checkpoint(&f, "img");
    edit_manifest(checkpoint.dir(), |m| {
        m["files"][0]["sha256"] = serde_json::Value::String("0".repeat(64));
    });
    let reopened = Checkpoint::open(checkpoint.dir()).unwrap();
    assert!(reopened.stamp_status().is_err());
    let (file, _) = corruption(reopened.verify_for_restore(&f.engine).unwrap_err());
    assert_eq!(file, "images/inventory.img");
}

#[test]
fn received_checkpoint_hashed_in_stream_is_checked_and_stamped() {
    let f = fixture();
    let sent = write_checkpoint(&f, "img");
    let destination = Store::open(f.tmp.path().join("node-b")).unwrap();
    let copy = |writer: &mig_checkpoint::CheckpointWriter| {
        copy_tree(sent.dir(), writer.dir());
        // The sender never sends its stamp.
        fs::remove_file(writer.dir().join("verified.json")).unwrap();
    };

    let writer = destination.begin(&f.identity).unwrap();
    copy(&writer);
    let received = writer.commit_received_hashed(sent.files()).unwrap();
    assert_eq!(received.stamp_status(), Ok(()));
    assert_eq!(
        received.verify_for_restore(&f.engine).unwrap(),
        Verified::ByStamp
    );
    received.verify().unwrap();

    // Digests that do not match the manifest are refused, naming the file.
    destination.remove(&f.identity).unwrap();
    let writer = destination.begin(&f.identity).unwrap();
    copy(&writer);
    let mut hashed = sent.files().to_vec();
    hashed[1].sha256 = "0".repeat(64);
    let (file, problem) = corruption(writer.commit_received_hashed(&hashed).unwrap_err());
    assert_eq!(file, "images/pages-1.img");
    assert!(
        matches!(problem, Corruption::Sha256Mismatch { .. }),
        "{problem}"
    );

    // A file missing from the digests, an extra file on disk, a truncated file: refused.
    let writer = destination.begin(&f.identity).unwrap();
    copy(&writer);
    let (file, _) = corruption(
        writer
            .commit_received_hashed(&sent.files()[..3])
            .unwrap_err(),
    );
    assert_eq!(file, "volumes/data.tar");
    let writer = destination.begin(&f.identity).unwrap();
    copy(&writer);
    fs::write(writer.dir().join("images/extra.img"), b"x").unwrap();
    let (file, problem) = corruption(writer.commit_received_hashed(sent.files()).unwrap_err());
    assert_eq!(
        (file.as_str(), problem),
        ("images/extra.img", Corruption::Unlisted)
    );
    let writer = destination.begin(&f.identity).unwrap();
    copy(&writer);
    OpenOptions::new()
        .write(true)
        .open(writer.dir().join("images/pages-1.img"))
        .unwrap()
        .set_len(10)
        .unwrap();
    let (file, problem) = corruption(writer.commit_received_hashed(sent.files()).unwrap_err());
    assert_eq!(file, "images/pages-1.img");
    assert!(
        matches!(problem, Corruption::SizeMismatch { .. }),
        "{problem}"
    );
    assert!(destination.pending(&f.identity).unwrap().is_none());
}

fn stamp_path(checkpoint: &Checkpoint) -> PathBuf {
    checkpoint.dir().join("verified.json")
}

/// A store with a memory root: a transient checkpoint goes there when it fits, carries its
/// size hint, verifies like any other, and a workload has one checkpoint across both roots.
#[test]
fn transient_checkpoints_go_to_memory_when_they_fit_and_replace_across_roots() {
    let f = fixture();
    let memory = f.tmp.path().join("shm/checkpoints");
    let store = f.store.clone().with_memory(&memory).unwrap();
    assert_eq!(store.memory_root(), Some(memory.as_path()));

    let before = std::time::SystemTime::now();
    let mut writer = store.begin_transient(&f.identity, 1 << 20).unwrap();
    assert!(writer.in_memory());
    assert!(writer.dir().starts_with(&memory));
    assert_eq!(
        store.writing(&f.identity, before).unwrap().as_deref(),
        Some(writer.dir())
    );
    assert_eq!(Store::size_hint(writer.dir()), Some(1 << 20));
    fs::write(
        writer.images_dir().unwrap().join("pages-1.img"),
        [1u8; 4096],
    )
    .unwrap();
    writer.set_durable(false);
    let in_memory = writer.commit(f.engine.clone(), "img").unwrap();
    assert!(store.in_memory(in_memory.dir()));
    assert_eq!(
        store.path_for(&f.identity),
        memory.join(f.identity.safe_key())
    );
    assert_eq!(
        store.pending(&f.identity).unwrap().unwrap().dir(),
        in_memory.dir()
    );
    // The hint is not part of the payload: the checkpoint verifies.
    in_memory.verify().unwrap();

    // A checkpoint on disk replaces it: the one in memory is gone.
    let on_disk = write_checkpoint_in(&store, &f, "img2");
    assert!(!store.in_memory(on_disk.dir()));
    assert!(!memory.join(f.identity.safe_key()).exists());
    assert_eq!(store.path_for(&f.identity), on_disk.dir());
    assert_eq!(
        store
            .pending(&f.identity)
            .unwrap()
            .unwrap()
            .manifest()
            .image,
        "img2"
    );

    // And back: a transient one replaces the one on disk.
    let writer = store.begin_transient(&f.identity, 4096).unwrap();
    let again = writer.commit(f.engine.clone(), "img3").unwrap();
    assert!(store.in_memory(again.dir()));
    assert!(!f.store.root().join(f.identity.safe_key()).exists());

    // Too big for this node's memory: written to disk.
    let huge = store.begin_transient(&f.identity, u64::MAX / 4).unwrap();
    assert!(!huge.in_memory());
    assert!(huge.dir().starts_with(f.store.root()));
    assert_eq!(Store::size_hint(huge.dir()), None);
    drop(huge);

    assert!(store.remove(&f.identity).unwrap());
    assert!(store.pending(&f.identity).unwrap().is_none());
    assert!(hidden_entries(&memory).is_empty());
    assert!(!store.remove(&f.identity).unwrap());

    // Without a memory root, transient means disk.
    let plain = f.store.begin_transient(&f.identity, 1).unwrap();
    assert!(!plain.in_memory());
}

/// On a real tmpfs too small for the checkpoint (64 KiB), a transient checkpoint goes to
/// disk; one that fits goes to the tmpfs.
#[test]
fn a_memory_root_without_room_sends_the_checkpoint_to_disk() {
    if common::skip_unless_root("a_memory_root_without_room_sends_the_checkpoint_to_disk") {
        return;
    }
    let f = fixture();
    let tiny = f.tmp.path().join("tiny");
    fs::create_dir(&tiny).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs"])
        .arg(&tiny)
        .status()
        .unwrap();
    assert!(mounted.success(), "mount a tmpfs at {}", tiny.display());
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(tiny.clone());
    let store = f.store.clone().with_memory(tiny.join("store")).unwrap();

    let big = store.begin_transient(&f.identity, 1 << 20).unwrap();
    assert!(!big.in_memory(), "1 MiB does not fit in a 64 KiB tmpfs");
    assert!(big.dir().starts_with(f.store.root()));
    drop(big);
    let small = store.begin_transient(&f.identity, 4096).unwrap();
    assert!(small.in_memory());
    assert!(small.dir().starts_with(&tiny));
}
