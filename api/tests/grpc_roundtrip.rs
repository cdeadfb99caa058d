//! The contract end to end over real gRPC on 127.0.0.1: a small in-memory
//! `AdminApi` (and an echoing `RaftApi`) served through the crate's route
//! constructors, driven by the typed clients.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use basalt_api::{
    AdminApi, AdminClient, ApiError, Kind, Object, ObjectList, ObjectMeta, RaftApi, RaftClient, Vm,
    VmSpec, WatchEvent, WatchStream, add_raft_routes, admin_routes,
};
use futures::StreamExt;
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

/// Objects by kind and name, the change history, and a broadcast of new
/// changes: just enough of a store to exercise the contract.
#[derive(Debug)]
struct MemoryStore {
    state: Mutex<State>,
    changes: broadcast::Sender<WatchEvent>,
}

#[derive(Debug, Default)]
struct State {
    objects: BTreeMap<(Kind, String), Object>,
    resource_version: u64,
    history: Vec<WatchEvent>,
}

impl MemoryStore {
    fn new() -> Self {
        Self {
            state: Mutex::new(State::default()),
            changes: broadcast::channel(64).0,
        }
    }

    /// Records a change under the state lock, so history and broadcast agree.
    fn record(&self, state: &mut State, event: WatchEvent) {
        state.history.push(event.clone());
        let _ = self.changes.send(event);
    }
}

impl AdminApi for MemoryStore {
    async fn create(&self, mut object: Object) -> Result<Object, ApiError> {
        let mut state = self.state.lock().unwrap();
        let key = (object.kind(), object.name().to_owned());
        if state.objects.contains_key(&key) {
            return Err(ApiError::AlreadyExists {
                kind: key.0,
                name: key.1,
            });
        }
        state.resource_version += 1;
        let rv = state.resource_version;
        let meta = object.meta_mut();
        meta.uid = format!("uid-{rv}");
        meta.resource_version = rv;
        meta.generation = 1;
        meta.created_at_unix_ms = 1_000 * rv;
        state.objects.insert(key, object.clone());
        let event = WatchEvent::Added {
            object: object.clone(),
            resource_version: rv,
        };
        self.record(&mut state, event);
        Ok(object)
    }

    async fn get(&self, kind: Kind, name: String) -> Result<Object, ApiError> {
        let state = self.state.lock().unwrap();
        state
            .objects
            .get(&(kind, name.clone()))
            .cloned()
            .ok_or(ApiError::NotFound { kind, name })
    }

    async fn list(&self, kind: Kind) -> Result<ObjectList, ApiError> {
        let state = self.state.lock().unwrap();
        Ok(ObjectList {
            objects: state
                .objects
                .iter()
                .filter(|((k, _), _)| *k == kind)
                .map(|(_, object)| object.clone())
                .collect(),
            resource_version: state.resource_version,
        })
    }

    async fn update(&self, mut object: Object) -> Result<Object, ApiError> {
        let mut state = self.state.lock().unwrap();
        let key = (object.kind(), object.name().to_owned());
        let Some(current) = state.objects.get(&key) else {
            return Err(ApiError::NotFound {
                kind: key.0,
                name: key.1,
            });
        };
        let (expected, actual) = (
            object.meta().resource_version,
            current.meta().resource_version,
        );
        if expected != actual {
            return Err(ApiError::Aborted { expected, actual });
        }
        let (uid, generation, created) = (
            current.meta().uid.clone(),
            current.meta().generation,
            current.meta().created_at_unix_ms,
        );
        state.resource_version += 1;
        let rv = state.resource_version;
        let meta = object.meta_mut();
        meta.uid = uid;
        meta.generation = generation + 1;
        meta.created_at_unix_ms = created;
        meta.resource_version = rv;
        state.objects.insert(key, object.clone());
        let event = WatchEvent::Modified {
            object: object.clone(),
            resource_version: rv,
        };
        self.record(&mut state, event);
        Ok(object)
    }

