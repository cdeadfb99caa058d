//! A watch that outlives the member serving it: when the stream breaks
//! (the member is gone, the connection reset, the member shut down), it is
//! opened again on another member from the last resource version the
//! caller was given, so the caller sees one stream with no gap and no
//! event twice.
//!
//! Invariants:
//! - every member holds the same changes at each resource version, in the
//!   same order (they apply the same log); several changes may share a
//!   version (one Raft entry). So after events at version `v` the stream
//!   resumes from `v - 1` and drops the events at `v` it already gave;
//!   after a bookmark at `b` (everything up to `b` given) it resumes from
//!   `b`;
//! - `OUT_OF_RANGE` (the new member's history no longer reaches back) and
//!   every other refusal end the stream with that error, so the caller
//!   re-lists; only a broken stream is resumed;
//! - a watch opened "from now on" (version 0) that broke before giving
//!   anything has no position to resume from ("now" was the first
//!   member's applied index, which the client never learnt): it ends with
//!   the error, as a plain stream would, rather than resume with a gap;
//! - resuming tries the other members first, then the same one, for up to
//!   [`RESUME_FOR`] without progress; then the stream ends with an error
//!   naming each member's failure.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use futures::StreamExt;

use super::targets::{Targets, all_failed, with_address};
use crate::server::WatchStream;
use crate::{ApiError, WatchEvent};

/// How long a broken watch keeps trying to resume without progress.
pub(crate) const RESUME_FOR: Duration = Duration::from_secs(15);
/// The pause between two rounds over every member.
const ROUND_PAUSE: Duration = Duration::from_millis(200);

/// Opens a watch on the member of a given index from a given version.
pub(crate) type Open<T> = Box<
    dyn Fn(usize, u64) -> Pin<Box<dyn Future<Output = Result<WatchStream<T>, ApiError>> + Send>>
        + Send
        + Sync,
>;

/// Where a stream is, as far as its caller knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Position {
    /// Every change up to this version was given (the version asked
    /// from, or a bookmark's); `None` for "from now on" with nothing
    /// given yet.
    complete: Option<u64>,
    /// The version of the last change given and how many changes at that
    /// version were given (more may follow at the same version).
    last: Option<(u64, usize)>,
    /// The stream starts with a listing of objects as they are (each at
    /// its own version, in no version order), ended by a bookmark: no
    /// position until then.
    listing: bool,
}

impl Position {
    fn new(from: u64, start: Start) -> Self {
        Self {
            complete: (from != 0).then_some(from),
            last: None,
            listing: from == 0 && start == Start::ListingThenBookmark,
        }
    }

    /// Notes an event given to the caller.
    fn given<T>(&mut self, event: &WatchEvent<T>) {
        let version = event.resource_version();
        match event {
            WatchEvent::Bookmark { .. } => {
                self.complete = Some(version);
                self.last = None;
                self.listing = false;
            }
            _ if self.listing => {}
            _ => {
                self.last = match self.last {
                    Some((v, given)) if v == version => Some((v, given + 1)),
                    _ => Some((version, 1)),
                };
            }
        }
    }

    /// The version to resume from and the events to drop first (their
    /// version and how many), or `None` when there is no position.
    fn resume(&self) -> Option<(u64, Option<(u64, usize)>)> {
        match (self.last, self.complete) {
            // Version 0 means "from now on" to a server: a change at
            // version 1 (the first entry) resumes after it.
            (Some((version, _)), _) if version <= 1 => Some((version, None)),
            (Some((version, given)), _) => Some((version - 1, Some((version, given)))),
            (None, Some(complete)) => Some((complete, None)),
            (None, None) => None,
        }
    }
}

/// What a watch from version 0 starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Start {
    /// Changes from now on, in version order (the admin watch).
    Changes,
    /// The watched objects as they are, then a bookmark, then changes
    /// (the agent's placement watch).
    ListingThenBookmark,
}

