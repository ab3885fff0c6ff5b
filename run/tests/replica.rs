//! Rank 0 leads and the other ranks follow, without MPI: a fake link in one process
//! carries the orders from a [`Run`] to [`follow`] on another thread, so the orders'
//! sequence and what a follower makes of them are checked without spawning ranks.
//! Outside `mpirun` the trainer's in-step collectives are no-ops and both ends load
//! the whole batch, so a follower that carries out every order holds the leader's
//! weights bit for bit.

mod common;

use std::borrow::Cow;
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, Sender, channel};

use byol_run::replica::{FollowerParts, HEADER_WORDS, Leader, Link, Order, follow, receive};
use byol_run::{FaultPoints, Run, RunError, resume_or_init};
use byol_trainer::{StateDict, Trainer};

/// What crosses the fake link: one broadcast's words or bytes.
#[derive(Debug, Clone, PartialEq)]
enum Message {
    Words(Vec<u64>),
    Bytes(Vec<u8>),
}

/// The leader's end: every broadcast is sent down the channel.
struct Sending(Mutex<Sender<Message>>);

impl Link for Sending {
    fn broadcast_u64(&self, words: &mut [u64]) {
        let _ = self.0.lock().unwrap().send(Message::Words(words.to_vec()));
    }

    fn broadcast_bytes(&self, bytes: &mut Vec<u8>) {
        let _ = self.0.lock().unwrap().send(Message::Bytes(bytes.clone()));
    }
}

/// A follower's end: every broadcast receives the next message; the headers received
/// are kept, in order.
struct Receiving {
    rx: Mutex<Receiver<Message>>,
    headers: Mutex<Vec<Vec<u64>>>,
}

impl Receiving {
    fn new(rx: Receiver<Message>) -> Self {
        Receiving {
            rx: Mutex::new(rx),
            headers: Mutex::new(Vec::new()),
        }
    }
}

impl Link for Receiving {
    fn broadcast_u64(&self, words: &mut [u64]) {
        match self.rx.lock().unwrap().recv().expect("the leader is there") {
            Message::Words(w) => {
                words.copy_from_slice(&w);
                self.headers.lock().unwrap().push(w);
            }
            other => panic!("words expected, got {other:?}"),
        }
    }

    fn broadcast_bytes(&self, bytes: &mut Vec<u8>) {
        match self.rx.lock().unwrap().recv().expect("the leader is there") {
            Message::Bytes(b) => *bytes = b,
            other => panic!("bytes expected, got {other:?}"),
        }
    }
}

/// A leader of one follower, and the follower's end of its link.
fn link() -> (Leader, Receiving) {
    let (tx, rx) = channel();
    let sending: &'static Sending = Box::leak(Box::new(Sending(Mutex::new(tx))));
    (Leader::with_link(sending, 2), Receiving::new(rx))
}

#[test]
fn every_order_arrives_as_it_was_sent() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::dataset(dir.path());
    let manifest = byol_ingest::Dataset::open(&data)
        .unwrap()
        .manifest()
        .clone();
    let orders = [
        Order::Resume { step: None },
        Order::Resume { step: Some(0) },
        Order::Resume {
            step: Some(1 << 40),
        },
        Order::Start {
            manifest: Cow::Borrowed(&manifest),
        },
        Order::Step {
            manifest: None,
            total_steps: 702,
            read_health: false,
        },
        Order::Step {
            manifest: Some(Cow::Borrowed(&manifest)),
            total_steps: u64::MAX,
            read_health: true,
        },
        Order::ReadHealth,
        Order::Wait { millis: 250 },
        Order::Stop,
    ];
    let (leader, follower) = link();
    for order in &orders {
        leader.send(order);
    }
    for order in &orders {
        assert_eq!(&receive(&follower).unwrap(), order);
    }
    // The fixed-size part alone, a manifest only where one travels.
    let headers = follower.headers.lock().unwrap();
    assert_eq!(headers.len(), orders.len());
    assert!(headers.iter().all(|h| h.len() == HEADER_WORDS));
}

#[test]
fn an_order_this_rank_does_not_know_is_an_error() {
    let (tx, rx) = channel();
    tx.send(Message::Words(vec![99, 0, 0, 0])).unwrap();
    let follower = Receiving::new(rx);
    assert!(matches!(receive(&follower), Err(RunError::Peer(_))));
}

/// The header of each order the follower received: its kind, and for a step whether
/// it carried a manifest and read the health.
fn kinds(headers: &[Vec<u64>]) -> Vec<String> {
    headers
        .iter()
        .map(|h| match h[0] {
            1 => format!("resume {:?}", (h[1] == 1).then_some(h[2])),
            2 => "start".into(),
            3 => format!(
                "step{}{}",
                if h[1] == 1 { " +manifest" } else { "" },
                if h[3] == 1 { " +health" } else { "" }
            ),
            4 => "read health".into(),
            5 => "wait".into(),
            6 => "stop".into(),
            k => format!("unknown {k}"),
        })
        .collect()
}

