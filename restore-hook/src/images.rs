//! The checkpoint images in the checkpoint directory, and which of them form the checkpoint.
//!
//! DMTCP overwrites `ckpt_<prog>_<id>.dmtcp` per process, so images of processes that have
//! since exited stay behind; restarting them would resurrect dead processes. After each
//! complete checkpoint the hook therefore writes a manifest naming exactly that checkpoint's
//! images (atomically, by rename) and deletes the others. Restart uses the manifest, or every
//! image when there is none (a checkpoint taken by hand with `dmtcp_command`).

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The manifest's file name inside the checkpoint directory; one image name per line.
pub const MANIFEST: &str = "mig-images.txt";
const RESTART_SCRIPT_PREFIX: &str = "dmtcp_restart_script_";

fn is_image(name: &str) -> bool {
    name.starts_with("ckpt_") && name.ends_with(".dmtcp")
}

fn names(dir: &Path) -> io::Result<Vec<String>> {
    let mut v: Vec<String> = fs::read_dir(dir)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    v.sort();
    Ok(v)
}

/// The images of the checkpoint in `dir`, or `None` when it holds none (a first start).
pub fn find_checkpoint(dir: &Path) -> io::Result<Option<Vec<PathBuf>>> {
    let manifest = dir.join(MANIFEST);
    let listed: Vec<String> = match fs::read_to_string(&manifest) {
        Ok(text) => text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            names(dir)?.into_iter().filter(|n| is_image(n)).collect()
        }
        Err(e) => return Err(e),
    };
    if listed.is_empty() {
        return Ok(None);
    }
    let paths: Vec<PathBuf> = listed.iter().map(|n| dir.join(n)).collect();
    if let Some(missing) = paths.iter().find(|p| !p.is_file()) {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "{} lists {} but it is missing: incomplete checkpoint",
                manifest.display(),
                missing.display()
            ),
        ));
    }
    Ok(Some(paths))
}

/// Removes DMTCP's restart scripts, so that a new one proves a checkpoint completed.
pub fn remove_restart_scripts(dir: &Path) -> io::Result<()> {
    for name in names(dir)? {
        if name.starts_with("dmtcp_restart_script") && name.ends_with(".sh") {
            fs::remove_file(dir.join(&name))?;
        }
    }
    Ok(())
}

/// The restart script the coordinator writes once every process has written its image.
pub fn find_restart_script(dir: &Path) -> io::Result<Option<PathBuf>> {
    Ok(names(dir)?
        .into_iter()
        .find(|n| n.starts_with(RESTART_SCRIPT_PREFIX) && n.ends_with(".sh"))
        .map(|n| dir.join(n)))
}

/// The image names a restart script lists, if the script is complete: its
/// `# Number of processes in the computation = N` must match `given_ckpt_files`.
pub fn parse_restart_script(text: &str) -> Option<Vec<String>> {
    let mut expected = None;
    let mut files = None;
    for line in text.lines() {
        if let Some(n) = line.strip_prefix("# Number of processes in the computation = ") {
            expected = n.trim().parse::<usize>().ok();
        } else if let Some(v) = line.strip_prefix("given_ckpt_files=\"") {
            let v = v.trim_end().strip_suffix('"')?;
            files = Some(
                v.split_whitespace()
                    .filter_map(|p| Path::new(p).file_name()?.to_str().map(str::to_owned))
                    .collect::<Vec<_>>(),
            );
        }
    }
    let files = files?;
    (Some(files.len()) == expected && !files.is_empty()).then_some(files)
}

/// Makes `images` the checkpoint in `dir`: writes the manifest, then deletes other images.
pub fn commit(dir: &Path, images: &[String]) -> io::Result<()> {
    let tmp = dir.join(format!(".{MANIFEST}.tmp"));
    {
        let mut f = fs::File::create(&tmp)?;
        for name in images {
            writeln!(f, "{name}")?;
        }
        f.sync_all()?;
    }
    fs::rename(&tmp, dir.join(MANIFEST))?;
    for name in names(dir)? {
        let stale_temp = name.starts_with("ckpt_") && name.ends_with(".dmtcp.temp");
        if (is_image(&name) && !images.contains(&name)) || stale_temp {
            fs::remove_file(dir.join(&name))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRIPT: &str = "#!/bin/bash\n# Number of hosts in the computation = 1\n\
        # Number of processes in the computation = 2\n\n\
        given_ckpt_files=\" /.mig/ckpt/ckpt_a_1.dmtcp /.mig/ckpt/ckpt_b_2.dmtcp\"\n\n";

    #[test]
    fn restart_script() {
        assert_eq!(
            parse_restart_script(SCRIPT),
            Some(vec!["ckpt_a_1.dmtcp".into(), "ckpt_b_2.dmtcp".into()])
        );
        let partial = SCRIPT.replace("= 2", "= 3");
        assert_eq!(parse_restart_script(&partial), None);
        assert_eq!(parse_restart_script("#!/bin/bash\n"), None);
    }

    #[test]
    fn manifest_commit_and_find() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert_eq!(find_checkpoint(d).unwrap(), None);
        for n in ["ckpt_a_1.dmtcp", "ckpt_old_9.dmtcp", "ckpt_b_2.dmtcp.temp"] {
            fs::write(d.join(n), b"x").unwrap();
        }
        // Without a manifest every image counts.
        assert_eq!(find_checkpoint(d).unwrap().unwrap().len(), 2);
        commit(d, &["ckpt_a_1.dmtcp".into()]).unwrap();
        assert_eq!(
            find_checkpoint(d).unwrap(),
            Some(vec![d.join("ckpt_a_1.dmtcp")])
        );
        assert!(!d.join("ckpt_old_9.dmtcp").exists());
        assert!(!d.join("ckpt_b_2.dmtcp.temp").exists());
        fs::remove_file(d.join("ckpt_a_1.dmtcp")).unwrap();
        assert!(find_checkpoint(d).is_err());
    }
}