/// Whether `err` on a watch stream means the stream broke (the member or
/// the connection to it is gone), not that the member refused it.
pub(crate) fn broken(err: &ApiError) -> bool {
    match err {
        ApiError::Unavailable { .. } | ApiError::NotLeader { .. } => true,
        // A connection that broke under a stream surfaces as gRPC UNKNOWN
        // (HTTP/2 or body errors), which the client reads as internal.
        ApiError::Internal { reason } => {
            reason.starts_with("Unknown error")
                || reason.contains("transport error")
                || reason.contains("error reading a body")
                || reason.contains("connection reset")
                || reason.contains("broken pipe")
        }
        _ => false,
    }
}

/// The state of a resuming watch stream.
struct Resuming<T, C> {
    targets: Targets<C>,
    open: Open<T>,
    /// The member serving the current stream.
    serving: usize,
    stream: Option<WatchStream<T>>,
    position: Position,
    /// Events to drop after a resume: their version and how many are left.
    skip: Option<(u64, usize)>,
    /// When the stream last broke without an event given since.
    broken_since: Option<Instant>,
    /// Why the stream broke, kept for the caller when it cannot resume.
    last_error: Option<ApiError>,
    ended: bool,
}

/// Wraps `stream`, opened by `targets` on member `serving` from version
/// `from`, into a stream that resumes on another member when it breaks.
pub(crate) fn resuming<T: Send + 'static, C: Clone + Send + Sync + 'static>(
    targets: Targets<C>,
    open: Open<T>,
    serving: usize,
    (from, start): (u64, Start),
    stream: WatchStream<T>,
) -> WatchStream<T> {
    let state = Resuming {
        targets,
        open,
        serving,
        stream: Some(stream),
        position: Position::new(from, start),
        skip: None,
        broken_since: None,
        last_error: None,
        ended: false,
    };
    Box::pin(futures::stream::unfold(state, next_event))
}

async fn next_event<T: Send + 'static, C: Clone + Send + Sync + 'static>(
    mut state: Resuming<T, C>,
) -> Option<(Result<WatchEvent<T>, ApiError>, Resuming<T, C>)> {
    loop {
        if state.ended {
            return None;
        }
        let Some(stream) = state.stream.as_mut() else {
            match resume(&mut state).await {
                Ok(stream) => {
                    state.stream = Some(stream);
                    continue;
                }
                Err(err) => {
                    state.ended = true;
                    return Some((Err(err), state));
                }
            }
        };
        match stream.next().await {
            Some(Ok(event)) => {
                if let Some((version, left)) = state.skip {
                    if event.resource_version() == version && left > 0 {
                        state.skip = (left > 1).then_some((version, left - 1));
                        continue;
                    }
                    state.skip = None;
                }
                state.position.given(&event);
                state.broken_since = None;
                state.last_error = None;
                return Some((Ok(event), state));
            }
            Some(Err(err)) if broken(&err) => {
                state.stream = None;
                state.last_error = Some(err);
            }
            Some(Err(err)) => {
                state.ended = true;
                return Some((Err(err), state));
            }
            // A watch never ends while its member serves it: the member
            // is shutting down.
            None => state.stream = None,
        }
        if state.position.resume().is_none() {
            // Nothing to resume from: end as the plain stream did.
            state.ended = true;
            return state.last_error.take().map(|err| (Err(err), state));
        }
        if let Some(since) = state.broken_since {
            // Broke again before giving anything: not in a busy loop.
            if since.elapsed() >= RESUME_FOR {
                state.ended = true;
                let err = state
                    .last_error
                    .take()
                    .unwrap_or_else(|| ApiError::Unavailable {
                        reason: format!("the watch kept breaking for {RESUME_FOR:?}"),
                    });
                return Some((Err(err), state));
            }
            tokio::time::sleep(ROUND_PAUSE).await;
        }
        state.broken_since.get_or_insert_with(Instant::now);
    }
}

