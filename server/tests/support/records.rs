//! Migration records as a controller would have journaled them, for the tests that start a
//! controller on a journal left by another. Include it with
//! `#[path = "support/records.rs"] mod records;`.

use mig_server::migration::{Migration, Phase, Target};

/// The migration `mig-1-0` of the deployment `workload` (one container of the same name) in
/// namespace `default` from `origin` to `dest`, advanced phase by phase up to `phase` (a
/// running phase, or `done`).
pub fn migration_at(workload: &str, origin: &str, dest: &str, phase: Phase) -> Migration {
    let mut m = Migration::new(
        "mig-1-0".into(),
        Target::Deployment(workload.into()),
        "default".into(),
        origin.into(),
        dest.into(),
    );
    m.containers = vec![workload.into()];
    let upto = Phase::ALL
        .iter()
        .position(|p| *p == phase)
        .expect("a phase");
    for p in &Phase::ALL[1..=upto] {
        m.advance(*p).expect("advance");
    }
    m
}

/// `m`, resumed by a restarted controller, ended `done` with the warning that the restart
/// happened while it was in `phase`.
pub fn assert_done_after_restart_while(m: &Migration, phase: &str) {
    assert_eq!(m.phase, Phase::Done, "{m:?}");
    let warning = format!("the controller restarted while {phase}; ");
    assert!(
        m.warnings.iter().any(|w| w.starts_with(&warning)),
        "no warning starting {warning:?}: {m:?}"
    );
}
