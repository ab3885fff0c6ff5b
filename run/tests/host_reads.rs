//! The training path reads nothing from the device between log steps: the loss, the
//! non-finite flag and the embeddings' health are read at log steps and before
//! checkpoints only (every read counted by `byol_trainer::host`).

mod common;

use std::path::Path;

use byol_run::replica::Leader;
use byol_run::{FaultPoints, Run, RunError};
use byol_trainer::host::reads_on_this_thread;

/// A width-4 ResNet-18 on 16-px views, batch 8, logging every 5 steps, no checkpoint by
/// policy.
fn run(dir: &Path, faults: FaultPoints) -> Run {
    let loader = common::loader(&common::dataset(dir));
    let parts = common::parts(dir, common::trainer(), loader, faults, 0, Leader::alone());
    Run::start(parts).unwrap().0
}

#[test]
fn steps_between_log_steps_read_nothing_from_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let mut run = run(dir.path(), FaultPoints::default());
    for step in 1..=12u64 {
        let before = reads_on_this_thread();
        let report = run.step(false).unwrap();
        let reads = reads_on_this_thread() - before;
        if step % 5 == 0 {
            // The loss and the non-finite flag, the embeddings' collapse and rank.
            assert!(reads > 0, "step {step} logs");
            let line = report.line.expect("a log step");
            assert!(line.loss.is_finite(), "{line:?}");
        } else {
            assert_eq!(reads, 0, "step {step} read the device {reads} times");
            assert!(report.line.is_none());
        }
    }
    // A checkpoint reads the flag of the steps since the last read, then the tensors.
    let before = reads_on_this_thread();
    run.checkpoint().unwrap();
    assert!(reads_on_this_thread() > before);
}

#[test]
fn a_non_finite_loss_is_found_at_the_next_log_step_and_never_checkpointed() {
    let dir = tempfile::tempdir().unwrap();
    let faults = FaultPoints {
        nan_at: Some(7),
        ..FaultPoints::default()
    };
    let mut run = run(dir.path(), faults);
    for _ in 1..=9 {
        run.step(false).unwrap();
    }
    // Step 10 logs: the read finds step 7's loss.
    match run.step(false) {
        Err(RunError::NonFiniteLoss { step: 7, loss }) => assert!(loss.is_nan()),
        other => panic!("expected the non-finite loss of step 7, got {other:?}"),
    }
    assert!(matches!(
        run.checkpoint(),
        Err(RunError::Diverged { step: 10 })
    ));
    assert!(
        matches!(
            run.step(false),
            Err(RunError::NonFiniteLoss { step: 7, .. })
        ),
        "no step until the rollback"
    );
    assert_eq!(
        run.rollback().unwrap(),
        None,
        "no checkpoint: back to the seed"
    );
    assert_eq!(run.trainer().steps_done(), 0);
    run.step(false).unwrap();
}

#[test]
fn a_checkpoint_between_log_steps_checks_the_steps_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let faults = FaultPoints {
        nan_at: Some(2),
        ..FaultPoints::default()
    };
    let mut run = run(dir.path(), faults);
    for _ in 0..3 {
        run.step(false).unwrap();
    }
    assert!(matches!(
        run.checkpoint(),
        Err(RunError::Diverged { step: 3 })
    ));
    assert!(!dir.path().join("run/checkpoints/step-0000000003").exists());
}
