//! Several addresses of one service — the members of the control plane,
//! given as `a,b,c` — behind one typed client: calls go to the member that
//! last answered, and move on to the next when it cannot be reached, so
//! losing one member strands no client.
//!
//! Invariants:
//! - a call moves to the next address only when it cannot have had an
//!   effect: the connection was never made, or the member answered that
//!   no leader is known, or the call is a read (or otherwise safe to
//!   repeat) and failed as `UNAVAILABLE`; a write whose outcome is unknown
//!   answers its error, never a second attempt;
//! - each address is tried at most once per call; when all fail, the
//!   error names every address;
//! - with one address, a call behaves exactly as a plain client's.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tonic::transport::Channel;

use super::{connect, connect_lazy};
use crate::ApiError;

/// Whether a failed call may be sent to another member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Repeat {
    /// A read, or a call that is safe to repeat: any `UNAVAILABLE` moves on.
    Safe,
    /// A write: moves on only when it cannot have had an effect.
    Unsafe,
}

/// The clients of every address, and which one answered last.
#[derive(Debug, Clone)]
pub(crate) struct Targets<C> {
    addresses: Arc<[String]>,
    clients: Arc<[C]>,
    current: Arc<AtomicUsize>,
}

/// Splits `a,b,c` into addresses; an empty one is refused.
pub(crate) fn split_addresses(list: &str) -> Result<Vec<String>, ApiError> {
    let addresses: Vec<String> = list.split(',').map(|a| a.trim().to_owned()).collect();
    if addresses.iter().any(String::is_empty) {
        return Err(ApiError::invalid(
            "address",
            format!("{list:?}: an empty address in the list (use host:port,host:port)"),
        ));
    }
    Ok(addresses)
}

impl<C: Clone> Targets<C> {
    /// Clients of every address in `list`, each connecting on first use.
    pub(crate) fn lazy(list: &str, make: impl Fn(Channel) -> C) -> Result<Self, ApiError> {
        let addresses = split_addresses(list)?;
        let clients = addresses
            .iter()
            .map(|a| connect_lazy(a).map(&make))
            .collect::<Result<Vec<C>, ApiError>>()?;
        Ok(Self::from_parts(addresses, clients, 0))
    }

    /// Clients of every address in `list`, connected now to the first one
    /// that accepts (the others connect on first use); an error naming
    /// every address when none does.
    pub(crate) async fn connect(list: &str, make: impl Fn(Channel) -> C) -> Result<Self, ApiError> {
        let addresses = split_addresses(list)?;
        let mut failures = Vec::new();
        for (index, address) in addresses.iter().enumerate() {
            match connect(address).await {
                Ok(channel) => {
                    let mut clients = Vec::with_capacity(addresses.len());
                    for (other, address) in addresses.iter().enumerate() {
                        clients.push(if other == index {
                            make(channel.clone())
                        } else {
                            make(connect_lazy(address)?)
                        });
                    }
                    return Ok(Self::from_parts(addresses, clients, index));
                }
                Err(err) => failures.push(err),
            }
        }
        Err(all_failed(failures))
    }

    /// One client on an existing channel.
    pub(crate) fn single(client: C) -> Self {
        Self::from_parts(vec!["channel".into()], vec![client], 0)
    }

    pub(crate) fn from_parts(addresses: Vec<String>, clients: Vec<C>, current: usize) -> Self {
        Self {
            addresses: addresses.into(),
            clients: clients.into(),
            current: Arc::new(AtomicUsize::new(current)),
        }
    }

    /// Runs `call` on the client that answered last, then on the next
    /// ones while the failure allows it (see the module's invariants).
    pub(crate) async fn call<T, F, Fut>(&self, repeat: Repeat, call: F) -> Result<T, ApiError>
    where
        F: Fn(C) -> Fut,
        Fut: Future<Output = Result<T, ApiError>>,
    {
        self.call_indexed(repeat, call)
            .await
            .map(|(value, _)| value)
    }

    /// How many addresses there are (at least one).
    pub(crate) fn len(&self) -> usize {
        self.clients.len()
    }

    /// The client of address number `index` (modulo their count).
    pub(crate) fn client(&self, index: usize) -> C {
        self.clients[index % self.clients.len()].clone()
    }

    /// Address number `index` (modulo their count).
    pub(crate) fn address(&self, index: usize) -> &str {
        &self.addresses[index % self.addresses.len()]
    }

    /// Makes address number `index` the one later calls try first.
    pub(crate) fn prefer(&self, index: usize) {
        self.current
            .store(index % self.clients.len(), Ordering::Relaxed);
    }

