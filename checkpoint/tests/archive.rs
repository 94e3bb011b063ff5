//! Packing and unpacking overlay upper layers and volumes.

mod common;

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::process::Command;

use common::{set_mtime, set_xattr, skip_unless_root, snapshot};
use mig_checkpoint::{Error, pack_tree, unpack_tree, unpack_upper};
use tempfile::TempDir;

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

fn keep_all(_: &str) -> bool {
    false
}

/// A tree that needs no privilege: files, modes, symlinks, a hardlink, a fifo, mtimes.
fn unprivileged_tree(root: &Path) {
    fs::create_dir_all(root.join("etc/conf.d")).unwrap();
    fs::write(root.join("etc/app.conf"), b"port=6379\n").unwrap();
    fs::write(root.join("etc/conf.d/extra"), vec![0u8; 70_000]).unwrap();
    chmod(&root.join("etc/app.conf"), 0o640);
    fs::create_dir(root.join("bin")).unwrap();
    fs::write(root.join("bin/tool"), b"#!/bin/sh\n").unwrap();
    chmod(&root.join("bin/tool"), 0o755);
    fs::hard_link(root.join("bin/tool"), root.join("bin/tool-alias")).unwrap();
    symlink("/etc/app.conf", root.join("absolute-link")).unwrap();
    symlink("../etc/app.conf", root.join("bin/relative-link")).unwrap();
    symlink("dangling", root.join("dangling-link")).unwrap();
    let fifo = std::ffi::CString::new(root.join("bin/pipe").to_str().unwrap()).unwrap();
    // SAFETY: valid C string.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o620) }, 0);
    let long = root.join("d".repeat(120)).join("f".repeat(120));
    fs::create_dir(long.parent().unwrap()).unwrap();
    fs::write(&long, b"long path").unwrap();
    chmod(&root.join("etc"), 0o750);
    set_mtime(&root.join("etc/app.conf"), 1_700_000_000, 123_456_789);
    set_mtime(&root.join("absolute-link"), 1_600_000_000, 5);
    set_mtime(&root.join("etc"), 1_650_000_000, 42);
    set_mtime(root, 1_650_000_001, 43);
}

#[test]
fn round_trip_preserves_files_links_modes_and_mtimes() {
    let tmp = TempDir::new().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    unprivileged_tree(&src);
    let tar = tmp.path().join("tree.tar");
    pack_tree(&src, &tar).unwrap();
    let out = tmp.path().join("out");
    unpack_tree(&tar, &out).unwrap();
    assert_eq!(snapshot(&src, &keep_all), snapshot(&out, &keep_all));

    // Packing is deterministic.
    let again = tmp.path().join("again.tar");
    pack_tree(&out, &again).unwrap();
    assert_eq!(fs::read(&tar).unwrap(), fs::read(&again).unwrap());
}