    async fn delete(
        &self,
        kind: Kind,
        name: String,
        expected_resource_version: Option<u64>,
        _force: bool,
    ) -> Result<Object, ApiError> {
        let mut state = self.state.lock().unwrap();
        let key = (kind, name);
        let Some(current) = state.objects.get(&key) else {
            return Err(ApiError::NotFound {
                kind: key.0,
                name: key.1,
            });
        };
        let actual = current.meta().resource_version;
        if let Some(expected) = expected_resource_version
            && expected != actual
        {
            return Err(ApiError::Aborted { expected, actual });
        }
        let object = state.objects.remove(&key).expect("checked above");
        state.resource_version += 1;
        let event = WatchEvent::Deleted {
            object: object.clone(),
            resource_version: state.resource_version,
        };
        self.record(&mut state, event);
        Ok(object)
    }

    async fn watch(&self, kind: Option<Kind>, from: u64) -> Result<WatchStream, ApiError> {
        let state = self.state.lock().unwrap();
        let from = if from == 0 {
            state.resource_version
        } else {
            from
        };
        let replay: Vec<WatchEvent> = state
            .history
            .iter()
            .filter(|event| event.resource_version() > from)
            .cloned()
            .collect();
        let live = BroadcastStream::new(self.changes.subscribe()).filter_map(move |event| {
            let event = event.ok().filter(|event| event.resource_version() > from);
            async move { event }
        });
        let wanted =
            move |event: &WatchEvent| kind.is_none() || event.object().map(Object::kind) == kind;
        let events = futures::stream::iter(replay)
            .chain(live)
            .filter(move |event| futures::future::ready(wanted(event)))
            .map(Ok);
        Ok(Box::pin(events))
    }
}

/// Echoes payloads back, reversed, so the test can tell request from reply.
#[derive(Debug)]
struct ReversingRaft;

impl RaftApi for ReversingRaft {
    async fn append_entries(&self, mut payload: Vec<u8>) -> Result<Vec<u8>, ApiError> {
        payload.reverse();
        Ok(payload)
    }

    async fn vote(&self, payload: Vec<u8>) -> Result<Vec<u8>, ApiError> {
        Ok(payload)
    }

    async fn install_snapshot(&self, _payload: Vec<u8>) -> Result<Vec<u8>, ApiError> {
        Err(ApiError::NotLeader {
            leader: Some("10.0.0.9:7000".into()),
        })
    }
}

/// Serves the admin and Raft services on an ephemeral port.
async fn serve(store: MemoryStore) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let routes = add_raft_routes(admin_routes(store), ReversingRaft);
    tokio::spawn(
        Server::builder()
            .add_routes(routes)
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    address
}

fn vm(name: &str, memory_mib: u64) -> Object {
    Object::Vm(Vm {
        meta: ObjectMeta::named(name),
        spec: VmSpec {
            cpus: 1,
            memory_mib,
            running: true,
            ..VmSpec::default()
        },
        ..Vm::default()
    })
}

async fn next(events: &mut WatchStream) -> WatchEvent {
    tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .expect("a watch event within 5 s")
        .expect("the watch stays open")
        .expect("a good event")
}

