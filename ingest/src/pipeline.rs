//! An ordered parallel map: workers pull indices in increasing order, the caller
//! consumes results strictly in index order (so output does not depend on scheduling).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;

/// Runs `work(i)` for `i in 0..n` on every thread of `pool` and passes each result to
/// `consume(i, result)` on the calling thread in increasing `i`.
///
/// Workers take the next index from a shared counter, so at any time they are at most
/// a few items ahead of the consumer, with no barrier between batches. The first error
/// from `consume` stops the workers and is returned.
pub fn ordered_map<T, E>(
    pool: &rayon::ThreadPool,
    n: usize,
    work: impl Fn(usize) -> T + Sync,
    mut consume: impl FnMut(usize, T) -> Result<(), E>,
) -> Result<(), E>
where
    T: Send,
{
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let (tx, rx) = mpsc::sync_channel::<(usize, T)>(pool.current_num_threads() * 4);
    std::thread::scope(|s| {
        let (next, stop, work) = (&next, &stop, &work);
        s.spawn(move || {
            pool.broadcast(|_| {
                let tx = tx.clone();
                while !stop.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n || tx.send((i, work(i))).is_err() {
                        break;
                    }
                }
            });
        });
        let mut ahead = BTreeMap::new();
        let mut expected = 0;
        let mut result = Ok(());
        for (i, r) in rx.iter() {
            if result.is_err() {
                continue; // drain so no worker blocks on a full channel
            }
            ahead.insert(i, r);
            while let Some(r) = ahead.remove(&expected) {
                expected += 1;
                if let Err(e) = consume(expected - 1, r) {
                    stop.store(true, Ordering::Relaxed);
                    result = Err(e);
                    ahead.clear();
                    break;
                }
            }
        }
        result
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_arrive_in_order_whatever_the_timing() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(4)
            .build()
            .unwrap();
        let mut seen = Vec::new();
        ordered_map(
            &pool,
            200,
            |i| {
                if i % 7 == 0 {
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
                i * 2
            },
            |i, v| {
                assert_eq!(v, i * 2);
                seen.push(i);
                Ok::<_, ()>(())
            },
        )
        .unwrap();
        assert_eq!(seen, (0..200).collect::<Vec<_>>());
    }

    #[test]
    fn consumer_error_stops_early() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let mut count = 0;
        let r = ordered_map(
            &pool,
            10_000,
            |i| i,
            |i, _| {
                count += 1;
                if i == 10 { Err("stop") } else { Ok(()) }
            },
        );
        assert_eq!(r, Err("stop"));
        assert_eq!(count, 11);
    }
}