/// Opens the stream again from the caller's position: the next members
/// first, then the same one, round after round until [`RESUME_FOR`] has
/// passed since the stream broke.
async fn resume<T: Send + 'static, C: Clone + Send + Sync + 'static>(
    state: &mut Resuming<T, C>,
) -> Result<WatchStream<T>, ApiError> {
    let Some((from, skip)) = state.position.resume() else {
        return Err(state
            .last_error
            .take()
            .unwrap_or_else(|| ApiError::Unavailable {
                reason: "the watch stream ended".into(),
            }));
    };
    let since = *state.broken_since.get_or_insert_with(Instant::now);
    let count = state.targets.len();
    loop {
        let mut failures = Vec::new();
        for step in 1..=count {
            let index = (state.serving + step) % count;
            match (state.open)(index, from).await {
                Ok(stream) => {
                    tracing::debug!(
                        member = state.targets.address(index),
                        from,
                        "resumed a broken watch"
                    );
                    state.serving = index;
                    state.targets.prefer(index);
                    state.skip = skip;
                    return Ok(stream);
                }
                Err(err) if broken(&err) => {
                    failures.push(with_address(err, state.targets.address(index)));
                }
                Err(err) => return Err(err),
            }
        }
        if since.elapsed() >= RESUME_FOR {
            return Err(all_failed(failures));
        }
        tokio::time::sleep(ROUND_PAUSE).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::{Image, Object, ObjectMeta};

    fn event(name: &str, version: u64) -> WatchEvent {
        WatchEvent::Added {
            object: Object::Image(Image {
                meta: ObjectMeta::named(name),
                ..Image::default()
            }),
            resource_version: version,
        }
    }

    fn name(event: &WatchEvent) -> String {
        event
            .object()
            .map(|o| o.name().to_owned())
            .unwrap_or_default()
    }

    /// The log every member serves: (version, name), several per version.
    fn log() -> Vec<(u64, &'static str)> {
        vec![(5, "a"), (6, "b"), (6, "c"), (6, "d"), (7, "e"), (9, "f")]
    }

    /// A member that serves `log()` after the asked version, breaking
    /// (transport error) after `give` events, or refusing.
    fn members(
        plan: Vec<Result<usize, ApiError>>,
        asked: Arc<Mutex<Vec<(usize, u64)>>>,
    ) -> (Targets<usize>, Open<Object>) {
        let targets = Targets::from_parts(
            vec!["m0:1".into(), "m1:1".into(), "m2:1".into()],
            vec![0, 1, 2],
            0,
        );
        let plan = Arc::new(Mutex::new(plan.into_iter()));
        let open: Open<Object> = Box::new(move |index, from| {
            asked.lock().unwrap().push((index, from));
            let step = plan.lock().unwrap().next();
            Box::pin(async move {
                let give = match step {
                    Some(Ok(give)) => give,
                    Some(Err(err)) => return Err(err),
                    None => usize::MAX,
                };
                let events: Vec<Result<WatchEvent, ApiError>> = log()
                    .into_iter()
                    .filter(|(v, _)| *v > from)
                    .map(|(v, n)| Ok(event(n, v)))
                    .take(give)
                    .chain(std::iter::once(Err(ApiError::Internal {
                        reason:
                            "Unknown error: h2 protocol error: error reading a body from connection"
                                .into(),
                    })))
                    .collect();
                Ok(Box::pin(futures::stream::iter(events)) as WatchStream)
            })
        });
        (targets, open)
    }

    async fn collect(stream: WatchStream, most: usize) -> Vec<Result<String, ApiError>> {
        stream
            .take(most)
            .map(|r| r.map(|e| format!("{}@{}", name(&e), e.resource_version())))
            .collect()
            .await
    }

    #[tokio::test]
    async fn a_broken_stream_resumes_on_the_next_member_without_gap_or_duplicate() {
        let asked = Arc::new(Mutex::new(Vec::new()));
        // First stream breaks after a and b (in the middle of version 6);
        // the next member is down; the third gives b again (dropped) and
        // c, then breaks; the first again gives the rest.
        let (targets, open) = members(
            vec![
                Ok(2),
                Err(ApiError::Unavailable {
                    reason: "tcp connect error".into(),
                }),
                Ok(2),
                Ok(usize::MAX),
            ],
            Arc::clone(&asked),
        );
        let first = open(0, 4).await.unwrap();
        let stream = resuming(targets, open, 0, (4, Start::Changes), first);
        let got = collect(stream, 6).await;
        let got: Vec<String> = got.into_iter().map(Result::unwrap).collect();
        assert_eq!(got, ["a@5", "b@6", "c@6", "d@6", "e@7", "f@9"]);
        // Resumed from 5 (inside version 6) on member 1 (down), then 2,
        // then from 5 again on 0 with b and c dropped.
        assert_eq!(*asked.lock().unwrap(), [(0, 4), (1, 5), (2, 5), (0, 5)]);
    }

    #[tokio::test]
    async fn out_of_range_and_refusals_end_the_stream() {
        let asked = Arc::new(Mutex::new(Vec::new()));
        let (targets, open) = members(
            vec![
                Ok(1),
                Err(ApiError::OutOfRange {
                    requested: 4,
                    oldest: 8,
                }),
            ],
            Arc::clone(&asked),
        );
        let first = open(0, 4).await.unwrap();
        let stream = resuming(targets, open, 0, (4, Start::Changes), first);
        let got = collect(stream, 10).await;
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].as_ref().unwrap(), "a@5");
        assert!(
            matches!(got[1], Err(ApiError::OutOfRange { oldest: 8, .. })),
            "{got:?}"
        );
    }

    #[tokio::test]
    async fn a_watch_from_now_that_broke_before_any_event_ends_with_its_error() {
        let asked = Arc::new(Mutex::new(Vec::new()));
        let (targets, open) = members(vec![Ok(0)], Arc::clone(&asked));
        let first = open(0, 100).await.unwrap();
        let stream = resuming(targets, open, 0, (0, Start::Changes), first);
        let got = collect(stream, 10).await;
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(matches!(got[0], Err(ApiError::Internal { .. })), "{got:?}");
        assert_eq!(asked.lock().unwrap().len(), 1, "never resumed");
    }

    #[test]
    fn a_listing_gives_no_position_until_its_bookmark() {
        let mut position = Position::new(0, Start::ListingThenBookmark);
        position.given(&event("old", 3));
        position.given(&event("older", 2));
        assert_eq!(position.resume(), None);
        position.given(&WatchEvent::<Object>::Bookmark {
            resource_version: 8,
        });
        assert_eq!(position.resume(), Some((8, None)));
        position.given(&event("new", 9));
        assert_eq!(position.resume(), Some((8, Some((9, 1)))));
    }

    #[test]
    fn a_bookmark_is_a_complete_position() {
        let mut position = Position::new(0, Start::Changes);
        assert_eq!(position.resume(), None);
        position.given(&event("a", 7));
        position.given(&event("b", 7));
        assert_eq!(position.resume(), Some((6, Some((7, 2)))));
        position.given(&WatchEvent::<Object>::Bookmark {
            resource_version: 9,
        });
        assert_eq!(position.resume(), Some((9, None)));
        position.given(&event("c", 1));
        assert_eq!(position.resume(), Some((1, None)));
    }

    #[test]
    fn only_a_broken_connection_counts_as_broken() {
        assert!(broken(&ApiError::Unavailable {
            reason: "member gone".into()
        }));
        assert!(broken(&ApiError::Internal {
            reason: "Unknown error: transport error".into()
        }));
        assert!(!broken(&ApiError::OutOfRange {
            requested: 1,
            oldest: 2
        }));
        assert!(!broken(&ApiError::Internal {
            reason: "Internal error: the state is bad".into()
        }));
    }
}