#[test]
fn upper_layer_round_trip_keeps_whiteouts_opaque_dirs_ownership_and_xattrs() {
    if skip_unless_root("upper_layer_round_trip_keeps_whiteouts_opaque_dirs_ownership_and_xattrs") {
        return;
    }
    let tmp = TempDir::new().unwrap();
    let upper = tmp.path().join("upper");
    fs::create_dir(&upper).unwrap();
    unprivileged_tree(&upper);
    common::mknod_whiteout(&upper.join("etc/deleted-from-lower"));
    fs::create_dir(upper.join("var")).unwrap();
    set_xattr(&upper.join("var"), "trusted.overlay.opaque", b"y").unwrap();
    fs::create_dir(upper.join("srv")).unwrap();
    set_xattr(&upper.join("srv"), "user.overlay.opaque", b"y").unwrap();
    set_xattr(
        &upper.join("etc/app.conf"),
        "user.mig.test",
        b"\x00binary\xff",
    )
    .unwrap();
    // Newlines in a value (overlayfs' own uuid is 16 random bytes) must not break the archive.
    set_xattr(
        &upper.join("etc"),
        "user.mig.lines",
        b"line1\nline2\x00\xff\n",
    )
    .unwrap();
    set_xattr(
        &upper.join("bin/tool"),
        "trusted.overlay.origin",
        b"node-local",
    )
    .unwrap();
    fs::write(upper.join("var/data"), b"owned").unwrap();
    std::os::unix::fs::lchown(upper.join("var/data"), Some(1234), Some(5678)).unwrap();
    std::os::unix::fs::lchown(upper.join("absolute-link"), Some(42), Some(43)).unwrap();
    std::os::unix::fs::lchown(upper.join("var"), Some(999), Some(999)).unwrap();
    fs::write(upper.join("bin/suid"), b"x").unwrap();
    std::os::unix::fs::lchown(upper.join("bin/suid"), Some(1000), Some(1000)).unwrap();
    chmod(&upper.join("bin/suid"), 0o4755);
    chmod(&upper.join("var"), 0o1777);

    let tar = tmp.path().join("upper.tar");
    pack_tree(&upper, &tar).unwrap();
    let restored = tmp.path().join("restored");
    unpack_upper(&tar, &restored).unwrap();

    let origin = |name: &str| name == "trusted.overlay.origin";
    let before = snapshot(&upper, &origin);
    let after = snapshot(&restored, &keep_all);
    assert_eq!(before, after);
    assert_eq!(after["etc/deleted-from-lower"].kind, "char");
    assert_eq!(after["etc/deleted-from-lower"].rdev, 0);
    assert_eq!(after["var"].xattrs["trusted.overlay.opaque"], b"y");
    assert_eq!(after["srv"].xattrs["user.overlay.opaque"], b"y");
    assert_eq!(
        after["etc"].xattrs["user.mig.lines"],
        b"line1\nline2\x00\xff\n"
    );
    assert_eq!((after["var/data"].uid, after["var/data"].gid), (1234, 5678));
    assert_eq!(after["bin/suid"].mode, 0o4755);
    assert!(
        !after["bin/tool"]
            .xattrs
            .contains_key("trusted.overlay.origin")
    );
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn mount_overlay(lower: &Path, upper: &Path, work: &Path, merged: &Path) -> Result<(), String> {
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    run(Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &options])
        .arg(merged))
}

struct Unmount<'a>(&'a Path);
impl Drop for Unmount<'_> {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0).status();
    }
}

