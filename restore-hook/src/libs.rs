//! Making DMTCP's shared libraries findable without shadowing the image's own.
//!
//! DMTCP's programs and `libdmtcp.so`, which is preloaded into the application, link against
//! libatomic, libstdc++ and libgcc_s; minimal images lack some of them. Pointing
//! `LD_LIBRARY_PATH` at all of the node's copies would also replace the image's own copies in
//! the application (`LD_LIBRARY_PATH` is searched before the default dirs), so only the libraries
//! the image lacks are linked into a private dir, appended to `LD_LIBRARY_PATH`.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Where the dynamic loader looks by default in the images we run (Debian multiarch and
/// traditional layouts).
fn default_lib_dirs() -> Vec<PathBuf> {
    let triple = format!("{}-linux-gnu", std::env::consts::ARCH);
    [
        format!("/lib/{triple}"),
        format!("/usr/lib/{triple}"),
        "/lib64".into(),
        "/usr/lib64".into(),
        "/lib".into(),
        "/usr/lib".into(),
        "/usr/local/lib".into(),
    ]
    .into_iter()
    .map(PathBuf::from)
    .collect()
}

/// Links the libraries of `deps_dir` that none of `lib_dirs` holds into `private_dir`, and
/// returns the `LD_LIBRARY_PATH` to use (`current` with `private_dir` appended), or `current`
/// unchanged when nothing is missing.
pub fn fallback_library_path(
    deps_dir: &Path,
    private_dir: &Path,
    lib_dirs: &[PathBuf],
    current: Option<OsString>,
) -> io::Result<Option<OsString>> {
    let entries = match fs::read_dir(deps_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(current),
        Err(e) => return Err(e),
    };
    let mut missing = Vec::new();
    for entry in entries {
        let name = entry?.file_name();
        if !lib_dirs.iter().any(|d| d.join(&name).exists()) {
            missing.push(name);
        }
    }
    if missing.is_empty() {
        return Ok(current);
    }
    // A restarted container gets a fresh tmp dir, but be idempotent anyway.
    let _ = fs::remove_dir_all(private_dir);
    fs::create_dir_all(private_dir)?;
    for name in &missing {
        std::os::unix::fs::symlink(deps_dir.join(name), private_dir.join(name))?;
    }
    let mut path = current.unwrap_or_default();
    if !path.is_empty() {
        path.push(":");
    }
    path.push(private_dir);
    Ok(Some(path))
}

/// [`fallback_library_path`] for the image the hook runs in.
pub fn library_path(deps_dir: &Path, tmp_dir: &Path) -> io::Result<Option<OsString>> {
    fallback_library_path(
        deps_dir,
        &tmp_dir.join("mig-libs"),
        &default_lib_dirs(),
        std::env::var_os("LD_LIBRARY_PATH"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_missing_libraries_are_linked() {
        let t = tempfile::tempdir().unwrap();
        let deps = t.path().join("deps");
        let image_lib = t.path().join("lib");
        fs::create_dir_all(&deps).unwrap();
        fs::create_dir_all(&image_lib).unwrap();
        for n in ["libatomic.so.1", "libstdc++.so.6"] {
            fs::write(deps.join(n), b"").unwrap();
        }
        fs::write(image_lib.join("libstdc++.so.6"), b"").unwrap();
        let private = t.path().join("private");
        let lp = fallback_library_path(
            &deps,
            &private,
            std::slice::from_ref(&image_lib),
            Some("/app/lib".into()),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            lp,
            OsString::from(format!("/app/lib:{}", private.display()))
        );
        assert!(private.join("libatomic.so.1").exists());
        assert!(!private.join("libstdc++.so.6").exists());

        let none = fallback_library_path(&t.path().join("absent"), &private, &[], None).unwrap();
        assert_eq!(none, None);
    }
}
