//! A linearizability checker for histories of a single register, in the
//! style of Wing & Gong (with Lowe's memoization, as Knossos and Porcupine
//! do): search for an order of the operations that respects real time
//! (an operation that returned before another was called comes first) and
//! in which every read returns the latest write.
//!
//! Invariants: an operation whose outcome the client does not know (a
//! timed-out write) may take effect at any time after its call, or never;
//! a read that failed is left out of the history by the caller.

use std::collections::HashSet;
use std::time::Instant;

/// What a client did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RegisterOp {
    /// Wrote this value.
    Write(u64),
    /// Read this value (`None`: the register was never written).
    Read(Option<u64>),
}

/// One operation of a history, with its real-time interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Operation {
    /// What was done.
    pub op: RegisterOp,
    /// When the client called it.
    pub call: Instant,
    /// When it returned with a known outcome; `None` when the outcome is
    /// unknown (the client timed out or the server died).
    pub ret: Option<Instant>,
}

/// The history cannot be linearized.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the history of {operations} operations is not linearizable; the longest linearizable prefix holds {longest} of them"
)]
pub struct NotLinearizable {
    /// How many operations the history holds.
    pub operations: usize,
    /// The most operations any explored order linearized.
    pub longest: usize,
}

/// Checks `history` against a register that starts unwritten.
pub fn check_register(history: &[Operation]) -> Result<(), NotLinearizable> {
    let mut ops: Vec<Operation> = history.to_vec();
    ops.sort_by_key(|o| o.call);
    let n = ops.len();
    let required: usize = ops.iter().filter(|o| o.ret.is_some()).count();

    // Depth-first search over (linearized set, register value), with the
    // states already explored memoized.
    let mut seen: HashSet<(Vec<u64>, Option<u64>)> = HashSet::new();
    let mut stack: Vec<(Vec<u64>, Option<u64>, usize)> = vec![(vec![0; n.div_ceil(64)], None, 0)];
    let mut longest = 0;
    while let Some((done, value, count)) = stack.pop() {
        let linearized_required = (0..n)
            .filter(|&i| is_set(&done, i) && ops[i].ret.is_some())
            .count();
        if linearized_required == required {
            return Ok(());
        }
        longest = longest.max(count);
        // An operation may go next only if it was called before every
        // pending operation with a known outcome returned.
        let horizon = (0..n)
            .filter(|&i| !is_set(&done, i))
            .filter_map(|i| ops[i].ret)
            .min();
        for i in 0..n {
            if is_set(&done, i) || horizon.is_some_and(|h| ops[i].call > h) {
                continue;
            }
            let next = match ops[i].op {
                RegisterOp::Write(v) => Some(v),
                RegisterOp::Read(seen_value) if seen_value == value => value,
                RegisterOp::Read(_) => continue,
            };
            let mut after = done.clone();
            after[i / 64] |= 1 << (i % 64);
            if seen.insert((after.clone(), next)) {
                stack.push((after, next, count + 1));
            }
        }
    }
    Err(NotLinearizable {
        operations: n,
        longest,
    })
}

fn is_set(bits: &[u64], i: usize) -> bool {
    bits[i / 64] & (1 << (i % 64)) != 0
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn at(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    fn op(base: Instant, op: RegisterOp, call: u64, ret: Option<u64>) -> Operation {
        Operation {
            op,
            call: at(base, call),
            ret: ret.map(|r| at(base, r)),
        }
    }

    #[test]
    fn accepts_concurrent_histories_that_can_be_ordered() {
        let t = Instant::now();
        let history = [
            op(t, RegisterOp::Write(1), 0, Some(10)),
            op(t, RegisterOp::Write(2), 5, Some(30)),
            // Overlaps the write of 2: may see either.
            op(t, RegisterOp::Read(Some(2)), 12, Some(20)),
            op(t, RegisterOp::Read(Some(2)), 31, Some(40)),
            // A write that timed out and, as the read shows, took effect.
            op(t, RegisterOp::Write(3), 41, None),
            op(t, RegisterOp::Read(Some(3)), 60, Some(70)),
        ];
        assert_eq!(check_register(&history), Ok(()));
        assert_eq!(check_register(&[]), Ok(()));
    }

    #[test]
    fn rejects_a_stale_read() {
        let t = Instant::now();
        // The read of 1 starts after the write of 2 returned: stale.
        let history = [
            op(t, RegisterOp::Write(1), 0, Some(10)),
            op(t, RegisterOp::Write(2), 11, Some(20)),
            op(t, RegisterOp::Read(Some(1)), 21, Some(30)),
        ];
        let err = check_register(&history).unwrap_err();
        assert_eq!(err.operations, 3);
        assert_eq!(err.longest, 2);
    }

    #[test]
    fn rejects_reads_that_go_back_in_time() {
        let t = Instant::now();
        // Two concurrent writes; one reader sees 2 then 1 afterwards.
        let history = [
            op(t, RegisterOp::Write(1), 0, Some(50)),
            op(t, RegisterOp::Write(2), 0, Some(50)),
            op(t, RegisterOp::Read(Some(2)), 60, Some(70)),
            op(t, RegisterOp::Read(Some(1)), 71, Some(80)),
            op(t, RegisterOp::Read(None), 0, Some(5)),
        ];
        assert!(check_register(&history).is_err());
    }

    #[test]
    fn handles_long_sequential_histories() {
        let t = Instant::now();
        let mut history = Vec::new();
        for i in 0..2_000u64 {
            history.push(op(t, RegisterOp::Write(i), i * 10, Some(i * 10 + 4)));
            history.push(op(
                t,
                RegisterOp::Read(Some(i)),
                i * 10 + 5,
                Some(i * 10 + 9),
            ));
        }
        assert_eq!(check_register(&history), Ok(()));
        history.push(op(t, RegisterOp::Read(Some(7)), 100_000, Some(100_001)));
        assert!(check_register(&history).is_err());
    }
}