/// The whole path a migration takes: changes made through a real overlay mount, the upper
/// directory packed, unpacked elsewhere and mounted again over the same lower layer.
#[test]
fn real_overlay_upper_survives_pack_and_unpack() {
    if skip_unless_root("real_overlay_upper_survives_pack_and_unpack") {
        return;
    }
    let tmp = TempDir::new().unwrap();
    let dir = |name: &str| {
        let p = tmp.path().join(name);
        fs::create_dir(&p).unwrap();
        p
    };
    let (lower, upper, work, merged) = (dir("lower"), dir("upper"), dir("work"), dir("merged"));
    fs::write(lower.join("keep"), b"lower file").unwrap();
    fs::write(lower.join("delete-me"), b"gone after migration").unwrap();
    fs::create_dir(lower.join("cache")).unwrap();
    fs::write(lower.join("cache/stale"), b"hidden by the opaque dir").unwrap();

    if let Err(e) = mount_overlay(&lower, &upper, &work, &merged) {
        println!(
            "skipping real_overlay_upper_survives_pack_and_unpack: cannot mount overlay ({e})"
        );
        return;
    }
    {
        let _mounted = Unmount(&merged);
        fs::remove_file(merged.join("delete-me")).unwrap();
        fs::remove_dir_all(merged.join("cache")).unwrap();
        fs::create_dir(merged.join("cache")).unwrap();
        fs::write(merged.join("cache/fresh"), b"new").unwrap();
        fs::write(merged.join("keep"), b"modified").unwrap();
        fs::write(merged.join("state"), b"app state").unwrap();
        std::os::unix::fs::lchown(merged.join("state"), Some(1001), Some(1002)).unwrap();
        fs::hard_link(merged.join("state"), merged.join("state-link")).unwrap();
        symlink("state", merged.join("state-symlink")).unwrap();
    }
    let whiteout = fs::symlink_metadata(upper.join("delete-me")).unwrap();
    assert!(
        std::os::unix::fs::FileTypeExt::is_char_device(&whiteout.file_type()),
        "overlay made a whiteout"
    );
    assert_eq!(
        common::xattr_value(&upper.join("cache"), "trusted.overlay.opaque"),
        b"y"
    );

    let tar = tmp.path().join("upper.tar");
    pack_tree(&upper, &tar).unwrap();
    let upper2 = dir("upper2");
    // A new container's upper directory already has runc's mount points in it.
    fs::create_dir(upper2.join("proc")).unwrap();
    unpack_upper(&tar, &upper2).unwrap();
    let node_local = |name: &str| name.ends_with(".overlay.origin");
    let mut expected = snapshot(&upper, &node_local);
    let mut actual = snapshot(&upper2, &node_local);
    assert!(actual.remove("proc").is_some());
    // Adding `proc` changed the root directory's link count only; compare the rest.
    expected.remove(".");
    actual.remove(".");
    assert_eq!(expected, actual);

    let (work2, merged2) = (dir("work2"), dir("merged2"));
    mount_overlay(&lower, &upper2, &work2, &merged2).unwrap();
    let _mounted = Unmount(&merged2);
    assert!(
        !merged2.join("delete-me").exists(),
        "whiteout still hides the file"
    );
    assert_eq!(fs::read(merged2.join("keep")).unwrap(), b"modified");
    let cache: Vec<_> = fs::read_dir(merged2.join("cache"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(cache, ["fresh"], "opaque dir hides the lower content");
    assert_eq!(
        fs::read(merged2.join("state-symlink")).unwrap(),
        b"app state"
    );
}

fn craft(tar_path: &Path, build: impl FnOnce(&mut tar::Builder<fs::File>)) {
    let mut builder = tar::Builder::new(fs::File::create(tar_path).unwrap());
    build(&mut builder);
    builder.finish().unwrap();
}

fn header(kind: tar::EntryType, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(size);
    h
}

fn file_header(size: u64) -> tar::Header {
    header(tar::EntryType::Regular, size)
}

#[test]
fn unpack_refuses_entries_that_escape_the_destination() {
    let tmp = TempDir::new().unwrap();
    let outside = tmp.path().join("outside");
    fs::create_dir(&outside).unwrap();

    // A symlink entry followed by a file "through" it.
    let tar = tmp.path().join("through-symlink.tar");
    craft(&tar, |b| {
        let mut h = header(tar::EntryType::Symlink, 0);
        b.append_link(&mut h, "escape", &outside).unwrap();
        b.append_data(&mut file_header(4), "escape/pwned", &b"evil"[..])
            .unwrap();
    });
    let err = unpack_tree(&tar, &tmp.path().join("d1")).unwrap_err();
    assert!(matches!(err, Error::Archive { .. }), "{err}");
    assert!(err.to_string().contains("escape/pwned"), "{err}");
    assert!(!outside.join("pwned").exists());

    // A `..` path, written into the raw header since the builder refuses it.
    let tar = tmp.path().join("dotdot.tar");
    craft(&tar, |b| {
        let mut h = file_header(4);
        h.as_old_mut().name[..13].copy_from_slice(b"../outside/x\0");
        h.set_cksum();
        b.append(&h, &b"evil"[..]).unwrap();
    });
    let err = unpack_tree(&tar, &tmp.path().join("d2")).unwrap_err();
    assert!(err.to_string().contains("escapes the destination"), "{err}");
    assert!(!outside.join("x").exists());

    // A hardlink to a file outside.
    fs::write(outside.join("secret"), b"secret").unwrap();
    let tar = tmp.path().join("hardlink.tar");
    craft(&tar, |b| {
        let mut h = header(tar::EntryType::Link, 0);
        b.append_link(&mut h, "stolen", "../outside/secret")
            .unwrap();
    });
    let err = unpack_tree(&tar, &tmp.path().join("d3")).unwrap_err();
    assert!(err.to_string().contains("hardlink target escapes"), "{err}");
}

#[test]
fn pack_refuses_a_missing_source() {
    let tmp = TempDir::new().unwrap();
    let err = pack_tree(&tmp.path().join("nope"), &tmp.path().join("x.tar")).unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
}