#[tokio::test]
async fn admin_contract_over_grpc() {
    let address = serve(MemoryStore::new()).await;
    let client = AdminClient::connect(&address.to_string()).await.unwrap();

    // Create, then read back what the server stored.
    let created = client.create(vm("web-1", 256)).await.unwrap();
    assert_eq!(created.meta().resource_version, 1);
    assert_eq!(created.meta().uid, "uid-1");
    assert_eq!(client.get(Kind::Vm, "web-1").await.unwrap(), created);
    assert_eq!(
        client.create(vm("web-1", 256)).await,
        Err(ApiError::AlreadyExists {
            kind: Kind::Vm,
            name: "web-1".into()
        })
    );

    // Update with the current version succeeds; the stale one is refused.
    let mut bigger = created.clone();
    let Object::Vm(v) = &mut bigger else {
        unreachable!()
    };
    v.spec.memory_mib = 512;
    let updated = client.update(bigger.clone()).await.unwrap();
    assert_eq!(updated.meta().resource_version, 2);
    assert_eq!(updated.meta().generation, 2);
    assert_eq!(
        client.update(bigger).await,
        Err(ApiError::Aborted {
            expected: 1,
            actual: 2
        })
    );

    // List sees the one VM at the store's version.
    let list = client.list(Kind::Vm).await.unwrap();
    assert_eq!(list.objects, vec![updated.clone()]);
    assert_eq!(list.resource_version, 2);
    assert!(client.list(Kind::Node).await.unwrap().objects.is_empty());

    // A watch from version 1 replays the update; one from now sees only
    // what comes next.
    let mut from_one = client.watch(Some(Kind::Vm), 1).await.unwrap();
    let mut from_now = client.watch(None, 0).await.unwrap();
    assert_eq!(
        next(&mut from_one).await,
        WatchEvent::Modified {
            object: updated.clone(),
            resource_version: 2
        }
    );

    // Delete refuses a stale expected version, then deletes.
    assert_eq!(
        client.delete(Kind::Vm, "web-1", Some(1)).await,
        Err(ApiError::Aborted {
            expected: 1,
            actual: 2
        })
    );
    let deleted = client.delete(Kind::Vm, "web-1", Some(2)).await.unwrap();
    assert_eq!(deleted, updated);
    let expected = WatchEvent::Deleted {
        object: updated,
        resource_version: 3,
    };
    assert_eq!(next(&mut from_one).await, expected);
    assert_eq!(next(&mut from_now).await, expected);

    assert_eq!(
        client.get(Kind::Vm, "web-1").await,
        Err(ApiError::NotFound {
            kind: Kind::Vm,
            name: "web-1".into()
        })
    );
}

#[tokio::test]
async fn the_server_refuses_invalid_input_naming_the_field() {
    let address = serve(MemoryStore::new()).await;
    let client = AdminClient::connect(&format!("http://{address}"))
        .await
        .unwrap();

    let err = client.create(vm("Bad_Name", 256)).await.unwrap_err();
    assert!(
        matches!(&err, ApiError::InvalidArgument { field, .. } if field == "meta.name"),
        "{err:?}"
    );
    let err = client.create(vm("web-2", 1)).await.unwrap_err();
    assert!(
        matches!(&err, ApiError::InvalidArgument { field, .. } if field == "spec.memory_mib"),
        "{err:?}"
    );
    let err = client.get(Kind::Vm, "no such name!").await.unwrap_err();
    assert!(
        matches!(&err, ApiError::InvalidArgument { field, .. } if field == "name"),
        "{err:?}"
    );
    // Nothing invalid reached the store.
    assert!(client.list(Kind::Vm).await.unwrap().objects.is_empty());
}

#[tokio::test]
async fn raft_payloads_and_errors_cross_unchanged() {
    let address = serve(MemoryStore::new()).await;
    let raft = RaftClient::connect(&address.to_string()).await.unwrap();
    assert_eq!(
        raft.append_entries(vec![1, 2, 3]).await.unwrap(),
        vec![3, 2, 1]
    );
    let big = vec![7u8; 8 << 20];
    assert_eq!(raft.vote(big.clone()).await.unwrap(), big);
    assert_eq!(
        raft.install_snapshot(vec![]).await,
        Err(ApiError::NotLeader {
            leader: Some("10.0.0.9:7000".into())
        })
    );
}

#[tokio::test]
async fn connecting_to_nothing_is_unavailable_and_names_the_address() {
    // Bind, then drop, to get a port nobody listens on.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    drop(listener);
    match AdminClient::connect(&address).await {
        Err(ApiError::Unavailable { reason }) => {
            assert!(reason.contains(&address), "{reason}")
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(matches!(
        AdminClient::connect("not a uri").await,
        Err(ApiError::InvalidArgument { field, .. }) if field == "address"
    ));
}