fn bits(state: StateDict) -> Vec<(String, Vec<u32>)> {
    state
        .into_iter()
        .map(|(name, t)| {
            let v: Vec<f32> = t
                .to_dtype(candle_core::DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            (name, v.into_iter().map(f32::to_bits).collect())
        })
        .collect()
}

fn state_of(trainer: &Trainer) -> Vec<(String, Vec<u32>)> {
    let state = trainer.state().unwrap();
    let mut all = bits(state.online);
    all.extend(bits(state.objective));
    all.extend(bits(state.optimizer));
    all
}

/// A run's start, policy checkpoints and log steps, a non-finite loss rolled back to
/// the last checkpoint, a dataset that grows mid-run and the last checkpoint: the
/// follower is told each in turn, and ends with the leader's weights, objective and
/// optimizer state, bit for bit.
#[test]
fn a_follower_carrying_out_the_orders_holds_the_leaders_state() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let data = common::dataset(root);
    let (leader, follower_link) = link();
    let checkpoints = root.join("run/checkpoints");
    let parts = FollowerParts {
        trainer: common::trainer(),
        data: data.clone(),
        augmenter: common::augmenter(),
        loader: common::loader_config(),
        checkpoints: checkpoints.clone(),
    };
    let follower = std::thread::spawn(move || {
        let trainer = follow(parts, &follower_link);
        let headers = follower_link.headers.into_inner().unwrap();
        (trainer, headers)
    });

    // The leader's side, as `byol train` and the daemon start a run.
    let mut trainer = common::trainer();
    let resumed = resume_or_init(&mut trainer, &checkpoints).unwrap();
    assert!(resumed.is_none());
    leader.send(&Order::Resume { step: None });
    let dataset = byol_ingest::Dataset::open(&data).unwrap();
    leader.send(&Order::Start {
        manifest: Cow::Borrowed(dataset.manifest()),
    });
    let loader =
        byol_loader::Loader::new(dataset, common::augmenter(), common::loader_config(), None)
            .unwrap();
    let faults = FaultPoints {
        nan_at: Some(8),
        ..FaultPoints::default()
    };
    let parts = common::parts(root, trainer, loader, faults, 6, leader);
    let (mut run, _) = Run::start(parts).unwrap();
    for _ in 1..=9 {
        run.step(false).unwrap();
    }
    // Step 10 logs and finds step 8's loss: back to step 6's checkpoint.
    assert!(matches!(
        run.step(false),
        Err(RunError::NonFiniteLoss { step: 8, .. })
    ));
    let to = run.rollback().unwrap().expect("step 6's checkpoint");
    assert!(to.ends_with("step-0000000006"), "{}", to.display());
    // New images: the loader's next refresh plans with them, on both ends.
    common::images(&root.join("src"), 100, 16);
    common::ingest_src(root);
    for _ in 0..10 {
        run.step(false).unwrap();
    }
    let finished = run.finish();
    finished.metrics.unwrap();
    finished.checkpoint.expect("unsaved steps").unwrap();
    leader.send(&Order::Stop);

    let (followed, headers) = follower.join().unwrap();
    let followed = followed.unwrap();
    assert_eq!(run.trainer().steps_done(), 16);
    assert_eq!(followed.steps_done(), 16);
    assert!(
        state_of(&followed) == state_of(run.trainer()),
        "the follower's state differs from the leader's"
    );

    let kinds = kinds(&headers);
    let plain = |k: &str| k.strip_suffix(" +manifest").unwrap_or(k).to_owned();
    let mut expected: Vec<String> = vec!["resume None".into(), "start".into()];
    // Steps 1-10: the health read at the log steps (5, 10) and before the checkpoint
    // after step 6; then the resume at 6, steps 7-16 (log at 10 and 15, checkpoint after 12),
    // the last checkpoint's read at 16, and the stop.
    for step in 1..=10 {
        expected.push(
            if [5, 6, 10].contains(&step) {
                "step +health"
            } else {
                "step"
            }
            .into(),
        );
    }
    expected.push("resume Some(6)".into());
    for step in 7..=16 {
        expected.push(
            if [10, 12, 15].contains(&step) {
                "step +health"
            } else {
                "step"
            }
            .into(),
        );
    }
    expected.extend(["read health".into(), "stop".into()]);
    assert_eq!(
        kinds.iter().map(|k| plain(k)).collect::<Vec<_>>(),
        expected,
        "{kinds:?}"
    );
    let grown = kinds.iter().position(|k| k.contains("+manifest"));
    let rollback = kinds.iter().position(|k| k == "resume Some(6)").unwrap();
    assert!(
        grown.is_some_and(|g| g > rollback),
        "the grown dataset's manifest reached the follower: {kinds:?}"
    );
}