    /// [`Self::call`], also answering which address answered.
    pub(crate) async fn call_indexed<T, F, Fut>(
        &self,
        repeat: Repeat,
        call: F,
    ) -> Result<(T, usize), ApiError>
    where
        F: Fn(C) -> Fut,
        Fut: Future<Output = Result<T, ApiError>>,
    {
        let count = self.clients.len();
        let start = self.current.load(Ordering::Relaxed) % count;
        let mut failures = Vec::new();
        for step in 0..count {
            let index = (start + step) % count;
            match call(self.clients[index].clone()).await {
                Ok(value) => {
                    if step > 0 {
                        self.current.store(index, Ordering::Relaxed);
                    }
                    return Ok((value, index));
                }
                Err(err) if count > 1 && may_move_on(&err, repeat) => {
                    failures.push(with_address(err, &self.addresses[index]));
                }
                Err(err) => return Err(err),
            }
        }
        Err(all_failed(failures))
    }
}

/// Whether a call that failed with `err` may go to another member.
pub(crate) fn may_move_on(err: &ApiError, repeat: Repeat) -> bool {
    match err {
        ApiError::NotLeader { .. } => true,
        ApiError::Unavailable { reason } => {
            repeat == Repeat::Safe
                || never_sent(reason)
                || reason.contains("no control-plane leader is elected")
        }
        // A connection that broke under a call surfaces as gRPC UNKNOWN.
        ApiError::Internal { reason } => {
            repeat == Repeat::Safe && reason.contains("transport error")
        }
        _ => false,
    }
}

/// Whether a call failed before a connection to the server existed, so the
/// server never saw it (tonic's connector says "tcp connect error";
/// [`connect`] says "cannot connect to").
fn never_sent(reason: &str) -> bool {
    reason.contains("tcp connect error") || reason.starts_with("cannot connect to")
}

pub(crate) fn with_address(err: ApiError, address: &str) -> ApiError {
    match err {
        ApiError::Unavailable { reason } if !reason.contains(address) => ApiError::Unavailable {
            reason: format!("{address}: {reason}"),
        },
        other => other,
    }
}

/// One error for a call that no address answered.
pub(crate) fn all_failed(failures: Vec<ApiError>) -> ApiError {
    match <[ApiError; 1]>::try_from(failures) {
        Ok([one]) => one,
        Err(failures) => ApiError::Unavailable {
            reason: format!(
                "no control-plane member answered: {}",
                failures
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_of_addresses_is_split_and_an_empty_one_refused() {
        assert_eq!(
            split_addresses("a:1, b:2,c:3").unwrap(),
            ["a:1", "b:2", "c:3"]
        );
        assert_eq!(split_addresses("a:1").unwrap(), ["a:1"]);
        assert!(matches!(
            split_addresses("a:1,,b:2"),
            Err(ApiError::InvalidArgument { .. })
        ));
    }

    #[test]
    fn only_calls_without_effect_move_to_the_next_member() {
        let unavailable = |reason: &str| ApiError::Unavailable {
            reason: reason.into(),
        };
        let refused = unavailable("transport error: tcp connect error: Connection refused");
        assert!(may_move_on(&refused, Repeat::Unsafe));
        assert!(may_move_on(
            &unavailable("no control-plane leader is elected; retry"),
            Repeat::Unsafe
        ));
        let unknown = unavailable("the connection to the leader broke; the outcome is unknown");
        assert!(!may_move_on(&unknown, Repeat::Unsafe));
        assert!(may_move_on(&unknown, Repeat::Safe));
        let aborted = ApiError::Aborted {
            expected: 1,
            actual: 2,
        };
        assert!(!may_move_on(&aborted, Repeat::Safe));
    }

    #[tokio::test]
    async fn a_call_moves_past_an_unreachable_member_and_stays_with_the_next() {
        let targets = Targets::from_parts(
            vec!["m1:1".into(), "m2:1".into(), "m3:1".into()],
            vec!["m1", "m2", "m3"],
            0,
        );
        let call = |client: &'static str| async move {
            match client {
                "m1" => Err(ApiError::Unavailable {
                    reason: "tcp connect error".into(),
                }),
                other => Ok(other),
            }
        };
        assert_eq!(targets.call(Repeat::Unsafe, call).await.unwrap(), "m2");
        assert_eq!(targets.current.load(Ordering::Relaxed), 1, "sticks with m2");
        let all_down = |_: &'static str| async {
            Err::<(), _>(ApiError::Unavailable {
                reason: "tcp connect error".into(),
            })
        };
        let err = targets.call(Repeat::Safe, all_down).await.unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("m1:1: ") && text.contains("m2:1: ") && text.contains("m3:1: "),
            "{text}"
        );
    }
}
