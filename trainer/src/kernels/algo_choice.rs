//! Which convolution algorithm runs, out of the candidates cuDNN's heuristics list for a
//! shape (`cudnnGetConvolution*Algorithm_v7`, best first): the rule, apart from cuDNN so
//! it is tested without a GPU.
//!
//! - Candidates cuDNN says it cannot run are dropped, and so are those whose workspace
//!   exceeds the cap ([`workspace_cap`]: a quarter of the device's free memory when the
//!   shape is first seen, at least 64 MiB).
//! - Deterministic algorithms come first, each group in the heuristics' order: two runs of
//!   the same step then give the same weights (cuDNN's non-deterministic algorithms sum
//!   with atomics: backward-data and backward-filter `ALGO_0`, backward-filter `ALGO_3`).
//!   A shape whose only runnable candidates are non-deterministic still runs, on the best.
//! - A launch that fails (or whose workspace cannot be allocated) moves the choice to the
//!   next candidate, for good; the error surfaces only when none is left.

/// One algorithm cuDNN offers for a shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate<A> {
    /// The algorithm.
    pub algo: A,
    /// Workspace it needs, in bytes.
    pub workspace: usize,
    /// Bit-reproducible from run to run.
    pub deterministic: bool,
}

/// The ordered candidates of one shape and direction, and which is in use.
#[derive(Debug, Clone)]
pub struct AlgoChoice<A> {
    candidates: Vec<Candidate<A>>,
    current: usize,
}

impl<A: Copy> AlgoChoice<A> {
    /// The rule above applied to `listed` (runnable candidates in the heuristics' order)
    /// under a workspace cap of `cap` bytes. `None` when no candidate fits.
    pub fn new(listed: Vec<Candidate<A>>, cap: usize) -> Option<Self> {
        let (mut candidates, rest): (Vec<_>, Vec<_>) = listed
            .into_iter()
            .filter(|c| c.workspace <= cap)
            .partition(|c| c.deterministic);
        candidates.extend(rest);
        (!candidates.is_empty()).then_some(AlgoChoice {
            candidates,
            current: 0,
        })
    }

    /// The candidate in use; `None` once every candidate has failed.
    pub fn current(&self) -> Option<Candidate<A>> {
        self.candidates.get(self.current).copied()
    }

    /// The candidate in use failed: moves to the next; false when none is left.
    pub fn fail(&mut self) -> bool {
        self.current += 1;
        self.current < self.candidates.len()
    }

    /// Every candidate in the order they are tried.
    pub fn candidates(&self) -> &[Candidate<A>] {
        &self.candidates
    }
}

/// The workspace cap for a shape first seen with `free` bytes of device memory free: a
/// quarter of it, at least 64 MiB.
pub fn workspace_cap(free: usize) -> usize {
    (free / 4).max(64 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(algo: u8, workspace: usize, deterministic: bool) -> Candidate<u8> {
        Candidate {
            algo,
            workspace,
            deterministic,
        }
    }

    #[test]
    fn deterministic_first_in_the_heuristics_order_within_the_cap() {
        let listed = vec![
            c(0, 0, false),
            c(1, 10, true),
            c(6, 5_000, true),
            c(3, 20, false),
            c(2, 30, true),
        ];
        let choice = AlgoChoice::new(listed, 1_000).unwrap();
        let order: Vec<u8> = choice.candidates().iter().map(|c| c.algo).collect();
        assert_eq!(order, [1, 2, 0, 3], "6 needs more workspace than the cap");
        assert_eq!(choice.current().unwrap().algo, 1);
    }

    #[test]
    fn a_failed_launch_moves_to_the_next_until_none_is_left() {
        let mut choice = AlgoChoice::new(vec![c(1, 0, true), c(0, 0, false)], 0).unwrap();
        assert!(choice.fail());
        assert_eq!(choice.current().unwrap().algo, 0);
        assert!(!choice.fail());
        assert_eq!(choice.current(), None);
    }

    #[test]
    fn nothing_within_the_cap_is_no_choice() {
        assert!(AlgoChoice::new(vec![c(0, 100, true)], 99).is_none());
        assert!(AlgoChoice::<u8>::new(Vec::new(), 1 << 30).is_none());
    }

    #[test]
    fn the_cap_is_a_quarter_of_free_memory_and_at_least_64_mib() {
        assert_eq!(workspace_cap(80 << 30), 20 << 30);
        assert_eq!(workspace_cap(10 << 20), 64 << 20);
    }
}
